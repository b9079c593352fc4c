"""MAPADensity: decoder-only training with a model-agnostic posterior approximation."""

import copy
import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from . import _mapa
from ._base import (AUTO_MAX_STEPS, AVERAGE_DECAY, INIT_SELECTION_ROWS, BaseDeepDensity,
                    TrainingStage, fill_doc)
from ._linear import regression_start
from ._networks import GaussianDecoder, StackedDecoders, build
from ._row_proposal import RowProposal
from ._scoring import (add_prior_component, importance_chunk_rows, log_mean_weights,
                       mixture_importance_weights, stratified_prior_log_px)


#: Codes train with SparseAdam above this many atoms, with dense Adam
#: (fused with the decoder's parameters) up to it: measured at 150 and 1000
#: rows, dense Adam was ~10% faster per fit at equal or better held-out KL.
SPARSE_CODES_MIN_ATOMS = 4096

#: ``n_neighbors='auto'``: the narrow and the wide neighbourhood. The narrow
#: one is used where the wide one's local residual (``_mapa.local_residual``:
#: the variance off a local fit of ``n_components`` dimensions) is more than
#: ``1 / NEIGHBORS_CURVATURE_RATIO`` times the narrow one's. Noise gives both
#: the same residual; the curvature a neighbourhood spans grows its residual
#: as a power of its radius, so a large drop says the wide neighbourhoods
#: reach around the manifold's bends. Measured in docs/user_guide/mapa.rst
#: ("How many neighbours").
NEIGHBORS_AUTO = (10, 20)
NEIGHBORS_CURVATURE_RATIO = 0.35
#: ... and only where the narrow neighbourhood leaves at least this many
#: degrees of freedom per remaining direction (``NEIGHBORS_AUTO[0] - 1 -
#: n_components``; up to four latent dimensions): with fewer the fitted
#: directions take much of the noise and noise alone drives the ratio down
#: (eight latent dimensions: 0.34 on macrodata, 0.42 on star98).
NEIGHBORS_MIN_DOF = 5

#: With more than one latent dimension the candidate starts, trained through
#: the whole first phase, are compared by the continuous model's
#: importance-weighted bound with this many draws per row, on up to
#: ``INIT_SELECTION_ROWS`` training rows (``MAPADensity._likelihood_scores``).
SELECTION_DRAWS = 64

#: Step budget of the second phase when ``refine_iter='auto'``.
REFINE_MAX_STEPS = 1000
#: With two or more latent dimensions a second phase that decays the
#: decoder's weights (``weight_decay_ > 0``: by default on data near a
#: manifold, see ``REFINE_WEIGHT_DECAY``) runs ``REFINE_EPOCHS_DECAYED``
#: passes over the rows, at least ``REFINE_MAX_STEPS`` and at most
#: ``REFINE_MAX_STEPS_DECAYED`` steps: 1000 up to 500 rows, 2000 from 1000.
#: The decay holds the longer phase back from the training rows at 1000
#: rows; at 300 rows 2000 steps overfitted. Measured in
#: docs/user_guide/mapa.rst ("Weight decay in the second phase").
#: With one latent dimension a phase that decays runs
#: ``REFINE_EPOCHS_DECAYED`` passes too, up to ``REFINE_MAX_STEPS_1D`` steps
#: (2000 at 1000 rows): over five seeds the two clusters' KL fell 0.015-0.034
#: and the absolute value's up to 0.018, the curve in 50 dimensions rose
#: 0.002-0.013.
REFINE_EPOCHS_DECAYED = 256
REFINE_MAX_STEPS_DECAYED = 2000
#: Pieces of the mutual k-NN graph (``_mapa.mutual_pieces``) are candidate
#: starts from this many rows: at 1000 rows they turned two concentric
#: circles whose k-NN graph is joined by a few noisy rows from -2.34 / -1.92
#: to -1.81 / -1.82 nats per row (two latent dimensions: -2.04 / -2.09 to
#: -1.94 / -1.92); at 300 rows (``make_circles``, seeds 0 / 1 / 2) from
#: -2.72 / -2.33 / -1.91 to -1.89 / -1.96 / -1.91, at 150 from -2.03 /
#: -2.09 / -2.22 to -2.03 / -1.97 / -2.06 (500 rows until 0.2). On iris (120
#: rows) they were tried and held-out rows lost 0.19 / 0.03 / 0 (two latent
#: dimensions). Measured in docs/user_guide/mapa.rst ("Pieces joined by a
#: few rows").
PIECES_MIN_ROWS = 150
#: With one latent dimension the 'auto' budget of the second phase grows
#: with the rows: ``REFINE_EPOCHS_1D`` passes, at least ``REFINE_MAX_STEPS``
#: and at most ``REFINE_MAX_STEPS_1D`` steps (``_refine_max_steps``). So it
#: is 1000 steps up to 1000 rows, 2000 at 2000 rows and 3000 from about 2350.
#: Measured in docs/user_guide/mapa.rst ("How long the second phase runs"):
#: at 2000 rows the KL of the absolute value and the two clusters fell 2-3x
#: (the others within 0.01); at 150 rows a phase of 128 epochs (150 steps)
#: left the noise high (the spiral's KL doubled) and one of 3000 steps
#: overfitted, and at 1000 rows 3000 steps overfitted a curve in 50
#: dimensions (KL +0.03).
REFINE_EPOCHS_1D = 128
REFINE_MAX_STEPS_1D = 3000
#: With ``refine_iter='auto'``, one latent dimension, at least this many
#: training rows and no ``early_stopping``, ``validation_fraction`` of the rows
#: (at most ``REFINE_VALIDATION_MAX_ROWS``) are held out of the second phase
#: only (they stay atoms of the first), and the phase keeps the state whose
#: held-out bound is best. Measured in docs/user_guide/mapa.rst ("How long
#: the second phase runs"): 2-3x lower KL on 5000-row curves; mixed at 2000
#: rows (it depended on which rows were held out), worse at 300 and 1000
#: rows, where the held-out rows cost more than the longer phase gains, and
#: with two latent dimensions (S-curve, swiss roll).
REFINE_VALIDATION_MIN_ROWS = 5000
REFINE_VALIDATION_MAX_ROWS = 2000
#: With two or more latent dimensions the second phase holds rows out the
#: same way (up to ``REFINE_MAX_STEPS``) below ``REFINE_VALIDATION_BELOW_ROWS``
#: rows where the first phase left at least ``REFINE_VALIDATION_MIN_NOISE`` of
#: the standardized variance to the noise (mean of ``scale**2``). On the
#: small noisy tables of the ``real`` suite (diabetes, star98, macrodata:
#: 0.30-0.49 with two and four latent dimensions) the 16-draw bound fitted
#: the training rows and fell below probabilistic PCA; held-out rows gained
#: 0.2-1.3 nats per row with two latent dimensions. On curves and surfaces
#: (below 0.11, iris 0.10-0.12) the held-out rows cost more than they saved
#: (S-curve at 150 rows: -0.3 nats per row), and on digits (1198 rows) the
#: phase did not overfit. Measured in docs/user_guide/mapa.rst ("How long the
#: second phase runs").
REFINE_VALIDATION_BELOW_ROWS = 1000
REFINE_VALIDATION_MIN_NOISE = 0.2
#: Below ``LINEAR_CHECK_BELOW_ROWS`` rows without a low-dimensional
#: structure, globally and locally (``BaseDeepDensity._lacks_structure``),
#: rows are held out of both phases (as many as early stopping would hold
#: out; they are not atoms): each phase keeps its best state on them, and the
#: second judges its start against the linear model on them.
#: The linear check holds rows out below ``LINEAR_CHECK_BELOW_ROWS`` rows,
#: where they also choose the second phase's start (``_linear_if_better``);
#: with two or more latent dimensions below ``LINEAR_CHECK_BELOW_ROWS_2D``,
#: where from ``LINEAR_CHECK_BELOW_ROWS`` on only the fit's fallback to the
#: linear model (``_fall_back_to_linear``) judges on them. Measured in
#: docs/user_guide/mapa.rst ("Never below the linear model"): Gaussian noise
#: in 10-D at 1000-4000 rows had ended 0.01-0.15 nats per row below
#: probabilistic PCA and now ends at it; choosing the start there too cost
#: make_friedman1 (2000 rows) 0.16, and with one latent dimension the held-out
#: rows cost a rank-5 table in 50-D (make_low_rank_matrix, 1000 rows)
#: 0.31-0.53.
LINEAR_CHECK_BELOW_ROWS = 1000
LINEAR_CHECK_BELOW_ROWS_2D = 5000
#: Importance samples per row of the second phase when
#: ``refine_samples='auto'``, by latent dimension (beyond the last entry: the
#: last). With two latent dimensions the MAPA mixture spreads over the 2-D
#: neighbourhood of a row, a region many times wider than its posterior, and
#: a 4-sample bound is loose by an amount that grows as the noise shrinks:
#: the noise stayed 1.8 times the truth on ``make_manifold`` (2-D surface in
#: 10 dimensions; held-out KL 2.28 nats at 4 samples, 0.92 at 16, 0.64 at 64).
REFINE_SAMPLES_AUTO = (4, 16)
#: With ``refine_proposal='auto'`` the importance-weighted second phase's
#: proposal learns each training row's posterior (``RowProposal``) where the
#: first phase left less than this share of the standardized variance to
#: the noise. There the posterior is much narrower than the neighbourhood
#: the MAPA mixture spreads over and the 16-draw bound is loose (0.46 nats
#: per row on a 2-D surface in 10 dimensions): the learnt proposal lowered
#: the surfaces' held-out KL (10-D: 0.50 to 0.46 at 1000 rows, 1.81 to 1.42
#: at 300). With one latent dimension the second phase is the grid wherever
#: this holds, except with one feature (figure1: 0.0101 to 0.0089). On
#: noisier data (iris 0.11, the real tables 0.24-0.49) the MAPA mixture
#: already covers the wide posterior and the tighter bound fitted the
#: training rows instead (iris: -2.44 to -2.84 nats per row, breast cancer
#: -22.3 to -22.5, 5-fold CV). Measured in docs/user_guide/mapa.rst ("A
#: proposal that learns each row's posterior").
REFINE_ADAPTIVE_MAX_NOISE = 0.08
#: Prior quantiles per latent axis of the second phase's grid
#: (``refine_method='grid'``), by latent dimension (one or two: the grid has
#: this many points to the power of it). One decoder pass over them serves
#: every row of a step (256 rows decoded per step with one latent dimension,
#: against 512 for 4 draws of 128 rows). 512 and 256 points gave the same
#: held-out KL on the ``density`` suite's curves.
REFINE_GRID_POINTS = (256, 32)
#: ``refine_method='auto'`` uses the grid (one latent dimension, two or more
#: features) only where the first phase leaves less than this share of the
#: standardized variance to the noise (mean of ``scale**2``). On the real
#: tables of the ``real`` suite (``n_components=1``: 0.11-0.13 on iris,
#: 0.46-0.69 on diabetes, star98, macrodata) the likelihood fitted the
#: training rows more closely than the bound and lost 0.11-0.53 nats per
#: held-out row; on the low-noise curves where it gained, the first phase
#: left 0.005-0.015 at 1000-2000 rows and 0.017-0.105 at 150.
REFINE_GRID_MAX_NOISE = 0.1
#: The kernel of the training rows when ``kernel='auto'``, by latent dimension
#: (beyond the last entry: the last). With two or more latent dimensions the
#: 'noise' refit (neighbours and weights recomputed after the first phase in
#: units of the fitted noise, each row left out of its own weights) sharpens
#: the proposal of both phases: measured in docs/user_guide/mapa.rst
#: ("Which kernel by latent dimension").
KERNEL_AUTO = ("global", "noise")
#: With ``weight_decay='auto'`` the second phase decays the decoder's weight
#: matrices by ``REFINE_WEIGHT_DECAY`` on data near a manifold: fewer latent
#: dimensions than features, and a first phase that left less than
#: ``REFINE_WEIGHT_DECAY_MAX_NOISE`` of the standardized variance to the
#: noise (the learnt proposal's threshold). The first phase does not decay
#: (with one latent dimension, see ``PHASE1_DECAY_MAX_RESIDUAL``), nor the
#: second on noisier or full-dimensional data (blobs with two latent
#: dimensions lost 0.004-0.009 nats per row). Decaying both phases gained
#: more on the surfaces but lost on the 300-row swiss roll, iris and
#: digits; 0.3 lost to 0.1 on the manifold sets. Measured in
#: docs/user_guide/mapa.rst ("Weight decay in the second phase").
REFINE_WEIGHT_DECAY = 0.1
REFINE_WEIGHT_DECAY_MAX_NOISE = 0.08
#: Below this many training rows the decay of ``weight_decay='auto'``, where
#: it applies, is ``REFINE_WEIGHT_DECAY * sqrt(REFINE_WEIGHT_DECAY_ROWS / n)``
#: (0.26 at 150 rows): the fewer the rows, the more the decoder fits their
#: noise. Measured in docs/user_guide/mapa.rst ("Weight decay on few rows"):
#: of the ``zoo`` fits it changes, 25 of 30 did better at 150 rows and 28 of
#: 36 at 300 (the surface in 30-D 8.3 / 7.5 / 8.8 to 7.7 / 7.2 / 8.0 at 150
#: rows; lost on the spiral and make_circles); from this many rows, 0.1.
REFINE_WEIGHT_DECAY_ROWS = 1000
#: With one latent dimension the decay grows the same way below this many
#: rows per feature: ``sqrt(max(REFINE_WEIGHT_DECAY_ROWS, this * D) / n)``
#: (``D`` features). A curve's decoder can bend towards each training row in
#: its ``D - 1`` directions off the curve, so the more features, the more
#: rows it fits the noise of. Measured in docs/user_guide/mapa.rst
#: ("Weight decay and the number of features"): held-out KL of curves
#: (``make_manifold``) in 50 dimensions fell 1.26 to 1.06 at 300 rows and
#: by 0.028 nats per row at 1000 (seven seeds, 6 of 7 gained), in 100
#: dimensions 0.84 to 0.76 at 1000 rows (6 of 6); in 20 and 30 dimensions
#: (where it barely applies) within 0.001; the same decay held on at 3000
#: rows in 50 dimensions lost 0.012.
DECAY_ROWS_PER_FEATURE_1D = 100
#: With one latent dimension and ``weight_decay='auto'`` the first phase
#: decays by ``REFINE_WEIGHT_DECAY`` too (and so does the second) where the
#: rows lie near a densely sampled curve: ``local_residual_``, the variance
#: of the neighbourhoods off a local line per remaining direction, is below
#: this. Measured in docs/user_guide/mapa.rst ("Weight decay in the first
#: phase"): on curves (0.001-0.026 at 300-3000 rows) held-out KL fell up
#: to 7% at 1000 rows and 10-30% at 150-300 rows; where the rows are sparse
#: for their curvature (spiral at 150 rows, 0.05) or away from a curve
#: (iris 0.054, diabetes 0.24, star98 0.23, macrodata 0.30) the decay lost.
#: With one feature (a univariate density) both phases decay too: over six
#: families of densities, 150 and 1000 rows, three seeds, it lowered the
#: held-out KL in 22 of 36 fits (mean 0.076 to 0.059 at 150 rows, 0.017 to
#: 0.0085 at 1000), lost on a two-Gaussian mixture (up to 0.005).
PHASE1_DECAY_MAX_RESIDUAL = 0.03
#: With this many latent dimensions or more, ``weight_decay='auto'`` decays
#: both phases (``_auto_decay()``) wherever it would not. Each row's posterior
#: spans its neighbours' codes, spread as ``(k / N)^(1/d)`` of the prior's
#: scale, and the first phase fits each of them to the row; the decay holds
#: the decoder back as the IWAE's encoder holds its own. Held-out nats per
#: row, 0.1 in both phases against none: eight latent dimensions gained on
#: 9 of 9 fits (digits, 3-fold, +0.57 to +0.61 per image; breast cancer
#: +0.18 / +0.50; make_classification, 8 informative of 20 features, +0.05 /
#: +0.13; the surface in 30-D +0.51 / +0.11), six on 4 of 6 (digits +0.27 /
#: +0.92, breast cancer -0.14 / +0.92, the surface +0.07 / -0.11; mean
#: +0.32), four were mixed (digits -0.08 / +0.17; 5-fold CV diabetes +0.04,
#: star98 -0.15, macrodata -0.03: mean -0.01) and two lost (digits -0.5).
#: Measured in docs/user_guide/mapa.rst ("High-dimensional data").
DECAY_MIN_COMPONENTS = 6


@fill_doc
class MAPADensity(BaseDeepDensity):
    """Density estimator trained with a model-agnostic posterior approximation.

    MAPA (Yacoby, Pan & Doshi-Velez, 2024) approximates the posterior of the
    empiricalized model, whose prior is the empirical distribution of the
    training codes, from the data alone::

        q(m | x) = softmax_m(-||x - x_m||^2 / (2 bandwidth^2))

    over the ``n_neighbors`` nearest training rows ``x_m``. It is computed once,
    before training, and never changes: only the generative model (decoder,
    noise scale and the codes ``z_m``) is trained, first on the MAPA bound of
    the empiricalized model (one decoder pass per atom, no encoder), then,
    optionally, on an importance-weighted bound of the continuous model whose
    proposal is the MAPA mixture over the neighbours' codes.

    The fitted estimator keeps its (standardized) training data: the
    neighbour index, ``transform`` and the scoring proposal need it. Its size
    grows with the data, and a saved model discloses the training rows.

    Parameters
    ----------
    n_neighbors : 'auto' or int, default='auto'
        Neighbours in the MAPA posterior (an int is reduced, with a warning,
        when there are fewer training rows). 'auto' is 20, or 10 where the
        20-row neighbourhoods span the curvature of the data rather than its
        noise: where their variance off a local fit of ``n_components``
        dimensions (``local_residual_``) is more than 1/0.35 times that of
        the 10-row ones (``NEIGHBORS_CURVATURE_RATIO``; with up to four
        latent dimensions), as on a sparsely sampled curve or surface (a few
        hundred rows, little noise);
        ``n_neighbors_`` holds the value used.
    bandwidth : 'auto' or float, default='auto'
        Kernel width ``tau`` in the standardized space (``kernel='global'``,
        and for new rows with every kernel but 'perplexity'). 'auto' is the
        mean distance to the nearest neighbours (self excluded), floored at
        1e-3; the value used is ``bandwidth_``.
    refine_iter : 'auto' or int, default='auto'
        Budget of the second phase (importance-weighted bound with the MAPA
        mixture as proposal, MAPA still fixed): 'auto' is at most 1000
        optimizer steps (where the phase decays the decoder's weights,
        ``weight_decay_ > 0``, 256 passes over the rows, at least 1000 and
        at most 2000 steps); with one latent dimension 128 passes over the
        rows (256 where the phase decays), at least 1000 and at most 3000
        steps (without decay 1000 up to 1000 rows, 3000 from about 2350),
        and with 5000 rows or more and no
        ``early_stopping`` it holds ``validation_fraction`` of the rows (at
        most 2000) out of this phase (they stay atoms of the first) and
        keeps the state with the best held-out bound
        (``validation_scores_``). With more latent dimensions it holds
        rows out the same way (at most 1000 steps) on fewer than 1000 rows
        where the first phase left at least 20% of the standardized
        variance to the noise (small noisy tables, where the phase
        otherwise fits the training rows). An int is a number of epochs on
        all rows; 0 skips the phase. The phase ends with an exponential
        moving average of the decoder's parameters over its steps (about
        its last 100), and held-out rows judge that average.
    refine_samples : 'auto' or int, default='auto'
        Importance samples per row in the second phase (each one decoder
        pass). 'auto' is 4 with ``n_components=1`` and 16 with more latent
        dimensions, where a 4-sample bound with the MAPA proposal is loose
        and overestimates the noise; the value used is ``refine_samples_``.
        Not used by ``refine_method='grid'``.
    refine_method : {'auto', 'importance', 'grid'}, default='auto'
        The estimate of log p(x) that the second phase maximises.
        'importance': the importance-weighted bound with ``refine_samples``
        draws per row from the MAPA mixture. 'grid' (one or two latent
        dimensions): a lattice of prior quantiles (``REFINE_GRID_POINTS``
        per axis) shifted together at random each step, one decoder pass
        shared by every row: the continuous model's likelihood itself,
        without a bound's gap. 'auto' is 'grid' with one latent dimension,
        at least two features and a first phase that left less than 10% of
        the standardized variance to the noise, and 'importance' otherwise
        (the grid measured worse with one feature, with two latent
        dimensions and on noisy tables); the value used is
        ``refine_method_``. See :ref:`mapa_formulation`.
    learn_codes : bool, default=True
        Train the codes ``z_m`` in the first phase (re-matched to the prior
        after every epoch); False keeps their a-priori initialisation.
    kernel : {'auto', 'global', 'perplexity', 'noise', 'denoised'}, default='auto'
        How the MAPA weights of the training rows are computed. 'global':
        one ``bandwidth`` for all rows. 'perplexity': a bandwidth per
        training row, calibrated so that its MAPA posterior spreads over
        ``perplexity`` effective neighbours (as t-SNE calibrates its
        kernel); new rows use the median of those bandwidths
        (``bandwidth_``). 'noise' and 'denoised' recompute the training
        rows' neighbours and weights after the first phase and run it
        again (twice its cost): 'noise' in units of the fitted noise scale,
        with ``tau_j^2 = 2 sigma_j^2``, each row left out of its own
        weights (its distance to itself is 0 while the others carry two
        rows' noise); 'denoised' between the decoder means of the codes,
        with the 'auto' bandwidth there. New rows keep the a-priori
        ``bandwidth_``. 'auto' is 'global' with ``n_components=1`` and
        'noise' with more latent dimensions, where it lowered the held-out
        KL on 2-D surfaces by 34-47 %; the value used is ``kernel_``. See
        :ref:`mapa_formulation`.
    perplexity : float, default=10.0
        Target effective number of neighbours with ``kernel='perplexity'``
        (at most ``n_neighbors``; calibrated on the kernel alone, before the
        atoms' ``sample_weight``).
    refine_proposal : {'auto', 'mapa', 'adaptive'}, default='auto'
        The proposal of the importance-weighted second phase. 'mapa': the
        MAPA mixture over the codes of the row's neighbours, mixed with the
        prior. 'adaptive': that mixture and, at equal weight, a Gaussian per
        training row that learns the row's posterior from the draws the
        bound has already weighted (no extra decoder pass): a tighter bound
        where the posterior is much narrower than the neighbourhood. MAPA's
        weights and first phase are unchanged, and new rows are scored as
        before. 'auto' is 'adaptive' where the first phase left less than
        8% of the standardized variance to the noise (surfaces: held-out KL
        0.50 to 0.46 in 10-D at 1000 rows; with one latent dimension that
        is one-feature data, elsewhere the second phase is the grid), and
        'mapa' otherwise (on noisier small tables the tighter bound fitted
        the training rows: iris lost 0.4 nats per row). The value used is
        ``refine_proposal_`` ('mapa' wherever the second phase is not
        'importance'). See :ref:`mapa_formulation`.
%(common_parameters)s

    Attributes
    ----------
%(common_attributes)s
    codes_ : torch.Tensor of shape (n_atoms, n_components)
        The code of each training row (the atoms of the empirical prior),
        distributed as N(0, I).
    bandwidth_ : float
        The MAPA bandwidth used.
    kernel_ : str
        The kernel of the training rows (``kernel`` resolved).
    refine_samples_ : int
        Importance samples per row of the second phase (``refine_samples``
        resolved).
    refine_method_ : str
        The second phase's estimate (``refine_method`` resolved).
    refine_proposal_ : str
        The second phase's proposal (``refine_proposal`` resolved).
    init_scores_ : dict or None
        The score of a trial phase-1 run from each candidate initialisation
        of the codes (with ``max_iter='auto'``: 400 steps with
        ``n_components=1``, 1600 on more than 6400 rows; the whole first
        phase with more), by name: 'spectral' (spectral embedding of the
        MAPA graph), 'angle' (``n_components=1``: angle of the 2-D spectral
        embedding), 'spectral-1d' (``n_components >= 2``: the spectral
        codes' first coordinate, the others drawn from the prior),
        'angle-1d' (``n_components >= 2``: the angle of the spectral codes'
        first two coordinates, the others drawn from the prior) and 'pca'
        (``init='auto'`` or 'pca': principal components); on a disconnected
        neighbour graph 'components', 'components-angle' and
        'components-1d' replace 'spectral', 'angle' and 'spectral-1d' (the
        same embeddings of each connected component, the components laid
        out side by side in the prior; no 'angle-1d' there); on a connected
        graph of 150 rows or more whose mutual k-NN graph splits, also
        'pieces', 'pieces-angle' and 'pieces-1d' (the same, per piece of the
        mutual graph). The score is
        the negative MAPA bound with ``n_components=1``, and with more the
        negative estimated log-likelihood per row of the continuous model (a
        64-draw importance-weighted bound on up to 1000 training rows,
        standardized units). The lowest is kept. None when there was one
        candidate, or no budget (``max_iter=0``) to compare them.
    refine_start_ : {'first phase', 'linear'}
        Where the second phase started. Where it holds rows out (small noisy
        data, ``early_stopping``) and ``init='auto'``, it starts from the
        linear special case (probabilistic PCA, the codes its posterior
        means) if that scores better on the held-out rows than the first
        phase's fit (scored by the better of the continuous model's
        held-out bound and its atoms'). Below 1000 rows without a
        low-dimensional structure within the pieces of the neighbour graph
        (each piece standardized on its own, probabilistic PCA leaves at
        least 0.9 of what it leaves on Gaussian noise of the piece's size to
        the noise, and the neighbourhoods' local residual is at least 0.2:
        noise, or clusters of noise) those rows are held out of both phases,
        so that the check is fair, and each phase keeps its best state on
        them (``validation_scores_`` then holds both phases' held-out
        bounds). With two or more latent dimensions such rows are held out
        up to 5000 rows; from 1000 rows on they judge only the end of the
        fit (``linear_fallback_``).
    n_graph_components_ : int
        Connected components of the symmetrised neighbour graph of the
        training rows (1: connected).
    n_neighbors_ : int
        The number of neighbours used (``n_neighbors='auto'`` resolved).
    local_residual_ : float or None
        The variance of the training rows' neighbourhoods off a local fit of
        ``n_components`` dimensions (their principal components), per
        remaining direction, in standardized units, averaged over up to 1000
        rows: small near a densely sampled manifold of that dimension (with
        ``n_neighbors='auto'``, of the 20-row neighbourhoods). With
        one latent dimension, below 0.03 the first phase decays the
        decoder's weights too (``weight_decay='auto'``; so it does with one
        feature). None with as many latent dimensions as features.
    X_fit_ : ndarray of shape (n_atoms, n_features)
        The standardized training rows with positive weight.

    See Also
    --------
    VAEDensity, IWAEDensity : Jointly trained encoder baselines.

    Examples
    --------
    >>> from skmapa import MAPADensity
    >>> from skmapa.datasets import make_spiral
    >>> data = make_spiral(500, random_state=0)
    >>> est = MAPADensity(n_components=1, max_iter=20, refine_iter=5,
    ...                   random_state=0).fit(data.X)
    >>> est.transform(data.X[:2]).shape
    (2, 1)
    >>> est.score_samples(data.X[:3]).shape
    (3,)
    >>> est.codes_.shape  # one code per training row, distributed as N(0, 1)
    torch.Size([500, 1])
    """

    _parameter_constraints = {
        **BaseDeepDensity._parameter_constraints,
        "n_neighbors": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "bandwidth": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
        "refine_iter": [StrOptions({"auto"}), Interval(Integral, 0, None, closed="left")],
        "refine_samples": [StrOptions({"auto"}),
                           Interval(Integral, 1, None, closed="left")],
        "refine_method": [StrOptions({"auto", "importance", "grid"})],
        "learn_codes": ["boolean"],
        "kernel": [StrOptions({"auto", "global", "perplexity", "noise", "denoised"})],
        "perplexity": [Interval(Real, 1, None, closed="left")],
        "refine_proposal": [StrOptions({"auto", "mapa", "adaptive"})],
    }

    def __init__(
        self,
        *,
        n_neighbors="auto",
        bandwidth="auto",
        refine_iter="auto",
        refine_samples="auto",
        refine_method="auto",
        learn_codes=True,
        kernel="auto",
        perplexity=10.0,
        refine_proposal="auto",
        n_components=2,
        hidden_layer_sizes=(64, 64),
        activation="tanh",
        batch_size="auto",
        learning_rate_init=1e-3,
        weight_decay="auto",
        init="auto",
        max_iter="auto",
        tol=1e-4,
        early_stopping="auto",
        validation_fraction=0.1,
        n_iter_no_change=10,
        warm_start=False,
        score_method="auto",
        n_eval_samples=1024,
        random_state=None,
        verbose=0,
        device="auto",
        n_threads="auto",
        dtype="auto",
    ):
        super().__init__(
            n_components=n_components,
            hidden_layer_sizes=hidden_layer_sizes,
            activation=activation,
            batch_size=batch_size,
            learning_rate_init=learning_rate_init,
            weight_decay=weight_decay,
            init=init,
            max_iter=max_iter,
            tol=tol,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            n_iter_no_change=n_iter_no_change,
            warm_start=warm_start,
            score_method=score_method,
            n_eval_samples=n_eval_samples,
            random_state=random_state,
            verbose=verbose,
            device=device,
            n_threads=n_threads,
            dtype=dtype,
        )
        self.n_neighbors = n_neighbors
        self.bandwidth = bandwidth
        self.refine_iter = refine_iter
        self.refine_samples = refine_samples
        self.refine_method = refine_method
        self.learn_codes = learn_codes
        self.kernel = kernel
        self.perplexity = perplexity
        self.refine_proposal = refine_proposal

    @property
    def _train_draws(self):
        return self._refine_samples()

    def _by_latent_dimension(self, table):
        """The entry of ``table`` for ``n_components`` (beyond its end: the last)."""
        return table[min(self.n_components, len(table)) - 1]

    def _refine_samples(self):
        """``refine_samples`` resolved: 'auto' by ``REFINE_SAMPLES_AUTO``."""
        if self.refine_samples != "auto":
            return int(self.refine_samples)
        return self._by_latent_dimension(REFINE_SAMPLES_AUTO)

    def _check_params(self, X):
        super()._check_params(X)
        if self.refine_method == "grid" and self.n_components > len(REFINE_GRID_POINTS):
            raise ValueError(
                f"refine_method='grid' needs n_components <= {len(REFINE_GRID_POINTS)} "
                f"(the grid grows as a power of it), got n_components={self.n_components}.")

    def _refine_method(self, n_features, noise_variance):
        """``refine_method`` resolved: 'auto' is 'grid' with one latent
        dimension, two or more features and a first phase that left less
        than ``REFINE_GRID_MAX_NOISE`` of the (standardized) variance to the
        noise, else 'importance'."""
        if self.refine_method != "auto":
            return self.refine_method
        grid = (self.n_components == 1 and n_features >= 2
                and noise_variance < REFINE_GRID_MAX_NOISE)
        return "grid" if grid else "importance"

    def _refine_proposal(self, noise_variance):
        """``refine_proposal`` resolved ('mapa' without the importance-weighted
        second phase): 'auto' is 'adaptive' where the first phase left less
        than ``REFINE_ADAPTIVE_MAX_NOISE`` of the standardized variance to
        the noise, else 'mapa'."""
        if self.refine_method_ != "importance":
            return "mapa"
        if self.refine_proposal != "auto":
            return self.refine_proposal
        return "adaptive" if noise_variance < REFINE_ADAPTIVE_MAX_NOISE else "mapa"

    # ------------------------------------------------------------------
    # the a-priori part: neighbours, weights, statistics, codes
    # ------------------------------------------------------------------
    def _kernel(self):
        """``kernel`` resolved: 'auto' by latent dimension (``KERNEL_AUTO``)."""
        if self.kernel != "auto":
            return self.kernel
        return self._by_latent_dimension(KERNEL_AUTO)

    def _network_specs(self, n_features):
        sizes = tuple(int(s) for s in self.hidden_layer_sizes)
        return {
            "decoder_": (GaussianDecoder, self.n_components, n_features, sizes,
                         self.activation)
        }

    def _initialize(self, data, generator):
        self.decoder_ = build(
            GaussianDecoder, generator, *self._network_specs(data.X.shape[1])["decoder_"][1:]
        ).to(device=self.device_, dtype=self._torch_dtype)
        self._set_atoms(data, generator)

    def _warm_start(self, data, generator):
        # new atoms start from the codes that ``transform`` gives them
        self._set_atoms(data, generator, codes=self.transform(
            data.X.double().cpu().numpy() * self.scale_ + self.mean_))

    def _set_atoms(self, data, generator, codes=None):
        """The a-priori part: neighbours, MAPA weights, bandwidth and codes."""
        X = data.X.double().cpu().numpy()
        w = data.weights.double().cpu().numpy()
        keep = w > 0
        X, w = X[keep], w[keep]
        n = X.shape[0]
        auto = self.n_neighbors == "auto"
        k = NEIGHBORS_AUTO[-1] if auto else self.n_neighbors
        if k > n:
            if not auto:
                warnings.warn(
                    f"n_neighbors={k} is larger than the number of training rows "
                    f"with positive weight ({n}); using n_neighbors={n}.",
                    UserWarning,
                )
            k = n
        self.kernel_ = self._kernel()
        self.X_fit_ = X
        self.atom_log_prior_ = np.log(w / w.sum())
        self.neighbors_ = _mapa.fit_neighbors(X)
        dist, idx = _mapa.kneighbors(self.neighbors_, X, k)
        self.local_residual_ = _mapa.local_residual(X, idx, self.n_components, w)
        if auto:
            k = self._auto_neighbors(X, idx, w)
            dist, idx = dist[:, :k], idx[:, :k]
        self.n_neighbors_ = k
        self._progress(f"a priori: neighbour index over {n} rows, {k} neighbours each")
        self.bandwidth_ = (
            _mapa.auto_bandwidth(dist) if self.bandwidth == "auto" else float(self.bandwidth)
        )
        row_bandwidths = self.bandwidth_
        if self.kernel_ == "perplexity":
            row_bandwidths = _mapa.perplexity_bandwidths(dist, self.perplexity)
            self.bandwidth_ = float(np.median(row_bandwidths))
        log_q = _mapa.mapa_log_weights(dist, idx, row_bandwidths, self.atom_log_prior_)
        rng = check_random_state(int(torch.randint(2**31 - 1, (), generator=generator)))
        self._rng = rng
        self._train_stats = (idx, log_q, w)
        n_graph, labels = _mapa.graph_components(idx)
        self.n_graph_components_ = int(n_graph)
        # the second phase's, where there is one, replaces it
        self.weight_decay_ = self._phase1_weight_decay()
        if codes is not None:
            candidates = {"given": codes[keep]}
        else:
            candidates = self._graph_candidates(X, idx, log_q, labels, w, rng)
            if self.init in ("auto", "pca"):
                candidates["pca"] = _mapa.pca_codes(X, w, self.n_components, rng)
        self._progress(f"a priori: matching {len(candidates)} candidate code sets "
                       "to the prior")
        candidates = {
            name: _mapa.match_prior(c, w, rng, _mapa.INIT_ROTATIONS)
            for name, c in candidates.items()
        }
        self.init_scores_ = None
        self.refine_start_ = "first phase"
        trained = None
        if len(candidates) > 1 and self._trial_steps() > 0:
            best, trained = self._best_initialisation(candidates, w, generator)
        else:
            best = next(iter(candidates))
        self._start_from(candidates[best], w, linear=codes is None)
        # phase-1 steps already taken: with a step budget, phase 1 goes on
        # from the winner's trial run instead of repeating it
        self._phase1_steps_done = 0
        if trained is not None:
            decoder_state, self.codes_ = trained
            self.decoder_.load_state_dict(decoder_state)
            self._phase1_steps_done = self._trial_steps()

    def _auto_neighbors(self, X, idx, w):
        """``n_neighbors='auto'``: the narrower of ``NEIGHBORS_AUTO`` where the
        wide neighbourhoods ``idx`` (their local residual ``local_residual_``)
        span the data's curvature, i.e. the narrow ones' residual is below
        ``NEIGHBORS_CURVATURE_RATIO`` times it (and they leave at least
        ``NEIGHBORS_MIN_DOF`` degrees of freedom); else the wider."""
        narrow, wide = NEIGHBORS_AUTO[0], idx.shape[1]
        if (wide <= narrow or self.local_residual_ is None
                or narrow - 1 - self.n_components < NEIGHBORS_MIN_DOF):
            return wide
        near = _mapa.local_residual(X, idx[:, :narrow], self.n_components, w)
        if near is None or near >= NEIGHBORS_CURVATURE_RATIO * self.local_residual_:
            return wide
        return narrow

    def _graph_candidates(self, X, idx, log_q, labels, w, rng):
        """Candidate codes from the MAPA graph: its spectral embedding (and, for
        one latent dimension, the angle of the 2-D one); on a disconnected
        graph the same embeddings per component, laid out side by side; on a
        connected one whose mutual graph falls in pieces (from
        ``PIECES_MIN_ROWS`` rows), also the same per piece."""
        d, n = self.n_components, X.shape[0]
        within = ["spectral"] + (["angle"] if d == 1 and n > 3 else [])

        def laid_out(prefix, parts):
            # each part embedded on its own, the parts side by side in the prior
            return {prefix + ("" if name == "spectral" else f"-{name}"):
                    _mapa.component_codes(X, idx, log_q, parts, d, rng, within=name,
                                          weights=w)
                    for name in within}

        def sizes_text(parts):
            sizes = sorted(np.bincount(parts), reverse=True)
            return (f"{len(sizes)} {{}} (rows: " + ", ".join(str(s) for s in sizes[:8])
                    + (", ..." if len(sizes) > 8 else "") + ")")

        if self.n_graph_components_ > 1:
            self._progress(
                f"a priori: bandwidth {self.bandwidth_:.4g}; the neighbour graph has "
                + sizes_text(labels).format("connected components")
                + ": embedding each one and laying them out side by side in the prior")
            return self._with_first_coordinate(laid_out("components", labels), rng)
        self._progress(f"a priori: bandwidth {self.bandwidth_:.4g}; spectral embedding "
                       "of the MAPA graph")
        candidates = {name: _mapa._WITHIN[name](X, idx, log_q, d, rng) for name in within}
        # from ``PIECES_MIN_ROWS`` rows: on iris (120) the pieces were picked
        # and lost held-out likelihood
        pieces = (_mapa.mutual_pieces(idx, self.n_neighbors_)
                  if n >= PIECES_MIN_ROWS else None)
        if pieces is not None:
            self._progress("a priori: the mutual neighbours fall in "
                           + sizes_text(pieces).format("pieces")
                           + ": also each piece embedded on its own, side by side")
            candidates.update(laid_out("pieces", pieces))
        return self._with_first_coordinate(candidates, rng)

    def _with_first_coordinate(self, candidates, rng):
        """With more than one latent dimension, each graph candidate also
        with its first coordinate only, the others drawn from the prior
        (``_mapa.first_coordinate_codes``), as '<name>-1d'; on a connected
        graph also the angle of the spectral embedding's first two
        coordinates (the 'angle' start of one latent dimension), as
        'angle-1d'."""
        d = self.n_components
        if d == 1:
            return candidates
        out = dict(candidates)
        for name, codes in candidates.items():
            out[f"{name}-1d"] = _mapa.first_coordinate_codes(codes[:, 0], d, rng)
        if "spectral" in candidates:
            # where the graph is connected through a narrow bridge (two moons
            # at 10^4 rows) the first spectral coordinate is nearly the piece
            # indicator, its spread along each piece small enough for the
            # joint matching to the prior to scramble; the angle goes along
            # both
            out["angle-1d"] = _mapa.first_coordinate_codes(
                _mapa.embedding_angle(candidates["spectral"]), d, rng)
        return out

    def _start_from(self, codes, w, linear):
        """Set the codes and, with ``init='pca'``, the decoder's linear start."""
        self.codes_ = torch.as_tensor(codes, device=self.device_).to(self._torch_dtype)
        if linear and self.init in ("auto", "pca"):
            start = regression_start(codes, self.X_fit_, w)
            self.decoder_.init_linear(start.weight, start.mean, np.sqrt(start.noise_var))

    def _trial_steps(self):
        """Steps of each candidate's trial run: with a step budget, for one
        latent dimension ``INIT_TRIAL_STEPS`` (400), or
        ``INIT_TRIAL_LARGE_STEPS`` (1600) on more than
        ``INIT_TRIAL_LARGE_ROWS`` (6400) atoms, and the whole first phase
        (``AUTO_MAX_STEPS``, ended by convergence) for more; with an epoch
        budget, at most ``INIT_TRIAL_STEPS`` and the budget (none with
        ``max_iter=0``)."""
        if self.max_iter == "auto":
            if self.n_components > 1:
                return AUTO_MAX_STEPS
            return (_mapa.INIT_TRIAL_LARGE_STEPS
                    if self.X_fit_.shape[0] > _mapa.INIT_TRIAL_LARGE_ROWS
                    else _mapa.INIT_TRIAL_STEPS)
        n_atoms = self.X_fit_.shape[0]
        return min(_mapa.INIT_TRIAL_STEPS,
                   self.max_iter * -(-n_atoms // self._batch_size(n_atoms)))

    def _best_initialisation(self, candidates, w, generator):
        """The name of the candidate codes whose phase-1 run reaches the best
        bound, and (with a step budget) the decoder state and codes that run
        ended with, else None.

        Model-agnostic (the MAPA bound itself decides): each trial is
        ``_trial_steps()`` optimizer steps from the same decoder
        initialisation (plus, with ``init='pca'``, the candidate's linear
        start), ended early where the convergence rule fires for it; its score
        is the mean bound of its last three rounds. The candidates train
        together, as one ``StackedDecoders`` on the same minibatches of atoms
        (each with its own codes, gradient clipping and convergence), which
        costs about two thirds of training them one after the other; their
        decoder passes count in ``n_row_passes_``.
        """
        decoder = self.decoder_
        decoder_init = {k: v.clone() for k, v in decoder.state_dict().items()}
        names = list(candidates)
        starts, codes = [], []
        for name in names:
            decoder.load_state_dict(decoder_init)
            self._start_from(candidates[name], w, linear=True)
            starts.append(copy.deepcopy(decoder))
            codes.append(self.codes_)
        decoder.load_state_dict(decoder_init)
        stacked = StackedDecoders(starts)
        n_atoms = codes[0].shape[0]
        saved = (self.loss_curve_, self.n_iter_, self.validation_scores_)
        self.loss_curve_, self.n_iter_, self.validation_scores_ = [], 0, None
        self.decoder_, self.codes_ = stacked, torch.cat(codes)
        stage = self._phase1_stage("auto", name="mapa-init[" + ", ".join(names) + "]",
                                   max_steps=self._trial_steps())
        ended = {}

        def model_state(c):
            return (stacked.model_state(c),
                    self.codes_.detach()[c * n_atoms:(c + 1) * n_atoms].clone())

        def model_converged(c):
            ended[c] = (np.mean(stage.round_losses[-3:], axis=0)[c], model_state(c))

        stage.model_converged = model_converged
        stage.set_active = stacked.set_active
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                self._run_stage(stage, generator)
        finally:
            self.decoder_ = decoder
            decoder.mean_net.rows_forward += stacked.rows_forward
            self.loss_curve_, self.n_iter_, self.validation_scores_ = saved
        last = (np.mean(stage.round_losses[-3:], axis=0) if stage.round_losses
                else np.zeros(len(names)))
        states = {name: ended[c][1] if c in ended else model_state(c)
                  for c, name in enumerate(names)}
        if self.n_components > 1:
            # the whole first phase ran: the continuous model decides
            scores = self._likelihood_scores(states)
            # (with an epoch budget the winner trains again from the start)
            decoder.load_state_dict(decoder_init)
            what = "estimated log-likelihood per row (negated)"
        else:
            scores = {name: float(ended[c][0] if c in ended else last[c])
                      for c, name in enumerate(names)}
            what = "bounds"
        self.init_scores_ = scores
        best = min(scores, key=scores.get)
        self._progress(f"a priori: candidate {what} " + ", ".join(
            f"{name} {value:.4f}" for name, value in scores.items()) + f"; keeping {best}")
        return best, (states[best] if self.max_iter == "auto" else None)

    def _likelihood_scores(self, states):
        """Minus each candidate's estimated log-likelihood per training row.

        ``states``: name -> (decoder state, codes) at the end of its first
        phase. The MAPA bound cannot tell these apart: it scores the decoder
        at the atoms only, and a 2-D prior folded onto a curve (the graph's
        2-D embedding of two moons) fits the atoms as well as a curve's codes
        do while the continuous model puts its mass in lumps along the fold.
        The estimate is the second phase's importance-weighted bound with
        ``SELECTION_DRAWS`` draws per row on up to ``INIT_SELECTION_ROWS``
        training rows (the same rows and draws for every candidate).
        """
        idx, log_q, w = self._train_stats
        n = len(w)
        rows = (np.sort(self._rng.choice(n, INIT_SELECTION_ROWS, replace=False))
                if n > INIT_SELECTION_ROWS else np.arange(n))
        device, dtype = self.device_, self._torch_dtype
        x = torch.as_tensor(self.X_fit_[rows], device=device).to(dtype)
        idx_t = torch.as_tensor(idx[rows], device=device)
        log_q_t = torch.as_tensor(log_q[rows], device=device).to(dtype)
        weights = w[rows] / w[rows].sum()
        width = max([*map(int, self.hidden_layer_sizes), x.shape[1]])
        # the proposal: the row's neighbours and the prior
        chunk = importance_chunk_rows(SELECTION_DRAWS, idx.shape[1] + 1, self.n_components,
                                      width, device)
        generator = torch.Generator()
        scores = {}
        with torch.no_grad():
            for name, (state, codes) in states.items():
                self.decoder_.load_state_dict(state)
                self.codes_ = codes
                self._update_atom_scales()
                generator.manual_seed(0)
                lp = torch.cat([
                    self._importance_bound(x[i:i + chunk], idx_t[i:i + chunk],
                                           log_q_t[i:i + chunk], SELECTION_DRAWS, generator)
                    for i in range(0, len(rows), chunk)])
                scores[name] = -float(weights @ lp.double().cpu().numpy())
        return scores

    def _neighbour_proposal(self, Xs):
        """MAPA over each row's neighbours: (idx tensor, log q tensor)."""
        dist, idx = _mapa.kneighbors(
            self.neighbors_, Xs.double().cpu().numpy(), self.n_neighbors_
        )
        log_q = _mapa.mapa_log_weights(dist, idx, self.bandwidth_, self.atom_log_prior_)
        return (
            torch.as_tensor(idx, device=self.device_),
            torch.as_tensor(log_q, device=self.device_).to(self._torch_dtype),
        )

    # ------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------
    def _phase1_stage(self, max_iter, data=None, name="mapa", max_steps=None):
        """The decoder-only MAPA bound, regrouped by atom (one pass per atom)."""
        dtype, device = self._torch_dtype, self.device_
        idx, log_q, w = self._train_stats
        X = self.X_fit_
        wbar, xbar, spread = _mapa.neighbour_statistics(X, idx, log_q, w)
        n_atoms = X.shape[0]
        total_w = float(w.sum())
        t = lambda a: torch.as_tensor(a, device=device).to(dtype)  # noqa: E731
        wbar_t, xbar_t, spread_t = t(wbar), t(xbar), t(spread)
        # constant of the bound: entropy of q and the log prior of the atoms
        q = np.exp(log_q)
        const = float(
            np.sum(w * np.sum(q * (self.atom_log_prior_[idx] - log_q), axis=1)) / total_w
        )
        codes = torch.nn.Parameter(self.codes_.detach().to(device=device, dtype=dtype),
                                   requires_grad=self.learn_codes)
        self.codes_ = codes
        decoder = self.decoder_
        log2pi = 0.5 * X.shape[1] * math.log(2 * math.pi)

        # Sparse gradients for the codes: a step updates the batch's codes
        # only (SparseAdam), O(batch) instead of O(n_atoms). MPS has no sparse
        # tensors: there the codes train with dense Adam, as the decoder does.
        # So do a few atoms, where SparseAdam's bookkeeping costs more than
        # the dense update.
        sparse_codes = (self.learn_codes and device.type != "mps"
                        and n_atoms > SPARSE_CODES_MIN_ATOMS)

        # stacked candidate starts (StackedDecoders): one block of atoms per
        # model in ``codes``; the loss is the sum of the models' losses, the
        # report one value per model
        n_models = getattr(decoder, "n_models", 1)
        offsets = (torch.arange(n_models, device=device)[:, None] * n_atoms
                   if n_models > 1 else 0)

        def phase1_loss(batch, generator):
            # only the stacked models still training (StackedDecoders.active)
            active = getattr(decoder, "active", None)
            f = decoder(torch.nn.functional.embedding(
                batch + (offsets if active is None else offsets[active]),
                codes, sparse=sparse_codes))
            # minus the expected log-likelihood of the batch's atoms: the
            # residuals are summed over the batch before they meet the noise
            # (fewer batch-sized operations per step)
            log_scale = torch.log(decoder.scale).reshape(*f.shape[:-2], -1)
            diff = xbar_t[batch] - f
            resid = (wbar_t[batch, None] * diff * diff).sum(-2)
            loss = ((0.5 / total_w)
                    * ((resid * (n_atoms / batch.numel()) + spread_t)
                       * torch.exp(-2 * log_scale)).sum(-1)
                    + log_scale.sum(-1) + log2pi)
            if n_models == 1:
                return loss, loss.detach() - const
            report = loss.detach() - const
            if active is not None:
                report = torch.full((n_models,), math.nan, dtype=report.dtype,
                                    device=report.device).index_copy_(0, active, report)
            return loss.sum(), report

        return TrainingStage(
            name,
            n_atoms,
            phase1_loss,
            list(decoder.parameters()) + ([codes] if self.learn_codes and not sparse_codes
                                          else []),
            max_iter,
            self._validation_phase1(data) if data is not None else None,
            after_epoch=self._rematch_codes if self.learn_codes else None,
            sparse_parameters=[codes] if sparse_codes else [],
            max_steps=max_steps or AUTO_MAX_STEPS,
            n_models=n_models,
            weight_decay=self._phase1_weight_decay(),
        )

    def _training_stages(self, data):
        """The stages in order: a generator, since the later ones are built
        from the state the earlier ones leave (the kernel refit; the rows the
        second phase holds out are drawn after the first phase's draws)."""
        yield from self._first_phase1(data)
        if self.kernel_ in ("noise", "denoised"):
            self._refit_kernel()
            yield self._phase1_stage(self.max_iter, data, name="mapa-rekernel")
        yield from self._last_stages(data)

    def _first_phase1(self, data):
        """The first phase-1 stage, as a list. With a step budget it goes on
        from the winning candidate's trial run, whose steps count towards
        ``AUTO_MAX_STEPS``; none when that run used the whole budget."""
        steps = AUTO_MAX_STEPS - self.__dict__.pop("_phase1_steps_done", 0)
        if self.max_iter == "auto" and steps <= 0:
            return []
        return [self._phase1_stage(self.max_iter, data, max_steps=steps)]

    def _last_stages(self, data):
        self.refine_samples_ = self._refine_samples()
        with torch.no_grad():
            noise_variance = float(torch.mean(self.decoder_.scale ** 2))
        self.refine_method_ = self._refine_method(self.X_fit_.shape[1], noise_variance)
        self.refine_proposal_ = self._refine_proposal(noise_variance)
        if self.refine_iter != 0:
            self.weight_decay_ = self._refine_weight_decay(noise_variance)
            self._progress(f"second phase: refine_method='{self.refine_method_}', "
                           f"refine_proposal='{self.refine_proposal_}' (the first "
                           f"phase left {noise_variance:.3g} of the variance to the noise)")
        idx, log_q, w = self._train_stats
        del self._train_stats
        return ([self._refine_stage(data, idx, log_q, w, noise_variance)]
                if self.refine_iter != 0 else [])

    def _refit_kernel(self):
        """Neighbours and weights of the training rows recomputed after phase 1."""
        _, _, w = self._train_stats
        X = self.X_fit_
        k = self.n_neighbors_
        with torch.no_grad():
            if self.kernel_ == "noise":
                # distances in noise units, tau^2 = 2 sigma^2 per feature
                Y = X / self.decoder_.scale.detach().double().cpu().numpy()
            else:
                # the decoder means of the codes: the rows without their noise
                Y = self.decoder_.mean_function(self.codes_.detach()).double().cpu().numpy()
        index = _mapa.fit_neighbors(Y)
        if self.kernel_ == "noise" and X.shape[0] > 1:
            # each row left out of its own weights: its distance to its own
            # atom is 0, while its distances to the others carry two rows'
            # noise, so the row itself would take too large a share
            dist, idx = _mapa.kneighbors_without_self(index, Y, k)
        else:
            dist, idx = _mapa.kneighbors(index, Y, k)
        bandwidth = math.sqrt(2.0) if self.kernel_ == "noise" else _mapa.auto_bandwidth(dist)
        log_q = _mapa.mapa_log_weights(dist, idx, bandwidth, self.atom_log_prior_)
        ent = np.exp(-(np.exp(log_q) * log_q).sum(1))
        self._progress(f"kernel refit ({self.kernel_}): median effective atoms "
                       f"{np.median(ent):.3g}")
        self._train_stats = (idx, log_q, w)

    def _rematch_codes(self):
        """Re-match the codes to the prior (each model's block of atoms on its
        own when the candidate starts train stacked)."""
        with torch.no_grad():
            w = np.exp(self.atom_log_prior_)
            codes = self.codes_.detach().double().cpu().numpy()
            new = np.concatenate([_mapa.match_prior(block, w, self._rng, 1)
                                  for block in np.split(codes, len(codes) // len(w))])
            self.codes_.copy_(torch.as_tensor(new).to(self.codes_))

    def _validation_phase1(self, data):
        # held-out rows (early stopping's or the linear check's) judge the
        # first phase too: it keeps its best held-out state
        if data.X_val is None:
            return None
        Xv = data.X_val
        idx, log_q = self._neighbour_proposal(Xv)
        wv = data.weights_val

        log_prior = torch.as_tensor(self.atom_log_prior_, device=self.device_)[idx]
        log_prior = log_prior.to(self._torch_dtype)

        def validation():
            lp = self.decoder_.log_prob(Xv.unsqueeze(1), self.codes_[idx])
            bound = (torch.exp(log_q) * (lp + log_prior - log_q)).sum(1)
            return -(wv * bound).mean()

        return validation

    def _proposal_from(self, idx, log_q):
        codes = self.codes_.detach()
        return codes[idx], self._atom_log_scales[idx], log_q

    def _refine_max_steps(self, n_rows, decays=False):
        """Step budget of the second phase with ``refine_iter='auto'``:
        with one latent dimension the steps of ``REFINE_EPOCHS_1D`` passes
        (``REFINE_EPOCHS_DECAYED`` where the phase ``decays`` the decoder's
        weights) over ``n_rows`` rows, clipped to ``[REFINE_MAX_STEPS,
        REFINE_MAX_STEPS_1D]``; with more, where the phase ``decays`` the
        decoder's weights, those of ``REFINE_EPOCHS_DECAYED`` passes clipped
        to ``[REFINE_MAX_STEPS, REFINE_MAX_STEPS_DECAYED]``, else
        ``REFINE_MAX_STEPS``."""
        if self.n_components == 1:
            passes = REFINE_EPOCHS_DECAYED if decays else REFINE_EPOCHS_1D
            most = REFINE_MAX_STEPS_1D
        elif decays:
            passes, most = REFINE_EPOCHS_DECAYED, REFINE_MAX_STEPS_DECAYED
        else:
            return REFINE_MAX_STEPS
        steps = math.ceil(passes * n_rows / self._batch_size(n_rows))
        return int(np.clip(steps, REFINE_MAX_STEPS, most))

    def _structureless_hold_out_below(self):
        """The linear check (``refine_iter='auto'``): rows held out of both
        phases, to check the second phase's start and the fit's end against
        the linear model, below ``LINEAR_CHECK_BELOW_ROWS`` rows
        (``LINEAR_CHECK_BELOW_ROWS_2D`` with two or more latent dimensions)."""
        if self.refine_iter != "auto":
            return 0
        return LINEAR_CHECK_BELOW_ROWS_2D if self.n_components >= 2 else LINEAR_CHECK_BELOW_ROWS

    def _validates_refine(self, n_rows, noise_variance):
        """Whether the second phase (``refine_iter='auto'``, no
        ``early_stopping``) holds rows out and keeps its best held-out state:
        with one latent dimension from ``REFINE_VALIDATION_MIN_ROWS`` rows;
        with more, below ``REFINE_VALIDATION_BELOW_ROWS`` rows where the
        first phase left at least ``REFINE_VALIDATION_MIN_NOISE`` of the
        standardized variance to the noise."""
        if self.n_components == 1:
            return n_rows >= REFINE_VALIDATION_MIN_ROWS
        return (n_rows < REFINE_VALIDATION_BELOW_ROWS
                and noise_variance >= REFINE_VALIDATION_MIN_NOISE)

    def _refine_stage(self, data, idx, log_q, w, noise_variance):
        device, dtype = self.device_, self._torch_dtype
        Xt = torch.as_tensor(self.X_fit_, device=device).to(dtype)
        idx_t = torch.as_tensor(idx, device=device)
        log_q_t = torch.as_tensor(log_q, device=device).to(dtype)
        w_t = torch.as_tensor(w / w.mean(), device=device).to(dtype)

        n_rows = Xt.shape[0]
        rows = torch.arange(n_rows, device=device)
        max_steps = self._refine_max_steps(n_rows, decays=self.weight_decay_ > 0)
        # the rows the validation bound is taken on: (x, idx, log q, weights)
        held_out = None
        if data.X_val is not None:
            val_idx, val_log_q = self._neighbour_proposal(data.X_val)
            held_out = (data.X_val, val_idx, val_log_q, data.weights_val)
        elif self.refine_iter == "auto" and self._validates_refine(n_rows, noise_variance):
            # rows held out of this phase only: they stay atoms of the first
            n_val = min(int(math.ceil(self.validation_fraction * n_rows)),
                        REFINE_VALIDATION_MAX_ROWS)
            perm = torch.as_tensor(self._rng.permutation(n_rows), device=device)
            val_rows, rows = perm[:n_val], perm[n_val:].sort().values
            held_out = (Xt[val_rows], idx_t[val_rows], log_q_t[val_rows], w_t[val_rows])
        if held_out is not None and self.validation_scores_ is None:
            self.validation_scores_ = []

        validation = None
        if held_out is not None:
            val_generator = torch.Generator()

            def validation():
                x, val_idx, val_log_q, weights = held_out
                bound = self._refine_bound(x, val_idx, val_log_q, val_generator.manual_seed(0))
                return -(weights * bound).mean()

        def before():
            self._update_atom_scales()
            # from LINEAR_CHECK_BELOW_ROWS rows the linear check's rows judge
            # only the end (_fall_back_to_linear)
            late_check = (data.X_val is not None and not self.early_stopping_
                          and self.n_samples_fit_ >= LINEAR_CHECK_BELOW_ROWS)
            if validation is not None and self.init == "auto" and not late_check:
                self._linear_if_better(validation, data)
            if self.refine_proposal_ == "adaptive":
                # one learnt proposal component per training row, started at
                # the moments of its MAPA mixture (at the atom scales just set)
                self._row_proposal = RowProposal(
                    *add_prior_component(*self._proposal_from(idx_t, log_q_t)))

        def loss(batch, generator):
            batch = rows[batch]
            bound = self._refine_bound(Xt[batch], idx_t[batch], log_q_t[batch], generator,
                                       rows=batch)
            value = -(w_t[batch] * bound).mean()
            return value, value.detach()

        return TrainingStage(
            "refine",
            rows.numel(),
            loss,
            list(self.decoder_.parameters()),
            self.refine_iter,
            validation,
            before=before,
            max_steps=max_steps,
            budget_param="refine_iter",
            average_decay=AVERAGE_DECAY,
            weight_decay=self.weight_decay_,
        )

    @torch.no_grad()
    def _linear_if_better(self, validation, data):
        """Where the second phase has held-out rows: start it from the
        linear special case instead of the first phase's fit if that scores
        better on them (``refine_start_ = 'linear'``).

        The linear start is probabilistic PCA of the training rows
        (``_linear_start``), the codes its posterior means matched to the
        prior, scored by the phase's own held-out bound (``validation``).
        On data without a low-dimensional structure (Gaussian noise in ten
        dimensions, 800 rows) the first phase fits neighbourhood means that
        are noise, and the held-out rows prefer the linear model: measured
        in docs/user_guide/mapa.rst ("Never below the linear model").

        The first phase's fit scores the better of that bound and its own
        (``_validation_phase1``, the mixture of its atoms) where the rows
        were held out of it too: at the second phase's start its decoder
        has only been trained at the atoms, and between neighbouring codes
        it can be steep enough that the continuous model's bound is far
        below where the second phase takes it (three clusters in 20-D, one
        latent dimension: -53.5 nats per row against -3.38 as atoms).
        """
        first = float(validation())
        atoms = self._validation_phase1(data)
        if atoms is not None:
            first = min(first, float(atoms()))
        kept, scales = self._snapshot(None), self._atom_log_scales
        self._become_linear(self._linear_start(data), rng=self._rng)
        linear = float(validation())
        if linear < first:
            self.refine_start_ = "linear"
            self._progress(f"second phase: starts from the linear model (held-out bound "
                           f"{-linear:.4g} against the first phase's {-first:.4g})")
            return
        self._restore(kept)
        self._atom_log_scales = scales

    def _phase1_weight_decay(self):
        """The first phase's weight decay: with ``weight_decay='auto'``,
        ``_auto_decay()`` with one latent dimension where the rows lie
        near a densely sampled curve (``local_residual_`` below
        ``PHASE1_DECAY_MAX_RESIDUAL``) or have one feature (a univariate
        density), and with ``DECAY_MIN_COMPONENTS`` latent dimensions or
        more, else 0; otherwise ``weight_decay``."""
        if self.weight_decay != "auto":
            return float(self.weight_decay)
        residual = self.local_residual_
        near_curve = residual is not None and residual < PHASE1_DECAY_MAX_RESIDUAL
        univariate = self.X_fit_.shape[1] == 1
        decays = ((self.n_components == 1 and (near_curve or univariate))
                  or self.n_components >= DECAY_MIN_COMPONENTS)
        return self._auto_decay() if decays else 0.0

    def _refine_weight_decay(self, noise_variance):
        """The second phase's weight decay: with ``weight_decay='auto'``,
        ``_auto_decay()`` where the first phase decayed or on data near
        a manifold (fewer latent dimensions than features, and the first
        phase left less than ``REFINE_WEIGHT_DECAY_MAX_NOISE`` of the
        variance to the noise), else 0; otherwise ``weight_decay``."""
        if self.weight_decay != "auto":
            return float(self.weight_decay)
        on_manifold = (self.n_components < self.X_fit_.shape[1]
                       and noise_variance < REFINE_WEIGHT_DECAY_MAX_NOISE)
        decays = on_manifold or self._phase1_weight_decay() > 0
        return self._auto_decay() if decays else 0.0

    def _auto_decay(self):
        """The decay of ``weight_decay='auto'`` where it applies:
        ``REFINE_WEIGHT_DECAY``, scaled up as ``sqrt(R / n)`` below ``R``
        training rows, ``R = REFINE_WEIGHT_DECAY_ROWS`` (with one latent
        dimension at least ``DECAY_ROWS_PER_FEATURE_1D`` per feature)."""
        n_rows, n_features = self.X_fit_.shape
        rows = REFINE_WEIGHT_DECAY_ROWS
        if self.n_components == 1:
            rows = max(rows, DECAY_ROWS_PER_FEATURE_1D * n_features)
        return REFINE_WEIGHT_DECAY * math.sqrt(max(1.0, rows / n_rows))

    def _refine_bound(self, x, idx, log_q, generator, rows=None):
        """The second phase's estimate of log p(x) (``refine_method_``): the
        shifted grid of prior quantiles, or the importance-weighted bound of
        the continuous model with the MAPA proposal (with the training rows'
        learnt components where ``rows`` indexes them)."""
        if self.refine_method_ == "grid":
            u = torch.rand((self.n_components,), generator=generator, dtype=torch.float64)
            return stratified_prior_log_px(
                x, self.decoder_, self._by_latent_dimension(REFINE_GRID_POINTS), u)
        return self._importance_bound(x, idx, log_q, self.refine_samples_, generator,
                                      rows=rows)

    def _importance_bound(self, x, idx, log_q, n_draws, generator, rows=None):
        """The importance-weighted bound of the continuous model, ``n_draws``
        per row from the MAPA proposal over the codes of the rows'
        neighbours ``idx`` (weights ``log_q``) mixed with the prior. With
        ``rows`` (training rows, ``refine_proposal_='adaptive'``) their
        learnt components join the proposal and learn from the draws."""
        n, K, d = x.shape[0], n_draws, self.n_components
        proposal = add_prior_component(*self._proposal_from(idx, log_q))
        cache = getattr(self, "_row_proposal", None) if rows is not None else None
        if cache is not None:
            proposal = cache.mixed(rows, *proposal)
        eps = torch.randn((n, K, d), generator=generator, dtype=torch.float64)
        u0 = torch.rand((n, 1), generator=generator, dtype=torch.float64)
        z, log_w = mixture_importance_weights(
            x,
            self.decoder_,
            *proposal,
            eps.to(device=self.device_, dtype=self._torch_dtype),
            u0.to(device=self.device_, dtype=self._torch_dtype),
        )
        if cache is not None:
            cache.update(rows, z, log_w)
        return log_mean_weights(log_w)

    @torch.no_grad()
    def _become_linear(self, start, rng=None):
        """The decoder at the linear model ``start``, the codes its
        posterior means (with ``rng``, as a start of training: matched to
        the prior, as every start's codes are)."""
        self.decoder_.init_linear(start.weight, start.mean, np.sqrt(start.noise_var))
        A, offset, _ = start.posterior()
        codes = self.X_fit_ @ A.T + offset
        if rng is not None:
            codes = _mapa.match_prior(codes, np.exp(self.atom_log_prior_), rng,
                                      _mapa.INIT_ROTATIONS)
        self.codes_.copy_(torch.as_tensor(codes).to(self.codes_))
        self._update_atom_scales()

    def _update_atom_scales(self):
        with torch.no_grad():
            self._atom_log_scales = _mapa.laplace_log_scales(
                self.decoder_, self.codes_.detach()
            ) + math.log(_mapa.PROPOSAL_WIDENING)

    # ------------------------------------------------------------------
    # scoring proposal and transform
    # ------------------------------------------------------------------
    def _finish_fit(self, counts_before, generator):
        if isinstance(self.codes_, torch.nn.Parameter):
            self.codes_ = self.codes_.detach()
        self.__dict__.pop("_rng", None)
        self.__dict__.pop("_phase1_steps_done", None)
        self.__dict__.pop("_row_proposal", None)
        self._update_atom_scales()
        super()._finish_fit(counts_before, generator)

    def _after_load(self):
        """Rebuild derived state after ``skmapa.load``: index and atom widths."""
        self.neighbors_ = _mapa.fit_neighbors(self.X_fit_)
        self._update_atom_scales()

    def _proposal(self, X):
        idx, log_q = self._neighbour_proposal(X)
        return self._proposal_from(idx, log_q)

    def _encode(self, X):
        idx, log_q = self._neighbour_proposal(X)
        return (torch.exp(log_q).unsqueeze(-1) * self.codes_[idx]).sum(1)
