"""BaseDeepDensity: everything the three estimators share.

The base owns validation, devices and dtypes, standardization, the training
loop (Adam on minibatches indexed from one on-device tensor, gradient
clipping, early stopping, recovery from non-finite losses, Ctrl-C), scoring,
sampling, transform and pickling. An estimator supplies its networks, its
training stages and its importance-sampling proposal through a handful of
small hooks, in the manner of scikit-learn's ``BaseMixture``.
"""

import contextlib
import copy
import math
import time
import warnings
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    DensityMixin,
    TransformerMixin,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from ._linear import probabilistic_pca
from ._mapa import structure_within_pieces
from ._networks import ACTIVATIONS, MLP, decayed_weights
from ._scoring import (
    TiledGrid,
    adaptive_importance_log_px,
    add_prior_component,
    grid_budget,
    importance_chunk_rows,
    laplace_start,
    latent_grid,
    mixture_importance_log_px,
    quadrature_log_px,
    sobol_normal,
)
from ._utils import (
    resolve_device,
    resolve_dtype,
    resolve_n_threads,
    sampling_rng,
    torch_generator,
    torch_threads,
    weighted_mean_scale,
)

#: Largest gradient norm before clipping.
MAX_GRAD_NORM = 10.0
#: Decay of the moving average of the parameters that MAPA's second phase
#: and the VAE's and IWAE's stages end with (Polyak averaging, about the last
#: 100 steps; ``TrainingStage.average_decay``). Measured in
#: docs/user_guide/mapa.rst ("The second phase ends with the average of its
#: last steps").
AVERAGE_DECAY = 0.99
#: How many times an epoch with a non-finite loss is retried at half the step.
MAX_RECOVERIES = 6
#: Grid points per latent dimension of the plain 2-D reference grid.
QUADRATURE_2D_POINTS = 513
#: score_samples warns when more than this fraction of the rows has an
#: estimated error above ERROR_WARN_NATS.
ERROR_WARN_FRACTION = 0.1
ERROR_WARN_NATS = 0.1
#: Importance sampling scores the rows whose first estimate has an error
#: above ``ERROR_WARN_NATS`` again, with this many times ``n_eval_samples``
#: draws (``BaseDeepDensity._log_px_importance``). On breast cancer
#: (MAPA, ``n_components=2``) 14 % of the held-out rows were above it with
#: 1024 draws and 0.9 % after the second pass, at twice the scoring time;
#: measured in docs/user_guide/scoring.rst ("A second pass for the rows
#: the first one misses").
RESCORE_FACTOR = 8
#: With ``early_stopping='auto'`` the rows held out are at least
#: ``AUTO_VALIDATION_ROWS`` (or a quarter of the rows, if fewer), and at
#: least ``AUTO_MIN_VALIDATION_ROWS`` for it to apply: on 40 rows of blobs
#: in 3-D, 16 rows of linnerud and 60 of iris (80/20 splits, two latent
#: dimensions) the IWAE went from -53.8 / -1232 / -41.2 nats per held-out
#: row to -5.1 / -11.9 / -3.9 (probabilistic PCA: -4.3 / -13.5 / -4.4).
AUTO_VALIDATION_ROWS = 10
AUTO_MIN_VALIDATION_ROWS = 4
#: Rows encoded or decoded at once outside of training.
EVAL_BATCH_ROWS = 65536
#: Row-draws of one network call, for choosing scoring threads.
EVAL_CALL_ROWS = 4096
#: Optimizer steps per round (loss record and convergence check) when a
#: stage's budget is 'auto'.
WINDOW_STEPS = 50
#: Step budget of a training stage whose budget is 'auto'.
AUTO_MAX_STEPS = 4000
#: Training rows whose estimated log-likelihood chooses between starts: the
#: VAE's and IWAE's two with ``init='auto'`` (without early stopping; else
#: the validation rows), MAPA's candidate codes with more than one latent
#: dimension.
INIT_SELECTION_ROWS = 1000
#: The VAE's and IWAE's stages (``TrainingStage.even_batches``) cut an epoch
#: whose last minibatch would hold fewer than this share of ``batch_size``
#: into minibatches of even size. A remainder of a few rows was one step in
#: eight on a noisy gradient: the IWAE on make_classification (50-D) gained
#: 0.17 / 0.20 nats per held-out row at 1030 rows (a remainder of 6), and at
#: 1000 rows with 100 held out (remainder 4) even minibatches made up the 0.2-
#: 0.37 that holding the rows out had cost. Larger remainders helped as
#: they were: with every epoch cut evenly, the IWAE lost 0.09 on macrodata
#: (144 rows: 128 and 16; four latent dimensions, every one of five folds)
#: and 0.1-0.3 per image on digits (1198 rows: remainder 46; three folds).
#: MAPA keeps its remainders: even minibatches cost it 0.13 on
#: make_classification at 1000 rows (900 trained on, remainder 4; median of
#: four seeds), and as much with the remainder dropped.
SPREAD_REMAINDER_BELOW = 1 / 8

#: The structure test (``BaseDeepDensity._lacks_structure``): rows without a
#: low-dimensional structure, globally and locally, where a deep latent model
#: has nothing to find beyond its linear special case. Both statistics are taken
#: within each piece of the neighbour graph, standardized on its own
#: (``_mapa.structure_within_pieces``; on a connected graph, all the rows
#: before any is held out). Globally: probabilistic PCA with ``n_components``
#: leaves at least ``LINEAR_CHECK_MIN_NOISE`` of what it leaves on Gaussian
#: noise of the same size to the noise; locally: the neighbourhoods' residual
#: off a fit of ``n_components`` dimensions (``_mapa.local_residual``) is at
#: least ``LINEAR_CHECK_MIN_RESIDUAL``. Within pieces, three Gaussian clusters
#: in 10-50 dimensions (150-300 rows, ``make_blobs``) are as structureless as
#: noise (0.99-1.04), though the linear model of all the rows leaves 0.10-0.16
#: to its noise (two latent dimensions): measured in the ``clusters`` suite and
#: docs/user_guide/mapa.rst ("Clusters with no structure within"). Judged
#: against Gaussian noise, 160 rows of it in 10-D (0.89 uncorrected) are caught
#: too. make_friedman1 and make_sparse_uncorrelated (ten features, 700-800
#: rows), where MAPA fell below probabilistic PCA: 0.93-0.99 and 0.26-0.41 with
#: one to four latent dimensions. The real tables (wine, breast cancer, iris,
#: diabetes, star98, macrodata) leave 0.10-0.87 to the linear model's noise
#: (against Gaussian noise); circles are isotropic (about 1) but their residual
#: is below 0.13, as for the other curves and surfaces of the ``zoo`` suite at
#: 150 rows. Either statistic alone misfired (residual: macrodata 0.30 with one
#: latent dimension; PCA: make_circles). Measured in docs/user_guide/mapa.rst
#: ("Never below the linear model").
LINEAR_CHECK_MIN_NOISE = 0.9
LINEAR_CHECK_MIN_RESIDUAL = 0.2
#: Neighbours of the structure test's graph and local residual.
STRUCTURE_NEIGHBORS = 20


class _Optimizers:
    """Several optimizers stepped as one (dense Adam and SparseAdam)."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self):
        # what Optimizer.zero_grad(set_to_none=True) does, without its
        # profiler and hook bookkeeping (a twentieth of a small model's step)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def state_dict(self):
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states):
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


#: Whether this torch has the fused Adam(W) kernels that _FusedAdam calls.
_FUSED_ADAM = hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_")


class _FusedAdam:
    """``torch.optim.Adam(fused=True)``: the same kernel, without ``torch.optim``.

    ``Adam.step`` spends most of a small model's step on bookkeeping around
    its one fused kernel (profiler scope, hooks, grouping of the tensors by
    device and dtype at every call): 80 us against 15 us for the kernel on
    the default networks. And constructing any ``torch.optim`` optimizer
    imports ``torch._dynamo`` the first time (its methods are wrapped to
    disable compilation): 1.4 s once per process, a quarter of a first
    150-row fit. This class keeps Adam's state as ``Adam`` does (``step``,
    ``exp_avg``, ``exp_avg_sq`` per parameter, created at the parameter's
    first gradient; parameters without a gradient are skipped) and calls
    ``torch._fused_adam_`` with exactly the arguments ``Adam.step`` passes
    it, so the result is the same bit for bit (tested against
    ``torch.optim.Adam``). Default betas and eps; CPU and CUDA, where the
    fused kernel exists. The parameters in ``decayed`` take AdamW's
    decoupled ``weight_decay`` (``torch._fused_adamw_``, as ``AdamW`` with
    those parameters in a group of their own; tested against it).
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, decayed=(),
                 weight_decay=0.0):
        self.param_groups = [{"params": list(params), "lr": lr, "betas": betas, "eps": eps,
                              "weight_decay": float(weight_decay)}]
        self.state = {}
        self._decayed = {id(p) for p in decayed} if weight_decay else set()

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        by_kind = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p not in self.state:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            by_kind.setdefault((p.device, p.dtype, id(p) in self._decayed), []).append(p)
        beta1, beta2 = group["betas"]
        for (_, _, decays), params in by_kind.items():
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            kernel = torch._fused_adamw_ if decays else torch._fused_adam_
            kernel(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False,
                lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"] if decays else 0.0,
                eps=group["eps"], maximize=False, grad_scale=None, found_inf=None,
            )

    def state_dict(self):
        """The state by parameter position, and the learning rate (not copied)."""
        params = self.param_groups[0]["params"]
        return {"state": {i: self.state[p] for i, p in enumerate(params) if p in self.state},
                "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state):
        params = self.param_groups[0]["params"]
        self.state = {params[i]: _clone(s) for i, s in state["state"].items()}
        self.param_groups[0]["lr"] = state["lr"]


class _ParameterAverage:
    """An exponential moving average of parameters (Polyak averaging).

    ``update()`` after each optimizer step; the decay ramps up as
    ``min(decay, (1 + t) / (10 + t))`` over the first steps ``t``, so the
    average forgets the stage's start. ``swapped()`` puts the average in
    the parameters for the duration of a ``with`` block; ``apply()`` puts
    it there for good.
    """

    def __init__(self, params, decay):
        self.params, self.decay = list(params), float(decay)
        self.reset()

    def reset(self):
        """Start again from the parameters' current values."""
        self.average = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self):
        self.steps += 1
        weight = 1.0 - min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for a, p in zip(self.average, self.params):
            a.lerp_(p.detach(), weight)

    @torch.no_grad()
    def apply(self):
        for a, p in zip(self.average, self.params):
            p.copy_(a)

    @contextlib.contextmanager
    def swapped(self):
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                for c, p in zip(current, self.params):
                    p.copy_(c)


def _clone(state):
    """A deep copy of a (module or optimizer) state dict whose tensors are
    cloned directly: a fifth of ``copy.deepcopy``'s time, which a fit pays
    once per round of steps."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        out = type(state)((key, _clone(value)) for key, value in state.items())
        if hasattr(state, "_metadata"):
            out._metadata = copy.deepcopy(state._metadata)
        return out
    if isinstance(state, (list, tuple)):
        return type(state)(_clone(value) for value in state)
    return copy.deepcopy(state)


def clip_grad_norm(params, max_norm):
    """``torch.nn.utils.clip_grad_norm_`` that also takes sparse gradients.

    The total norm is over every gradient entry, dense or sparse; returns it
    as a float (the training loop checks it on the host at every step
    anyway). Dense gradients skip ``clip_grad_norm_``'s per-call grouping of
    the tensors by device and dtype (a tenth of a small model's step), and
    are only rescaled when the norm is above ``max_norm``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sparse = any(g.is_sparse for g in grads)
    if sparse:
        norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g)
                 for g in grads]
    else:
        norms = torch._foreach_norm(grads)
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        if sparse:
            for g in grads:
                g.mul_(coef)
        else:
            torch._foreach_mul_(grads, coef)
    return total


def clip_grad_norm_per_model(params, max_norm, n_models):
    """``clip_grad_norm`` for ``n_models`` models stacked along the first axis.

    Every parameter holds the models' values in ``n_models`` equal blocks of
    its first axis (``StackedDecoders``; MAPA's codes, one block of atoms per
    model). Each model's gradient is clipped by its own norm, as if it were
    trained alone. Returns the largest norm (non-finite if any is).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    rows, sq = {}, 0.0
    for i, p in enumerate(params):
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            # the model of each stored row of the gradient
            rows[i] = p.grad.indices()[0] // (p.grad.shape[0] // n_models)
            values = p.grad.values().reshape(rows[i].numel(), -1)
            sq = sq + torch.zeros(n_models, dtype=values.dtype, device=values.device
                                  ).index_add_(0, rows[i], values.pow(2).sum(1))
        else:
            sq = sq + p.grad.reshape(n_models, -1).pow(2).sum(1)
    norms = sq.sqrt()
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for i, p in enumerate(params):
        if i in rows:
            p.grad._values().mul_(coef[rows[i]].reshape(-1, *[1] * (p.grad.values().dim() - 1)))
        else:
            g = p.grad
            g.copy_((g.reshape(n_models, -1) * coef[:, None]).reshape(g.shape))
    return float(norms.max())


@dataclass
class TrainingStage:
    """One phase of training: an objective over ``n_units`` minibatch units.

    ``batch_loss(idx, generator)`` returns ``(loss, bound_mean)`` where
    ``loss`` is minimised and ``bound_mean`` is the mean negative bound of the
    batch, recorded in ``loss_curve_``. ``validation_loss()`` returns the mean
    negative bound on the validation rows (used when ``early_stopping``).
    """

    name: str
    n_units: int
    batch_loss: Callable
    parameters: list
    #: Epochs (an int), or 'auto': at most ``max_steps`` optimizer steps.
    max_iter: object
    validation_loss: Optional[Callable] = None
    before: Optional[Callable] = None
    after_epoch: Optional[Callable] = None
    #: Parameters with one row per unit (MAPA's codes) whose gradients are
    #: sparse (``F.embedding(..., sparse=True)``): trained by SparseAdam, so a
    #: step costs O(batch) instead of O(n_units) (dense Adam would update every
    #: row at every step, an epoch then costing O(n_units^2 / batch)).
    sparse_parameters: list = field(default_factory=list)
    #: Step budget when ``max_iter == 'auto'``.
    max_steps: int = AUTO_MAX_STEPS
    #: The estimator parameter that sets this stage's budget (for messages).
    budget_param: str = "max_iter"
    #: Polyak averaging: when set, the stage keeps an exponential moving
    #: average of its dense parameters with this decay (``_ParameterAverage``),
    #: judges its held-out rows on the average, and ends with the average in
    #: the parameters.
    average_decay: Optional[float] = None
    #: Set by the training loop: the best state seen under early stopping,
    #: restored if the stage is interrupted.
    best_snapshot: Optional[tuple] = None
    #: Models trained at once (``StackedDecoders``; their parameters stacked
    #: along the first axis): ``batch_loss`` then reports one value per
    #: model, each model's gradient is clipped and its convergence judged on
    #: its own, ``model_converged(c)`` is called when model ``c``'s rule
    #: fires, and the stage ends when every model has converged.
    n_models: int = 1
    model_converged: Optional[Callable] = None
    #: Called, when some but not all models have converged, with the indices
    #: of those still training: the others need no more computing
    #: (``StackedDecoders.set_active``); their reports are then NaN.
    set_active: Optional[Callable] = None
    #: Where an epoch's remainder is under ``SPREAD_REMAINDER_BELOW`` of a
    #: minibatch, cut the epoch into ``ceil(n_units / batch)`` minibatches
    #: whose sizes differ by at most one unit instead (the VAE's and IWAE's
    #: stages; measured in ``SPREAD_REMAINDER_BELOW``'s comment).
    even_batches: bool = False
    #: This stage's decoupled weight decay; None: the estimator's
    #: (``weight_decay`` resolved).
    weight_decay: Optional[float] = None
    #: Set by the training loop: the mean report of every round (an array of
    #: one value per model when ``n_models > 1``).
    round_losses: list = field(default_factory=list)


class TrainingData:
    """The standardized training (and validation) rows as on-device tensors."""

    def __init__(self, X, weights, X_val=None, weights_val=None):
        self.X = X
        self.weights = weights
        self.X_val = X_val
        self.weights_val = weights_val
        #: mean weight of the held-out rows over that of the training rows
        #: (each set's weights are normalised to mean one)
        self.val_weight = 1.0

    def all_rows(self):
        """Training and held-out rows and their weights, as numpy arrays."""
        X, w = self.X.double().cpu().numpy(), self.weights.double().cpu().numpy()
        if self.X_val is None:
            return X, w
        return (np.concatenate([X, self.X_val.double().cpu().numpy()]),
                np.concatenate([w, self.val_weight * self.weights_val.double().cpu().numpy()]))


_COMMON_PARAMETERS = """
    n_components : int, default=2
        Dimension of the latent space.
    hidden_layer_sizes : tuple of int, default=(64, 64)
        Hidden layer widths of each network, as in ``MLPRegressor``.
    activation : {'identity', 'logistic', 'tanh', 'relu'}, default='tanh'
        Activation of the hidden layers.
    batch_size : int or 'auto', default='auto'
        Minibatch size (clipped to the number of training units). 'auto' is
        ``clip(n_units // 200, 128, 4096)``: 128 up to 25,600 training units,
        then larger so that an epoch takes at most ~200 steps. Epochs are
        cut into full minibatches and the remainder, except that the VAE
        and the IWAE spread a remainder under an eighth of a minibatch:
        ``ceil(n_units / batch_size)`` minibatches whose sizes differ by at
        most one unit (900 rows: eight of 112-113, not seven of 128 and one
        of 4; measured better for each estimator).
    learning_rate_init : float, default=1e-3
        Adam step size.
    weight_decay : 'auto' or float >= 0, default='auto'
        Decoupled weight decay (AdamW, Loshchilov & Hutter): at each
        optimizer step, before Adam's update, the weight matrices of the
        networks' layers are multiplied by ``1 - lr * weight_decay`` (biases,
        noise scales, the decoder's linear part and MAPA's codes are not). It
        shrinks the decoder's nonlinear part towards its linear special
        case. 'auto': for ``MAPADensity`` 0.1 in the second phase on data
        near a manifold (fewer latent dimensions than features, and the
        first phase left less than 8% of the standardized variance to the
        noise), 0 elsewhere (held-out KL of the surface in 30-D 0.906 to
        0.856; see :ref:`mapa_formulation`), and with one latent dimension
        0.1 in both phases where the rows lie near a densely sampled curve
        (``local_residual_`` below 0.03: the curve in 50-D 0.368 to 0.355,
        at 300 rows 1.57 to 1.46) or have one feature, and with six or more
        latent dimensions 0.1 in both phases (digits with eight: +0.6 nats
        per image); below 1000 training
        rows MAPA's 0.1 is ``0.1 * sqrt(1000 / n)`` (0.26 at 150 rows: the
        curve in 50-D 3.31 to 2.93), with one latent dimension below 100
        rows per feature ``0.1 * sqrt(100 D / n)`` (``D`` features; 0.22 at
        1000 rows in 50-D: the curve there 0.028 nats per row closer); for ``VAEDensity`` and
        ``IWAEDensity`` 0 (0.1 lost: their amortised encoder already holds
        the decoder back; the IWAE's KL on the surface in 10-D 0.416 to
        0.439). The value used is ``weight_decay_``.
    init : {'auto', 'pca', 'random'}, default='auto'
        Start of training. 'pca' starts at the model's linear special case,
        probabilistic PCA with ``n_components`` (decoder ``f(z) = mean + W z``
        with the network's output layer zeroed, isotropic noise at the mean
        discarded eigenvalue, and an encoder at its exact posterior), so
        training begins at ``PCA(n_components).score``. 'random' starts the
        networks at random with noise scale 0.1 (standardized units). 'auto'
        (VAE, IWAE) trains from each start and keeps the model with the
        higher estimated log-likelihood on the validation rows (or on up to
        1000 training rows), at twice the training cost; for MAPA it is
        'pca' (see MAPADensity). The choice is ``init_scores_``.
    max_iter : 'auto' or int, default='auto'
        Training budget of each stage. 'auto' counts optimizer steps, so that
        it means the same at every data size: at most 4000 steps, judged for
        convergence every 50 steps (a round); a stage that reaches the
        4000 steps stops there without a warning (the cap is part of the
        default, see ``converged_``). An int is a number of epochs (passes
        over the training units), judged once per epoch; a stage that uses
        them all issues a ConvergenceWarning. The VAE's and IWAE's stages
        and MAPA's second phase end with a moving average of their
        parameters over about their last 100 steps (Polyak averaging), not
        the last step's.
    tol : float, default=1e-4
        A round improves when the monitored loss drops below the best seen
        by more than ``tol``: the mean training loss over the last
        ``n_iter_no_change`` rounds, or the validation loss with
        ``early_stopping``.
    early_stopping : 'auto' or bool, default='auto'
        Hold out ``validation_fraction`` of the rows, monitor the bound on
        them (from the start of each stage on) and keep the best model seen.
        'auto' turns it on where the estimator is measured to overfit: VAE
        and IWAE with fewer than 1000 rows (trained long on ~140 rows, they
        fell hundreds of nats below probabilistic PCA on held-out rows),
        holding out at least 10 rows, or a quarter of them where that is
        fewer (off below 16 rows),
        never for MAPA, whose fixed posterior regularises it (its second
        phase holds rows out on its own where measured to overfit, see
        ``refine_iter``). The choice made is ``early_stopping_``. Without
        it, on data without a low-dimensional structure (the linear model
        leaves as much to its noise as on Gaussian noise, and so do the
        neighbourhoods) below 5000 rows (MAPA with one latent dimension:
        1000), the estimators hold as many rows out anyway, to judge the
        fit against the linear model (``linear_fallback_``); VAE and IWAE
        with ``init='auto'`` also choose their start on them (training rows
        chose the random start that had fitted them: 0.37 nats per new row
        below probabilistic PCA on 1000 rows of Gaussian noise), but they
        stop nothing.
    validation_fraction : float, default=0.1
        Fraction of rows held out when ``early_stopping`` is True (with
        'auto', at least 10 rows or a quarter of them).
    n_iter_no_change : int, default=10
        Rounds (epochs, or 50-step windows with ``max_iter='auto'``) without
        improvement before training stops (converged).
    warm_start : bool, default=False
        Continue training the fitted networks on the next call to ``fit``.
    score_method : {'auto', 'importance', 'quadrature'}, default='auto'
        How ``score_samples`` estimates log p(x): 'auto' uses quadrature on a
        latent grid when ``n_components == 1`` (exact up to a resolution
        chosen from the decoder's slope) and importance sampling otherwise;
        quadrature refuses ``n_components > 2``.
    n_eval_samples : int, default=1024
        Importance-sampling draws per row in ``score_samples`` (adaptive
        importance sampling: a Laplace start and Gaussians refitted to the
        weighted draws, see the user guide's scoring page). Rows whose
        estimate has an error above 0.1 nats are scored again with 8 times
        as many.
    random_state : int, RandomState instance or None, default=None
        Seeds network initialisation, minibatches, training noise and the
        fixed base draws of ``score_samples``. An int makes ``fit``
        reproducible and leaves numpy's and torch's global random states
        untouched; None draws a seed from numpy's global random state, as
        scikit-learn estimators do.
    verbose : int, default=0
        Print progress (0: silent): every stage, the a-priori steps, and
        every ``verbose`` rounds the step, loss and an upper estimate of
        the time left.
    device : str, default='auto'
        Torch device: 'auto' picks 'cuda', then 'mps', then 'cpu'. The device
        used is ``device_``.
    n_threads : 'auto', int or None, default='auto'
        Torch intra-op threads on the CPU during ``fit``, ``score_samples``,
        ``transform`` and ``sample`` (restored afterwards). 'auto' gives one
        thread per 5e8 FLOPs of a training step or network call, at most
        ``torch.get_num_threads()`` (the budget joblib gives its workers, or
        what you set): the default networks train on one thread, which is
        fastest for them and does not collapse when other work shares the
        CPU. None leaves torch's setting alone.
    dtype : {'auto', 'float32', 'float64'}, default='auto'
        Network precision: 'auto' is float64 on the CPU and float32 on
        accelerators (MPS is always float32). Results are float64.
"""

_COMMON_ATTRIBUTES = """
    decoder_ : torch.nn.Module
        The generative network f and the noise scale (standardized units).
    noise_scale_ : ndarray of shape (n_features,)
        Standard deviation of the observation noise, in X's units.
    mean_, scale_ : ndarray of shape (n_features,)
        Standardization applied inside the estimator.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Names of features seen during ``fit``, when X has string column names.
    n_samples_fit_ : int
        Number of rows of the last ``fit`` (validation rows included). With
        ``n_components <= 2`` it sizes the scoring grid's cap: a model fitted
        on more rows has smaller noise and needs a finer grid.
    early_stopping_ : bool
        Whether a validation set was held out (``early_stopping`` resolved).
    weight_decay_ : float
        The weight decay used (``weight_decay`` resolved; for MAPA with
        'auto', the second phase's, or the first phase's where there is no
        second: with one latent dimension the first phase decays where the
        rows lie near a curve, ``local_residual_``, or have one feature, and
        with six or more latent dimensions it decays).
    n_iter_ : int
        Epochs run (begun), over all training stages.
    n_steps_ : int
        Optimizer steps run, over all training stages and every run from a
        candidate start (the cost of the fit; ``n_iter_`` and
        ``loss_curve_`` describe the model kept). MAPA's candidate starts
        train stacked, one step for all of them; ``n_row_passes_`` counts
        each candidate's rows.
    loss_curve_ : list of float
        Mean negative training bound per round (epoch, or 50-step window
        with ``max_iter='auto'``), in nats per unit.
    n_held_out_ : int
        Rows held out of training by this fit (early stopping's, or on data
        without a low-dimensional structure the estimator's own: see
        ``early_stopping``); 0 where none.
    validation_scores_ : list of float or None
        Mean validation bound per round when ``early_stopping`` (for
        :class:`~skmapa.MAPADensity` also when its second phase holds rows
        out, see ``refine_iter``).
    converged_ : bool
        Whether every training stage stopped by its convergence criterion
        (``tol``, ``n_iter_no_change``) rather than at its budget.
    linear_fallback_ : bool
        Whether the fitted model was replaced by its linear special case:
        where rows were held out of all training (early stopping's, or on
        data without a low-dimensional structure the estimator's own: see
        ``early_stopping``) and ``init='auto'``, if probabilistic PCA with
        ``n_components`` of the training rows scores better on them than
        the trained model, the model becomes it, fitted to all the rows
        (the decoder's linear part, its nonlinear part zero; the encoder or
        MAPA's codes at its exact posterior). A deep model then never ends
        below the linear one by that test; the held-out rows also chose the
        trained model's best state, so the test leans towards keeping it.
    device_ : torch.device
        Device the networks live on.
    n_row_passes_ : dict
        Rows pushed forward through each network during training.
    n_flops_ : int
        Forward FLOPs of training, ``sum(rows * flops_per_row)``.
    eval_draws_ : ndarray of shape (n_eval_samples, n_components)
        Base draws of importance sampling, fixed at fit time.
"""


def fill_doc(cls):
    """Insert the shared parameter and attribute descriptions."""
    if cls.__doc__:
        cls.__doc__ = cls.__doc__.replace(
            "%(common_parameters)s", _COMMON_PARAMETERS.strip("\n")
        ).replace("%(common_attributes)s", _COMMON_ATTRIBUTES.strip("\n"))
    return cls


class BaseDeepDensity(
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    DensityMixin,
    BaseEstimator,
    metaclass=ABCMeta,
):
    """Base class of the deep latent-variable density estimators.

    Model: ``z ~ N(0, I_d)``, ``x | z ~ N(f(z), diag(sigma^2))`` on
    standardized data; log-densities, samples and ``inverse_transform`` are
    reported in the caller's units.
    """

    _parameter_constraints = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "hidden_layer_sizes": ["array-like"],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [StrOptions({"auto"}), Interval(Real, 0, None, closed="left")],
        "init": [StrOptions({"auto", "pca", "random"})],
        "max_iter": [StrOptions({"auto"}), Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "early_stopping": ["boolean", StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "warm_start": ["boolean"],
        "score_method": [StrOptions({"auto", "importance", "quadrature"})],
        "n_eval_samples": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "device": [str, torch.device],
        "n_threads": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left"),
                      None],
        "dtype": [StrOptions({"auto", "float32", "float64"})],
    }

    def __init__(
        self,
        *,
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
        self.n_components = n_components
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.weight_decay = weight_decay
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.warm_start = warm_start
        self.score_method = score_method
        self.n_eval_samples = n_eval_samples
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.n_threads = n_threads
        self.dtype = dtype

    # ------------------------------------------------------------------
    # hooks for the estimators
    # ------------------------------------------------------------------
    @abstractmethod
    def _initialize(self, data, generator):
        """Build the networks (and any fixed statistics) from the training data."""

    @abstractmethod
    def _network_specs(self, n_features):
        """``{attribute: (module class, *constructor args)}`` of the networks.

        Used to build them in ``_initialize`` and to rebuild them, empty, when
        a saved model is loaded.
        """

    @abstractmethod
    def _training_stages(self, data):
        """The list of ``TrainingStage`` to run, in order."""

    @abstractmethod
    def _proposal(self, X):
        """Importance-sampling proposal for standardized rows ``X``.

        Returns ``(means, log_stds, log_weights)`` of shapes (n, C, d),
        (n, C, d) and (n, C), normalised weights; the base mixes in the prior.
        """

    @abstractmethod
    def _encode(self, X):
        """Latent codes of standardized rows ``X`` (tensor (n, d))."""

    def _warm_start(self, data, generator):
        """Prepare a fitted estimator to continue training on ``data``."""

    def _networks(self):
        """The fitted modules, by attribute name."""
        return {
            name: value
            for name, value in vars(self).items()
            if name.endswith("_") and isinstance(value, torch.nn.Module)
        }

    def _check_params(self, X):
        """Extra parameter checks that need the data; raise ValueError."""
        if self.score_method == "quadrature" and self.n_components > 2:
            raise ValueError(
                "score_method='quadrature' needs n_components <= 2, got "
                f"n_components={self.n_components}; use 'importance' or 'auto'."
            )
        for name, constraints in self._parameter_constraints.items():
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) and any(
                isinstance(c, Interval) and c.type is Integral for c in constraints
            ):
                raise ValueError(
                    f"The {name!r} parameter of {type(self).__name__} must be an "
                    f"int, got the bool {value!r}."
                )
        sizes = self.hidden_layer_sizes
        if np.ndim(sizes) != 1 or not all(
            isinstance(s, Integral) and not isinstance(s, (bool, np.bool_)) and s > 0
            for s in sizes
        ):
            raise ValueError(
                "hidden_layer_sizes must be a sequence of positive ints, got "
                f"{sizes!r}."
            )

    # ------------------------------------------------------------------
    # fit
    # ------------------------------------------------------------------
    def fit(self, X, y=None, sample_weight=None):
        """Fit the model to X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : None
            Ignored; present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights; each row's bound is multiplied by its
            weight (normalised to mean one).

        Returns
        -------
        self : object
            The fitted estimator.

        Examples
        --------
        >>> import numpy as np
        >>> from skmapa import VAEDensity
        >>> X = np.random.RandomState(0).normal(size=(100, 2))
        >>> est = VAEDensity(n_components=1, max_iter=5, random_state=0)
        >>> est.fit(X) is est
        True
        >>> est.n_iter_, len(est.loss_curve_)
        (5, 5)
        """
        self._validate_params()
        self._fit_start = time.perf_counter()
        warm = self._continues_fit()
        attributes_before = set(vars(self)) - {"n_features_in_", "feature_names_in_"}
        X = validate_data(
            self,
            X,
            reset=not warm,
            dtype=[np.float64, np.float32],
            # C order (a copy for Fortran-ordered or strided input): other
            # layouts take other BLAS kernels, whose last-bit differences
            # training amplifies
            order="C",
            ensure_min_samples=2,
        )
        self._check_params(X)
        sample_weight = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        if not np.any(sample_weight > 0):
            raise ValueError("sample_weight must have at least one positive entry.")
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        generator = torch_generator(self.random_state)
        self._usable = warm
        n_threads = self._thread_count(self._step_flops(X.shape[0], X.shape[1]), device)
        with torch_threads(n_threads):
            try:
                if not warm:
                    self._set_standardization(X, sample_weight)
                self.n_samples_fit_ = X.shape[0]
                self.early_stopping_ = self._resolve_early_stopping(X.shape[0])
                self.weight_decay_ = self._resolve_weight_decay()
                self.device_ = device
                self._torch_dtype = dtype
                data = self._training_data(X, sample_weight, generator)
                # rows pushed through the networks from here on are this fit's cost
                # (a fresh fit's networks are built below, with zero counts)
                counts_before = self._row_counts() if warm else {}
                # validation_scores_ is a list wherever training monitors held-out
                # rows (``_monitors_held_out``); a warm start goes on with the
                # list it has, or starts one
                if warm:
                    if self._monitors_held_out(data) and self.validation_scores_ is None:
                        self.validation_scores_ = []
                    self._move_networks()
                    self._warm_start(data, generator)
                else:
                    self.loss_curve_ = []
                    self.validation_scores_ = [] if self._monitors_held_out(data) else None
                    self.n_iter_ = 0
                    self.n_steps_ = 0
                    self.n_row_passes_ = {}
                    self._initialize(data, generator)
                    self._move_networks()
                self._train(data, generator, counts_before)
            except BaseException:
                if not self._usable:
                    # a fresh fit that failed before its model was complete must not
                    # look fitted: drop what this call added
                    for name in set(vars(self)) - attributes_before:
                        delattr(self, name)
                raise
        return self

    def _set_standardization(self, X, sample_weight):
        mean, scale, varies = weighted_mean_scale(X, sample_weight)
        # constant columns keep unit scale, as in StandardScaler
        scale[~varies] = 1.0
        self.mean_ = mean.astype(np.float64)
        self.scale_ = scale.astype(np.float64)

    def _to_tensor(self, X):
        X = np.ascontiguousarray(X, dtype=np.float64)
        if not X.flags.writeable:  # torch cannot share a read-only array
            X = X.copy()
        return torch.as_tensor(X, device=self.device_).to(self._torch_dtype)

    def _standardized_array(self, X):
        """``X`` in the estimator's standardized units, as a float64 array."""
        with np.errstate(over="ignore"):  # rows beyond float64: see _log_px
            return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

    def _standardize(self, X):
        return self._to_tensor(self._standardized_array(X))

    def _continues_fit(self):
        """Whether ``fit`` goes on from the fitted networks (``warm_start``)."""
        return self.warm_start and hasattr(self, "decoder_")

    def _held_out_rows(self, X, sample_weight):
        """Rows held out of training (``data.X_val``): those of early
        stopping, or, without it, as many where a fresh fit with
        ``init='auto'`` of fewer than ``_structureless_hold_out_below()``
        rows finds them without a low-dimensional structure
        (``_lacks_structure``)."""
        n = X.shape[0]
        if not self.early_stopping_:
            below = self._structureless_hold_out_below()
            if (below and n < below and self.init == "auto" and not self._continues_fit()
                    and self._n_validation(n) >= AUTO_MIN_VALIDATION_ROWS
                    and self._lacks_structure(X, sample_weight)):
                return self._n_validation(n)
            return 0
        n_val = self._n_validation(n)
        if n_val < 1 or n - n_val < 2:
            raise ValueError(
                f"early_stopping with validation_fraction={self.validation_fraction}"
                f" leaves too few rows out of n_samples={n}."
            )
        return n_val

    def _training_data(self, X, sample_weight, generator):
        X_val = w_val = None
        n, n_val = X.shape[0], self._held_out_rows(X, sample_weight)
        self.n_held_out_ = n_val
        if n_val:
            perm = torch.randperm(n, generator=generator).numpy()
            val, train = perm[:n_val], np.sort(perm[n_val:])
            X_val, w_val = X[np.sort(val)], sample_weight[np.sort(val)]
            X, sample_weight = X[train], sample_weight[train]
        mean_w = sample_weight.mean()
        data = TrainingData(
            self._standardize(X), self._to_tensor(sample_weight / mean_w)
        )
        if X_val is not None:
            data.X_val = self._standardize(X_val)
            data.weights_val = self._to_tensor(w_val / max(w_val.mean(), 1e-300))
            data.val_weight = float(w_val.mean() / mean_w)
        return data

    #: ``early_stopping='auto'`` holds out validation rows below this many rows.
    _auto_early_stopping_below = 0

    #: ``weight_decay='auto'``.
    _auto_weight_decay = 0.0

    #: Network rows pushed per training row and step, beyond the first
    #: (importance samples); sets the work estimate that picks the threads.
    _train_draws = 1

    def _row_flops(self, n_features):
        """Forward FLOPs of one decoder row (from the parameters, before fit)."""
        sizes = [self.n_components, *map(int, self.hidden_layer_sizes), n_features]
        return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))

    def _step_flops(self, n_rows, n_features):
        """Rough FLOPs of one training step: forward and backward, both networks."""
        batch = self._batch_size(n_rows)
        return 6 * batch * self._row_flops(n_features) * max(1, self._train_draws)

    def _thread_count(self, flops, device=None):
        return resolve_n_threads(self.n_threads, flops, device or self.device_)

    def _eval_threads(self, n_rows, draws=1):
        """Thread context for evaluating ``n_rows`` rows with ``draws`` draws each.

        Judged by the work of one network call of at most ``EVAL_CALL_ROWS``
        row-draws, as a training step is, not by the whole chunk: scoring
        2000 rows of a default model (1024 draws) next to a busy core took
        2.1 s on one thread and 5.2-6.6 s on two.
        """
        rows = min(n_rows * draws, EVAL_CALL_ROWS)
        return torch_threads(self._thread_count(
            2 * rows * self._row_flops(self.n_features_in_)))

    def _resolve_weight_decay(self):
        """``weight_decay`` as a float."""
        return float(self._auto_weight_decay if self.weight_decay == "auto"
                     else self.weight_decay)

    def _resolve_early_stopping(self, n_samples):
        """``early_stopping`` as a bool: 'auto' below
        ``_auto_early_stopping_below`` rows, where ``_n_validation`` holds
        out at least ``AUTO_MIN_VALIDATION_ROWS``."""
        if self.early_stopping != "auto":
            return bool(self.early_stopping)
        return (n_samples < self._auto_early_stopping_below
                and self._n_validation(n_samples) >= AUTO_MIN_VALIDATION_ROWS)

    def _structureless_hold_out_below(self):
        """Rows below which a fit without early stopping holds rows out of
        data without structure (``_held_out_rows``); 0: never."""
        return 0

    def _monitors_held_out(self, data):
        """Whether the training stages monitor the held-out rows (keep their
        best state on them, record ``validation_scores_``)."""
        return data.X_val is not None

    def _lacks_structure(self, X, sample_weight):
        """The structure test: whether, within the pieces of the rows'
        neighbour graph (``structure_within_pieces``), probabilistic PCA
        leaves at least ``LINEAR_CHECK_MIN_NOISE`` of what it leaves on
        Gaussian noise and the neighbourhoods' local residual is at least
        ``LINEAR_CHECK_MIN_RESIDUAL``: data a deep model cannot describe
        better than its linear special case, where held-out rows guard it."""
        keep = sample_weight > 0
        Xs, w = self._standardized_array(X)[keep], sample_weight[keep]
        stats = structure_within_pieces(Xs, w, self.n_components, STRUCTURE_NEIGHBORS)
        return (stats is not None and stats[0] >= LINEAR_CHECK_MIN_NOISE
                and stats[1] >= LINEAR_CHECK_MIN_RESIDUAL)

    def _n_validation(self, n_samples):
        """Rows held out under early stopping: ``validation_fraction`` of
        them; with ``early_stopping='auto'`` at least
        ``AUTO_VALIDATION_ROWS``, or a quarter of the rows where that is
        fewer (on tables of 16-60 rows the VAE and the IWAE fell tens to
        a thousand nats per row below probabilistic PCA without them)."""
        n_val = int(math.ceil(self.validation_fraction * n_samples))
        if self.early_stopping == "auto":
            n_val = max(n_val, min(AUTO_VALIDATION_ROWS, n_samples // 4))
        return n_val

    def _linear_start(self, data):
        """Probabilistic PCA of the (standardized) training rows."""
        return probabilistic_pca(data.X.double().cpu().numpy(),
                                 data.weights.double().cpu().numpy(), self.n_components)

    def _move_networks(self):
        for name, module in self._networks().items():
            setattr(self, name, module.to(device=self.device_, dtype=self._torch_dtype))
        for name, value in list(vars(self).items()):
            if name.endswith("_") and isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device=self.device_, dtype=self._torch_dtype))

    def _snapshot(self, optimizer):
        state = {name: _clone(m.state_dict()) for name, m in self._networks().items()}
        tensors = {
            name: value.detach().clone()
            for name, value in vars(self).items()
            if name.endswith("_") and isinstance(value, torch.Tensor)
        }
        opt = _clone(optimizer.state_dict()) if optimizer is not None else None
        return state, tensors, opt

    def _restore(self, snapshot, optimizer=None):
        state, tensors, opt = snapshot
        for name, module in self._networks().items():
            module.load_state_dict(state[name])
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(self, name).copy_(value)
        if optimizer is not None and opt is not None:
            optimizer.load_state_dict(opt)

    def _row_counts(self):
        counts = {}
        for name, module in self._networks().items():
            counts[name.rstrip("_")] = sum(
                m.rows_forward for m in module.modules() if isinstance(m, MLP)
            )
        return counts

    def _flops_per_row(self):
        return {
            name.rstrip("_"): sum(
                m.flops_per_row for m in module.modules() if isinstance(m, MLP)
            )
            for name, module in self._networks().items()
        }

    def _progress(self, message):
        """Print a progress line with the time since ``fit`` began (verbose)."""
        if self.verbose:
            elapsed = time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())
            print(f"[{type(self).__name__}] {message} ({elapsed:.1f} s)", flush=True)

    def _train(self, data, generator, counts_before):
        self._train_stages(data, generator, counts_before)
        self._fall_back_to_linear(data)

    def _train_stages(self, data, generator, counts_before):
        """Run every training stage, then build what scoring needs."""
        self.linear_fallback_ = False
        converged = True
        stage = stage_name = None
        best_snapshot = None
        try:
            for stage in self._training_stages(data):
                stage_name = stage.name
                stage_converged, best_snapshot = self._run_stage(stage, generator)
                if best_snapshot is not None:
                    self._restore(best_snapshot)
                    best_snapshot = None
                converged = converged and stage_converged
        except KeyboardInterrupt:
            if best_snapshot is None and stage is not None:
                best_snapshot = stage.best_snapshot
            if best_snapshot is not None:
                self._restore(best_snapshot)
            self.converged_ = False
            self._finish_fit(counts_before, generator)
            warnings.warn(
                f"{type(self).__name__}.fit was interrupted during stage "
                f"{stage_name!r}; the estimator keeps the best model so far.",
                UserWarning,
            )
            raise
        self.converged_ = converged
        self._finish_fit(counts_before, generator)

    @torch.no_grad()
    def _fall_back_to_linear(self, data):
        """Never below the linear special case where rows were held out
        (``data.X_val``) and ``init='auto'``: if probabilistic PCA of the
        training rows scores better on them (its exact log-density) than the
        fitted model (its estimated log-likelihood, ``_log_px_standardized``),
        the model becomes it, fitted to the training and held-out rows
        together (``_become_linear``; ``linear_fallback_``). The held-out
        rows chose the model's best state too, so the test leans towards the
        fitted model."""
        if data.X_val is None or self.init != "auto":
            return
        weights = data.weights_val.double().cpu().numpy()
        start = self._linear_start(data)
        linear = np.average(start.log_density(data.X_val.double().cpu().numpy()),
                            weights=weights)
        fitted = np.average(self._log_px_standardized(data.X_val)[0], weights=weights)
        if linear > fitted:
            self._progress(f"held-out rows: probabilistic PCA scores {linear:.4g} nats per "
                           f"row, the fitted model {fitted:.4g}; the model becomes it, "
                           "fitted to every row")
            self._become_linear(probabilistic_pca(*data.all_rows(), self.n_components))
            self.linear_fallback_ = True
            self._decoder_changed()

    def _become_linear(self, start):
        """Set the networks to the linear-Gaussian model ``start`` exactly."""
        raise NotImplementedError

    def _batch_size(self, n_units):
        batch = self.batch_size
        if batch == "auto":
            batch = int(np.clip(n_units // 200, 128, 4096))
        return int(min(batch, n_units))

    def _run_stage(self, stage, generator, monitor=True):
        """Run one stage; return (converged, best snapshot for early stopping).

        The stage runs in rounds: one epoch each when its budget is a number
        of epochs, ``WINDOW_STEPS`` optimizer steps each (across epoch
        boundaries) when it is 'auto', with at most ``stage.max_steps`` steps.
        Convergence is judged once per round. With ``stage.average_decay``
        the stage ends with the average of its parameters.
        """
        average = None
        if stage.average_decay is not None:
            average = _ParameterAverage(
                [p for p in stage.parameters if p.requires_grad], stage.average_decay)
        result = self._run_rounds(stage, generator, monitor, average)
        if average is not None and average.steps:
            average.apply()
        return result

    def _run_rounds(self, stage, generator, monitor, average):
        params = [p for p in stage.parameters if p.requires_grad]
        sparse = [p for p in stage.sparse_parameters if p.requires_grad]
        lr = self.learning_rate_init
        # AdamW's decoupled weight decay on the networks' weight matrices
        decay = (self._resolve_weight_decay() if stage.weight_decay is None
                 else float(stage.weight_decay))
        decayed_ids = {id(w) for module in self._networks().values()
                       for w in decayed_weights(module)}
        decayed = [p for p in params if id(p) in decayed_ids]
        if _FUSED_ADAM and self.device_.type in ("cpu", "cuda"):
            # fused: one kernel for every parameter (about 2x faster per step
            # than the per-tensor loop on the small default networks)
            dense = _FusedAdam(params, lr, decayed=decayed, weight_decay=decay)
        else:
            rest = [p for p in params if id(p) not in decayed_ids]
            groups = [{"params": decayed, "weight_decay": decay},
                      {"params": rest, "weight_decay": 0.0}]
            dense = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
        optimizer = _Optimizers(
            [dense] + ([torch.optim.SparseAdam(sparse, lr=lr)] if sparse else []))
        params = params + sparse
        batch = self._batch_size(stage.n_units)
        steps_per_epoch = -(-stage.n_units // batch)
        spread = (stage.even_batches
                  and 0 < stage.n_units % batch < batch * SPREAD_REMAINDER_BELOW)
        if stage.max_iter == "auto":
            max_steps, round_steps = int(stage.max_steps), WINDOW_STEPS
            budget = f"up to {max_steps} steps"
        else:
            max_steps = int(stage.max_iter) * steps_per_epoch
            round_steps = steps_per_epoch
            budget = f"up to {stage.max_iter} epochs"
        best, no_improve = np.full(stage.n_models, np.inf), np.zeros(stage.n_models, int)
        done = np.zeros(stage.n_models, bool)
        if stage.n_models == 1:
            best, no_improve, done = best[0], no_improve[0], done[0]
        best_snapshot = None
        # a stage has a validation loss only where rows were held out for it
        monitor_val = monitor and stage.validation_loss is not None
        recoveries = 0
        steps = rounds = 0
        stage_losses = []
        self._progress(f"{stage.name}: {stage.n_units} units, batch {batch}, {budget}")
        if stage.before is not None:
            stage.before()
        if monitor_val:
            # the start is a candidate too: training that only makes the
            # validation bound worse (overfitting a small data set from a
            # good start) ends where it began
            with torch.no_grad():
                best = float(stage.validation_loss())
            best_snapshot = stage.best_snapshot = self._snapshot(None)
        # one stream of minibatches: successive permutations of the units
        queue, epochs_done = [], 0
        stage_start = time.perf_counter()
        while steps < max_steps:
            good = self._snapshot(optimizer)
            total, seen, taken, finite = 0.0, 0, 0, True
            epochs_before = epochs_done
            for _ in range(min(round_steps, max_steps - steps)):
                if not queue:
                    perm = torch.randperm(stage.n_units, generator=generator)
                    perm = perm.to(self.device_)
                    queue = list(perm.tensor_split(steps_per_epoch) if spread
                                 else perm.split(batch))[::-1]
                    epochs_done += 1
                idx = queue.pop()
                loss, report = stage.batch_loss(idx, generator)
                if not math.isfinite(float(loss.detach())):
                    finite = False
                    break
                optimizer.zero_grad()
                loss.backward()
                norm = (clip_grad_norm(params, MAX_GRAD_NORM) if stage.n_models == 1 else
                        clip_grad_norm_per_model(params, MAX_GRAD_NORM, stage.n_models))
                if not math.isfinite(norm):
                    finite = False
                    break
                optimizer.step()
                if average is not None:
                    average.update()
                report = (float(report) if stage.n_models == 1
                          else report.detach().cpu().double().numpy())
                total += report * idx.numel()
                seen += idx.numel()
                taken += 1
            if not finite:
                recoveries += 1
                self._restore(good, optimizer)
                if average is not None:
                    average.reset()
                queue, epochs_done = [], epochs_before
                if recoveries > MAX_RECOVERIES:
                    raise FloatingPointError(
                        f"{type(self).__name__}: training stage {stage.name!r} "
                        "produced a non-finite loss or gradient at every retry, even "
                        f"with learning_rate lowered to {lr:.3g}. Check the data for "
                        "extreme values, or lower learning_rate_init."
                    )
                lr /= 2
                for group in optimizer.param_groups:
                    group["lr"] = lr
                self._progress(f"{stage.name}: non-finite loss: restored, lr={lr:.3g}")
                continue
            steps += taken
            rounds += 1
            self.n_steps_ += taken
            self.n_iter_ += epochs_done - epochs_before
            if stage.after_epoch is not None and epochs_done > epochs_before:
                stage.after_epoch()
            round_loss = total / max(seen, 1)
            # (NaN: a stacked model that converged and is no longer computed)
            self.loss_curve_.append(float(np.nanmean(round_loss)))
            stage_losses.append(round_loss)
            stage.round_losses.append(round_loss)
            # The training loss of one round is noisy (minibatches, sampled
            # bounds): monitor its mean over the last n_iter_no_change rounds,
            # so that one lucky round cannot stop training.
            metric = np.mean(stage_losses[-self.n_iter_no_change:], axis=0)
            if monitor_val:
                # (with averaging: the average is what the stage ends with)
                with torch.no_grad(), (average.swapped() if average is not None
                                       else contextlib.nullcontext()):
                    val = float(stage.validation_loss())
                    if val < best:
                        best_snapshot = stage.best_snapshot = self._snapshot(None)
                self.validation_scores_.append(-val)
                metric = val
            if self.verbose and rounds % max(int(self.verbose), 1) == 0:
                # time left if the whole budget runs (convergence may stop sooner)
                left = (time.perf_counter() - stage_start) * (max_steps - steps) / steps
                msg = (f"{stage.name}: step {steps}/{max_steps} (epoch {epochs_done}), "
                       "loss " + ", ".join("done" if np.isnan(v) else f"{v:.5f}"
                                          for v in np.atleast_1d(round_loss)))
                if monitor_val:
                    msg += f", validation loss {metric:.5f}"
                self._progress(msg + f", at most {left:.0f} s left")
            improved = np.isfinite(metric) & (metric <= best - self.tol)
            no_improve = np.where(improved, 0, no_improve + 1)
            best = np.minimum(best, metric)
            newly = (no_improve >= self.n_iter_no_change) & ~done
            if stage.n_models > 1:
                for c in np.flatnonzero(newly):
                    self._progress(f"{stage.name}: model {c} converged after {steps} steps")
                    stage.model_converged(int(c))
            done = done | newly
            if np.all(done):
                self._progress(f"{stage.name}: converged after {steps} steps")
                return True, best_snapshot
            if stage.n_models > 1 and newly.any() and stage.set_active is not None:
                stage.set_active(np.flatnonzero(~done))
        if max_steps > 0:
            if stage.max_iter == "auto":
                # The 'auto' step budget is where the package stops a stage by
                # design: the caps were measured, and running MAPA's first
                # phase longer made held-out densities worse. "Increase the
                # budget" would be advice we cannot stand behind, so only an
                # epoch budget the user chose warns; converged_ still says it.
                self._progress(f"{stage.name}: stopped at its step budget "
                               f"({max_steps} steps) before the tol rule ended it")
                return False, best_snapshot
            warnings.warn(
                f"{type(self).__name__}: stage {stage.name!r} used its whole budget "
                f"({budget.replace('up to ', '')}, {stage.budget_param}="
                f"{stage.max_iter!r}) without converging; increase "
                f"{stage.budget_param}.",
                ConvergenceWarning,
            )
            return False, best_snapshot
        return True, best_snapshot

    def _finish_fit(self, counts_before, generator):
        """Build everything scoring needs, so nothing is built lazily later."""
        self._usable = True
        counts = self._row_counts()
        passes = dict(self.n_row_passes_)
        for name, value in counts.items():
            passes[name] = passes.get(name, 0) + value - counts_before.get(name, 0)
        self.n_row_passes_ = passes
        flops = self._flops_per_row()
        self.n_flops_ = int(sum(passes[name] * flops.get(name, 0) for name in passes))
        for module in self._networks().values():
            module.eval()
        self.eval_draws_ = sobol_normal(
            self.n_eval_samples, self.n_components, generator
        )
        self.eval_offset_ = float(torch.rand((), generator=generator, dtype=torch.float64))
        self._decoder_changed()

    def _decoder_changed(self):
        """What depends on the fitted decoder: ``noise_scale_`` and the
        quadrature grid."""
        self.noise_scale_ = self.decoder_.scale.detach().cpu().double().numpy() * self.scale_
        self._build_quadrature()

    def _build_quadrature(self):
        self._quadrature = None
        if self.n_components <= 2:
            # a model saved before 0.2 has no n_samples_fit_: the base caps
            rows = getattr(self, "n_samples_fit_", 0)
            max_points, max_elements = grid_budget(rows, self.n_features_in_)
            self._quadrature = TiledGrid(self.decoder_, self.n_components,
                                         self._torch_dtype, self.device_,
                                         max_points=max_points, max_elements=max_elements)

    # ------------------------------------------------------------------
    # scoring, sampling, transforms
    # ------------------------------------------------------------------
    def _check_X(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32], order="C")

    def _log_det(self):
        return float(np.sum(np.log(self.scale_)))

    @torch.no_grad()
    def _log_px_importance(self, Xs, adaptive=True):
        """Importance-sampling log p and its standard error, per row.

        Adaptive importance sampling from the proposal and a Laplace start
        (``_scoring.adaptive_importance_log_px``); ``adaptive=False`` draws
        from the proposal alone (the sampler before 0.2: a comparison for the
        benchmarks). Rows whose error estimate is above ``ERROR_WARN_NATS``
        are scored again with ``RESCORE_FACTOR`` times the draws (fixed by
        the fitted model, so a row's score does not depend on the others).
        """
        eps = torch.as_tensor(self.eval_draws_, device=self.device_).to(self._torch_dtype)
        out, err = self._importance_pass(Xs, eps, adaptive)
        again = err > ERROR_WARN_NATS
        if adaptive and RESCORE_FACTOR > 1 and bool(again.any()):
            more = torch.as_tensor(self._rescore_draws(), device=self.device_)
            out[again], err[again] = self._importance_pass(
                Xs[again], more.to(self._torch_dtype), adaptive)
        return out, err

    def _rescore_draws(self):
        """``RESCORE_FACTOR * n_eval_samples`` base draws of the second pass:
        a scrambled Sobol set seeded by the fitted ``eval_offset_``."""
        seed = int(self.eval_offset_ * (2**31 - 1))
        return sobol_normal(RESCORE_FACTOR * self.eval_draws_.shape[0], self.n_components,
                            torch.Generator().manual_seed(seed))

    def _importance_pass(self, Xs, eps, adaptive):
        """One importance-sampling pass over ``Xs`` with base draws ``eps``."""
        width = max([*map(int, self.hidden_layer_sizes), self.n_features_in_])
        # Results go into preallocated tensors: small long-lived result
        # tensors between the chunks' large temporaries fragment the heap,
        # and the resident memory then grew with the number of rows scored
        # (seen: +1.3 GiB for 10,000 rows in some runs, none in others).
        out = torch.empty(Xs.shape[0], dtype=self._torch_dtype, device=self.device_)
        err = torch.empty_like(out)
        # the proposal of a block of rows at once (one encoder pass or one
        # neighbour query), the draws in chunks that bound the memory
        for start in range(0, Xs.shape[0], EVAL_BATCH_ROWS):
            xb = Xs[start:start + EVAL_BATCH_ROWS]
            means, log_stds, log_w = add_prior_component(*self._proposal(xb))
            if adaptive:
                g_mean, g_chol = laplace_start(xb, self.decoder_, means, width)
            rows = importance_chunk_rows(eps.shape[0], means.shape[1], self.n_components,
                                         width, self.device_)
            for i in range(0, xb.shape[0], rows):
                sl = slice(start + i, start + i + rows)
                args = (xb[i:i + rows], self.decoder_, means[i:i + rows],
                        log_stds[i:i + rows], log_w[i:i + rows], eps, self.eval_offset_)
                if adaptive:
                    out[sl], err[sl] = adaptive_importance_log_px(
                        *args, start=(g_mean[i:i + rows], g_chol[i:i + rows]),
                        return_error=True)
                else:
                    out[sl], err[sl] = mixture_importance_log_px(*args, return_error=True)
        return out, err

    @torch.no_grad()
    def _log_px_quadrature(self, Xs, n_per_dim=None):
        """Quadrature log p and its error estimate, per row.

        ``n_per_dim`` asks for the plain grid of that many points per
        dimension, summed over every point: a reference, used by the tests
        to check the scoring grid; it returns no error estimate (None).
        """
        if self.n_components > 2:
            raise ValueError(
                "quadrature needs n_components <= 2, got "
                f"n_components={self.n_components}."
            )
        if n_per_dim is None:
            return self._quadrature.log_px(Xs, return_error=True)
        z, log_w = latent_grid(self.n_components, n_per_dim, 8.0, self._torch_dtype,
                               self.device_)
        f = torch.cat([self.decoder_(zb) for zb in z.split(EVAL_BATCH_ROWS)])
        return quadrature_log_px(Xs, f, log_w, self.decoder_.scale), None

    def _score_method(self, method=None):
        """The estimator of log p that ``method`` (default: score_method) means."""
        method = method or self.score_method
        if method == "auto":
            grid = self._quadrature
            method = "quadrature" if grid is not None and grid.resolved else "importance"
        return method

    def _log_px(self, X, method=None, return_error=False):
        lp, err = self._log_px_standardized(self._standardize(X), method)
        lp = lp - self._log_det()
        return (lp, err) if return_error else lp

    def _log_px_standardized(self, Xs, method=None):
        """log p of standardized rows (standardized units) and its error
        estimate, as numpy arrays."""
        method = self._score_method(method)
        # A row whose squared norm overflows the working precision is so far
        # out that its log-density is -inf (exactly: no error); computing it
        # would give inf - inf.
        ok = torch.isfinite((Xs * Xs).sum(-1))
        lp = torch.full((Xs.shape[0],), -math.inf, dtype=torch.float64)
        err = torch.zeros((Xs.shape[0],), dtype=torch.float64)
        if bool(ok.any()):
            Xk = Xs if bool(ok.all()) else Xs[ok]
            with torch.no_grad():
                if method == "quadrature":
                    lp_ok, err_ok = self._log_px_quadrature(Xk)
                else:
                    lp_ok, err_ok = self._log_px_importance(Xk)
            lp[ok.cpu()] = lp_ok.double().cpu()
            err[ok.cpu()] = err_ok.double().cpu()
        # below the working range, -inf is the answer at this precision
        err[torch.isneginf(lp)] = 0.0
        return lp.numpy(), err.numpy()

    def score_samples(self, X, return_error=False):
        """Log-density of each row under the model, in X's units.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.
        return_error : bool, default=False
            Also return an estimate of each value's error, in nats.

        Returns
        -------
        log_density : ndarray of shape (n_samples,)
            Estimate of log p(x) (quadrature or importance sampling, see
            ``score_method``); never a training bound.
        error : ndarray of shape (n_samples,)
            Only with ``return_error``. Quadrature: a third of the difference
            to the same sum on a twice coarser grid; importance sampling: the
            standard error of the estimate from its effective sample size.
            Both overestimate the error measured against fine grids (see
            the user guide's scoring page). A UserWarning says when more
            than ``ERROR_WARN_FRACTION`` of the rows have an error above
            ``ERROR_WARN_NATS`` (typically rows far from the training data,
            where the proposal misses the posterior).

        Examples
        --------
        >>> import numpy as np
        >>> from skmapa import VAEDensity
        >>> X = np.random.RandomState(0).normal(size=(100, 2))
        >>> est = VAEDensity(n_components=1, max_iter=5, random_state=0).fit(X)
        >>> est.score_samples(X[:4]).shape
        (4,)
        >>> log_density, error = est.score_samples(X[:4], return_error=True)
        >>> bool((error < 0.1).all())
        True
        """
        X = self._check_X(X)
        method = self._score_method()
        draws = self.n_eval_samples if method == "importance" else 1
        with self._eval_threads(X.shape[0], draws):
            lp, err = self._log_px(X, method, return_error=True)
        large = int(np.sum(err > ERROR_WARN_NATS))
        if large > ERROR_WARN_FRACTION * len(err):
            remedy = (
                "more n_eval_samples (set before fit) reduce it"
                if method == "importance"
                else "the latent grid does not resolve the decoder there; "
                "score_method='importance' is the alternative"
            )
            warnings.warn(
                f"score_samples: the estimate of {large} of {len(err)} rows may be off "
                f"by more than {ERROR_WARN_NATS} nats (score_method={method!r}): "
                "rows far from the training data, or whose posterior the proposal "
                "misses. "
                f"score_samples(X, return_error=True) gives each row's error estimate; "
                f"{remedy}.",
                UserWarning,
            )
        return (lp, err) if return_error else lp

    def score(self, X, y=None):
        """Mean log-likelihood per row (GaussianMixture's convention).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.
        y : None
            Ignored.

        Returns
        -------
        score : float
            ``score_samples(X).mean()``.

        Examples
        --------
        >>> import numpy as np
        >>> from skmapa import VAEDensity
        >>> X = np.random.RandomState(0).normal(size=(100, 2))
        >>> est = VAEDensity(n_components=1, max_iter=5, random_state=0).fit(X)
        >>> bool(est.score(X) == est.score_samples(X).mean())
        True
        """
        return float(np.mean(self.score_samples(X)))

    def sample(self, n_samples=1, random_state=None):
        """Draw rows from the fitted continuous model.

        Parameters
        ----------
        n_samples : int, default=1
            Number of rows.
        random_state : int, RandomState, Generator or None, default=None
            None gives fresh randomness on every call.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            Samples in X's units.

        Examples
        --------
        >>> import numpy as np
        >>> from skmapa import VAEDensity
        >>> X = np.random.RandomState(0).normal(size=(100, 2))
        >>> est = VAEDensity(n_components=1, max_iter=5, random_state=0).fit(X)
        >>> est.sample(3, random_state=0).shape
        (3, 2)
        """
        check_is_fitted(self)
        if not isinstance(n_samples, Integral) or isinstance(n_samples, bool) or (
            n_samples < 1
        ):
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
        rng = sampling_rng(random_state)
        z = rng.standard_normal((n_samples, self.n_components))
        eps = rng.standard_normal((n_samples, self.n_features_in_))
        with self._eval_threads(n_samples):
            mean = self._decode(z)
        return mean + eps * self.noise_scale_

    def _decode(self, Z):
        zt = self._to_tensor(Z)
        with torch.no_grad():
            f = torch.cat([self.decoder_(zb) for zb in zt.split(EVAL_BATCH_ROWS)])
        return f.double().cpu().numpy() * self.scale_ + self.mean_

    def transform(self, X):
        """Latent codes of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to encode.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            The estimator's code for each row (see the estimator's docstring).

        Examples
        --------
        >>> import numpy as np
        >>> from skmapa import VAEDensity
        >>> X = np.random.RandomState(0).normal(size=(100, 2))
        >>> est = VAEDensity(n_components=1, max_iter=5, random_state=0).fit(X)
        >>> est.transform(X[:3]).shape
        (3, 1)
        """
        X = self._check_X(X)
        Xs = self._standardize(X)
        with torch.no_grad(), self._eval_threads(X.shape[0]):
            Z = torch.cat([self._encode(xb) for xb in Xs.split(EVAL_BATCH_ROWS)])
        return Z.double().cpu().numpy()

    def inverse_transform(self, X):
        """Decoder mean f(z) of latent codes, in X's units.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Latent codes.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
            Decoded rows.

        Examples
        --------
        >>> import numpy as np
        >>> from skmapa import VAEDensity
        >>> X = np.random.RandomState(0).normal(size=(100, 2))
        >>> est = VAEDensity(n_components=1, max_iter=5, random_state=0).fit(X)
        >>> est.inverse_transform(np.zeros((2, 1))).shape
        (2, 2)
        """
        check_is_fitted(self)
        Z = check_array(X, dtype=np.float64, input_name="X")
        if Z.shape[1] != self.n_components:
            raise ValueError(
                f"inverse_transform expects {self.n_components} columns "
                f"(n_components), got {Z.shape[1]}."
            )
        with self._eval_threads(Z.shape[0]):
            return self._decode(Z)

    @property
    def _n_features_out(self):
        return self.n_components

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags

    # ------------------------------------------------------------------
    # pickling: tensors travel on the CPU and come back on the best device
    # ------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        for name, value in state.items():
            if isinstance(value, torch.nn.Module):
                state[name] = copy.deepcopy(value).to("cpu")
            elif isinstance(value, torch.Tensor):
                state[name] = value.detach().to("cpu")
            elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
                state[name] = tuple(
                    v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for v in value
                )
        if isinstance(state.get("device_"), torch.device):
            state["device_"] = str(state["device_"])
        if state.get("_quadrature") is not None:
            state["_quadrature"] = None  # derived; rebuilt by __setstate__
            state["_rebuild_quadrature"] = True
        return state

    def __setstate__(self, state):
        device = state.get("device_")
        if device is not None:
            wanted = torch.device(device)
            try:
                available = resolve_device(str(wanted))
            except ValueError:
                warnings.warn(
                    f"This estimator was fitted on {wanted}, which is not available "
                    "here; it is loaded on the CPU.",
                    UserWarning,
                )
                available = torch.device("cpu")
            state["device_"] = available
        super().__setstate__(state)
        if device is not None:
            for name, value in list(vars(self).items()):
                if isinstance(value, torch.nn.Module):
                    setattr(self, name, value.to(self.device_))
                elif isinstance(value, torch.Tensor):
                    setattr(self, name, value.to(self.device_))
                elif isinstance(value, tuple) and any(
                    isinstance(v, torch.Tensor) for v in value
                ):
                    setattr(
                        self,
                        name,
                        tuple(
                            v.to(self.device_) if isinstance(v, torch.Tensor) else v
                            for v in value
                        ),
                    )
        if vars(self).pop("_rebuild_quadrature", False):
            self._build_quadrature()
