r"""Diagnostics: posterior agreement with a known truth, and inference gaps.

Two families of diagnostics.

**Posterior agreement** (synthetic data with a known mean function ``f`` and
known codes, i.e. a Bunch from :mod:`skmapa.datasets`). MAPA approximates the
posterior of the *empiricalized* model, whose prior is the empirical
distribution of the training codes ``z_m``:

.. math::

    \hat p(m \mid x) \propto \mathcal{N}(x; f(z_m), \sigma^2 I)
    \quad\text{vs.}\quad
    q(m \mid x) \propto \exp(-\lVert x - x_m \rVert^2 / (2 \tau^2)),

both over the ``k`` training rows nearest to ``x``. :func:`true_posterior`,
:func:`empirical_posterior`, :func:`mapa_posterior` and
:func:`estimator_posterior` return log-posteriors over one shared index set
(the neighbours of ``x``), and :func:`posterior_agreement` summarises their
per-row Spearman rank correlation. :func:`make_nonidentifiable_pair` gives the
two members of a non-identifiable pair *on the same data* (the second member's
codes are mapped so that ``f_2(z'_m) = f_1(z_m)``), and
:func:`latent_posterior_agreement` compares the shape of a fitted model's
posterior *in its latent space* with each member's (at the midpoints between
the neighbours' codes), which is where the members differ.

Two facts shape what these numbers mean (measured figures in the function
docstrings):

* On a shared index set the two members of a pair have the *same*
  empiricalized posterior (``f_1(z_m) = f_2(z'_m)``): the index posterior is
  identifiable, the latent posterior is not. MAPA never sees ``f``, so it is
  identical for both members, and so is its agreement with them. A fitted
  decoder, however, has chosen one parametrisation; its posterior's latent
  geometry matches one member's and not the other's.
* The rank correlation over the ``k`` nearest rows is limited by how much of
  the posterior the neighbourhood spans. When it is narrower than the noise
  (large N, small k), every neighbour is about equally likely under the
  truth and their order is set by their own noise, which MAPA, seeing only
  ``x_m``, cannot remove; ``coverage`` (the share of the empiricalized
  posterior on the index set) tells which regime a number comes from. (A
  model that has learned the curve can remove the part of a neighbour's
  noise across it: a well-fitted VAE ranked the neighbours better than MAPA
  on the 2-D sets, see :func:`posterior_agreement`.)

**Inference gaps** (Cremer, Li & Duvenaud, 2018). :func:`inference_gaps`
splits the gap between log p(x) and the ELBO of the estimator's own
posterior approximation ``q`` into the approximation gap
``log p(x) - ELBO[q*]`` (``q*`` the best diagonal Gaussian for the row) and the
amortization gap ``ELBO[q*] - ELBO[q]``, with log p(x) from both a
many-sample importance estimate and annealed importance sampling.
"""

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from scipy.special import logsumexp, ndtr, ndtri
from scipy.stats import rankdata
from sklearn.utils import Bunch, check_array
from sklearn.utils.validation import check_is_fitted

from . import _mapa
from ._networks import MLP, gaussian_log_prob, standard_normal_log_prob
from ._scoring import add_prior_component, draws_mixture_log_prob, mixture_draws
from ._utils import torch_generator
from .datasets import DATASETS

__all__ = [
    "empirical_posterior",
    "estimator_posterior",
    "inference_gaps",
    "latent_posterior_agreement",
    "make_nonidentifiable_pair",
    "mapa_posterior",
    "posterior_agreement",
    "rowwise_spearman",
    "true_posterior",
]

#: (row, atom) pairs handled at once when normalising the empiricalized posterior.
_CHUNK_ELEMENTS = 2**22
#: Elements (rows x draws x components x dims) handled at once in the gap estimates.
_TORCH_CHUNK = 2**21
#: Target mean acceptance probability of the adapted HMC step size in AIS.
AIS_TARGET_ACCEPTANCE = 0.65
#: inference_gaps warns about rows where |log p_AIS - log p_IS| exceeds this
#: (nats) plus four combined standard errors.
AIS_IS_WARN = 0.1


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _is_int(value):
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def _check_positive_int(value, name, minimum=1):
    if not _is_int(value) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} int, got {value!r}.")
    return int(value)


def _is_positive_float(value):
    return (
        isinstance(value, Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
        and value > 0
    )


def _check_bunch(bunch):
    missing = [k for k in ("X", "codes", "f", "log_prior", "noise", "log_density")
               if k not in bunch]
    if missing:
        raise ValueError(
            "bunch must be a data set from skmapa.datasets (with X, codes, f, "
            f"log_prior, noise and log_density); missing {missing}."
        )


def _codes_2d(z):
    z = np.asarray(z, dtype=np.float64)
    return z[:, None] if z.ndim == 1 else z


def rowwise_spearman(a, b):
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``.

    Ties get average ranks; a row where either side is constant gives nan.

    Parameters
    ----------
    a, b : array-like of shape (n_rows, n_items)

    Returns
    -------
    rho : ndarray of shape (n_rows,)
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"a and b must be 2-D of the same shape, got {a.shape} and {b.shape}."
        )
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _neighbours(X_train, x, n_neighbors, index=None):
    """Distances and indices of the k nearest training rows of each query.

    ``x=None`` queries the training rows themselves, leaving each row out of
    its own neighbour list (by index, so duplicated rows stay neighbours).
    """
    index = _mapa.fit_neighbors(X_train) if index is None else index
    N = X_train.shape[0]
    if x is not None:
        if n_neighbors > N:
            raise ValueError(
                f"n_neighbors={n_neighbors} exceeds the {N} training rows."
            )
        return _mapa.kneighbors(index, x, n_neighbors)
    if n_neighbors > N - 1:
        raise ValueError(
            f"n_neighbors={n_neighbors} must be below the {N} training rows "
            "(each row is left out of its own neighbours)."
        )
    dist, idx = _mapa.kneighbors(index, X_train, n_neighbors + 1)
    drop = idx == np.arange(N)[:, None]
    # rows whose self did not make the list (exact duplicates): drop the farthest
    drop[~drop.any(1), -1] = True
    # a row may match itself once only
    first = np.argmax(drop, axis=1)
    drop[:] = False
    drop[np.arange(N), first] = True
    keep = ~drop
    return dist[keep].reshape(N, n_neighbors), idx[keep].reshape(N, n_neighbors)


def _log_likelihood(bunch, x, z):
    """log N(x_i; f(z_ij), noise^2 I) for x (n, D) and codes z (n, m)."""
    n, m = z.shape
    f = np.asarray(bunch.f(z.reshape(-1)), dtype=np.float64).reshape(n, m, -1)
    D = f.shape[-1]
    s2 = bunch.noise**2
    return (-0.5 * ((x[:, None, :] - f) ** 2).sum(-1) / s2
            - 0.5 * D * math.log(2 * math.pi * s2))


# ---------------------------------------------------------------------------
# posteriors over one index set
# ---------------------------------------------------------------------------
def true_posterior(bunch, x, z):
    r"""Log posterior density ``log p(z | x)`` of the data set's original model.

    .. math::

        \log p(z \mid x) = \log p(z) + \log \mathcal{N}(x; f(z), \sigma^2 I)
        - \log p(x),

    with ``log p(x)`` the Bunch's ``log_density`` (its quadrature over
    ``latent_grid``), so the density integrates to one over the latent space.

    Parameters
    ----------
    bunch : sklearn.utils.Bunch
        A data set from :mod:`skmapa.datasets`.
    x : array-like of shape (n, n_features)
        Observations.
    z : array-like of shape (m,) or (n, m)
        Latent values: shared by every row (1-D) or one set per row (2-D).

    Returns
    -------
    log_post : ndarray of shape (n, m)
        ``-inf`` outside the prior's support.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.special import logsumexp
    >>> from skmapa.datasets import make_figure1
    >>> from skmapa.diagnostics import true_posterior
    >>> data = make_figure1(100, random_state=0)
    >>> lp = true_posterior(data, data.X[:2], data.latent_grid)
    >>> lp.shape == (2, data.latent_grid.size)
    True
    >>> # with the quadrature weights (incl. the prior) it sums to one
    >>> w = data.latent_log_weights - data.log_prior(data.latent_grid)
    >>> np.round(np.exp(logsumexp(lp + w, axis=1)), 6).tolist()
    [1.0, 1.0]
    """
    _check_bunch(bunch)
    x = check_array(x, dtype=np.float64, input_name="x")
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = np.broadcast_to(z, (x.shape[0], z.size))
    if z.ndim != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"z must have shape (m,) or ({x.shape[0]}, m), got {z.shape}.")
    log_prior = np.asarray(bunch.log_prior(z.reshape(-1))).reshape(z.shape)
    with np.errstate(invalid="ignore"):
        ll = _log_likelihood(bunch, x, np.ascontiguousarray(z))
        return log_prior + ll - bunch.log_density(x)[:, None]


def empirical_posterior(bunch, x=None, *, n_neighbors=20, indices=None):
    r"""Posterior over training indices of the empiricalized model.

    The empiricalized model replaces the prior by the empirical distribution
    of the training codes ``z_m = bunch.codes[m]``, so its posterior is over
    indices: ``p_hat(m | x) ∝ N(x; f(z_m), noise^2 I)``. It is returned over
    the index set of each row (by default its ``n_neighbors`` nearest rows of
    ``bunch.X``, the set MAPA uses), renormalised over that set.

    Parameters
    ----------
    bunch : sklearn.utils.Bunch
        A data set from :mod:`skmapa.datasets`; its rows are the training
        rows (the atoms).
    x : array-like of shape (n, n_features), default=None
        Query rows. None queries the training rows themselves, each left out
        of its own index set and of the normalisation (leave-one-out).
    n_neighbors : int, default=20
        Size of the index set when ``indices`` is None.
    indices : array-like of int, shape (n, k), default=None
        Index sets to use instead of the nearest neighbours.

    Returns
    -------
    result : Bunch
        ``indices`` (n, k); ``log_weights`` (n, k), log p_hat(m | x) normalised
        over the set; ``coverage`` (n,), the posterior mass of the set under
        p_hat normalised over all training rows (1 means the set holds the
        whole posterior).

    Examples
    --------
    >>> from skmapa.datasets import make_figure1
    >>> from skmapa.diagnostics import empirical_posterior
    >>> data = make_figure1(300, random_state=0)
    >>> post = empirical_posterior(data, n_neighbors=100)
    >>> post.log_weights.shape
    (300, 100)
    >>> # 100 of 300 neighbours hold nearly all of the posterior
    >>> bool(np.median(post.coverage) > 0.95)
    True
    """
    _check_bunch(bunch)
    X_train = check_array(bunch.X, dtype=np.float64, input_name="bunch.X")
    codes = _codes_2d(bunch.codes)
    loo = x is None
    xq = X_train if loo else check_array(x, dtype=np.float64, input_name="x")
    if indices is None:
        n_neighbors = _check_positive_int(n_neighbors, "n_neighbors")
        _, indices = _neighbours(X_train, None if loo else xq, n_neighbors)
    indices = _check_indices(indices, xq.shape[0], X_train.shape[0])
    f_atoms = np.asarray(bunch.f(codes), dtype=np.float64).reshape(X_train.shape[0], -1)
    s2 = bunch.noise**2
    logits = -0.5 * ((xq[:, None, :] - f_atoms[indices]) ** 2).sum(-1) / s2
    log_norm_set = logsumexp(logits, axis=1)
    # normalisation over all atoms, in chunks of rows (O(chunk * N) memory)
    N = X_train.shape[0]
    log_norm_all = np.empty(xq.shape[0])
    rows = max(1, _CHUNK_ELEMENTS // max(N, 1))
    for start in range(0, xq.shape[0], rows):
        xb = xq[start:start + rows]
        a = -0.5 * (
            (xb * xb).sum(1)[:, None] - 2 * xb @ f_atoms.T + (f_atoms**2).sum(1)[None]
        ) / s2
        if loo:
            a[np.arange(xb.shape[0]), np.arange(start, start + xb.shape[0])] = -np.inf
        log_norm_all[start:start + rows] = logsumexp(a, axis=1)
    return Bunch(
        indices=indices,
        log_weights=logits - log_norm_set[:, None],
        coverage=np.exp(np.minimum(log_norm_set - log_norm_all, 0.0)),
    )


def _check_indices(indices, n, N):
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[0] != n:
        raise ValueError(f"indices must have shape ({n}, k), got {indices.shape}.")
    if not np.issubdtype(indices.dtype, np.integer) or (
        indices.size and (indices.min() < 0 or indices.max() >= N)
    ):
        raise ValueError(f"indices must be ints in [0, {N}).")
    return indices.astype(np.intp)


def mapa_posterior(X_train, x=None, *, n_neighbors=20, bandwidth="auto"):
    r"""MAPA, ``softmax_m(-||x - x_m||^2 / (2 tau^2))`` over the k nearest rows.

    Computed from the data alone with :mod:`skmapa._mapa` (the functions
    :class:`~skmapa.MAPADensity` uses): no mean function, no prior. With
    ``X_train = est.X_fit_``, ``x = est._standardize(X)`` and ``bandwidth =
    est.bandwidth_`` it reproduces a fitted estimator's weights.

    Parameters
    ----------
    X_train : array-like of shape (N, n_features)
        Training rows (the atoms), in the units the distances are taken in.
    x : array-like of shape (n, n_features), default=None
        Query rows. None queries the training rows, each left out of its own
        neighbours (leave-one-out).
    n_neighbors : int, default=20
        k.
    bandwidth : 'auto' or float, default='auto'
        tau. 'auto' is the rule of ``MAPADensity``: the mean distance of the
        training rows to their ``n_neighbors`` nearest rows (self excluded).

    Returns
    -------
    result : Bunch
        ``indices`` (n, k), ``log_weights`` (n, k) normalised over each row's
        neighbours, ``distances`` (n, k) and ``bandwidth`` (float).

    Examples
    --------
    >>> from skmapa.datasets import make_figure1
    >>> from skmapa.diagnostics import mapa_posterior
    >>> data = make_figure1(200, random_state=0)
    >>> q = mapa_posterior(data.X, data.X[:3], n_neighbors=10)
    >>> q.indices.shape, q.log_weights.shape
    ((3, 10), (3, 10))
    >>> np.exp(q.log_weights).sum(1).round(6).tolist()
    [1.0, 1.0, 1.0]
    """
    X_train = check_array(X_train, dtype=np.float64, input_name="X_train")
    n_neighbors = _check_positive_int(n_neighbors, "n_neighbors")
    N = X_train.shape[0]
    index = _mapa.fit_neighbors(X_train)
    if isinstance(bandwidth, str) and bandwidth == "auto":
        dist_train, _ = _mapa.kneighbors(index, X_train, min(n_neighbors, N))
        bandwidth = _mapa.auto_bandwidth(dist_train)
    elif not _is_positive_float(bandwidth):
        raise ValueError(
            f"bandwidth must be 'auto' or a positive float, got {bandwidth!r}."
        )
    xq = None if x is None else check_array(x, dtype=np.float64, input_name="x")
    dist, idx = _neighbours(X_train, xq, n_neighbors, index)
    log_q = _mapa.mapa_log_weights(dist, idx, float(bandwidth), np.zeros(N))
    return Bunch(
        indices=idx, log_weights=log_q, distances=dist, bandwidth=float(bandwidth)
    )


# ---------------------------------------------------------------------------
# a fitted estimator's own posterior approximation
# ---------------------------------------------------------------------------
def _own_q(estimator, Xs):
    """The estimator's q(z | x) as a Gaussian mixture (means, log_stds, log_w).

    VAE/IWAE: the encoder (a Gaussian, or a mixture for a recursive encoder)
    without the widening that scoring applies (the estimator's ``_q`` hook
    where it has one); MAPA: its scoring proposal without the prior component
    (the MAPA mixture over the neighbours' codes, with the widened Laplace
    widths).
    """
    if hasattr(estimator, "_q"):
        return estimator._q(Xs)
    if hasattr(estimator, "encoder_"):
        mu, log_std = estimator.encoder_(Xs)
        return mu.unsqueeze(1), log_std.unsqueeze(1), mu.new_zeros((mu.shape[0], 1))
    return estimator._proposal(Xs)


def _tensor(estimator, a):
    a = torch.as_tensor(np.asarray(a, dtype=np.float64), device=estimator.device_)
    return a.to(estimator._torch_dtype)


def _estimator_log_q(estimator, xq, points):
    """log q(points | x) under the estimator's own q; points (n, m, d) in its latent."""
    out = []
    with torch.no_grad():
        Xs = estimator._standardize(xq)
        C = _own_q(estimator, Xs[:1])[0].shape[1]
        d = points.shape[-1]
        rows = max(1, _TORCH_CHUNK // max(points.shape[1] * C * d, 1))
        for start in range(0, xq.shape[0], rows):
            sl = slice(start, start + rows)
            means, log_stds, log_w = _own_q(estimator, Xs[sl])
            lq = draws_mixture_log_prob(_tensor(estimator, points[sl]), means, log_stds,
                                      log_w)
            out.append(lq.double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, points.shape[1]))


def estimator_posterior(estimator, X_train, x=None, *, n_neighbors=20, indices=None):
    r"""A fitted estimator's posterior, at its own codes of each row's neighbours.

    An estimator's latent space is its own (not the data set's), so its
    posterior ``q(z | x)`` is read where it places the neighbours: at
    ``z_hat_m = estimator.transform(X_train[m])``. The values, normalised over
    the index set, are comparable with :func:`empirical_posterior` and
    :func:`mapa_posterior` on the same set. ``q`` is the estimator's own
    approximation: the encoder Gaussian for VAE/IWAE, the MAPA mixture over
    the neighbours' codes for MAPA (its scoring proposal without the prior).

    Parameters
    ----------
    estimator : fitted VAEDensity, IWAEDensity or MAPADensity
    X_train : array-like of shape (N, n_features)
        Training rows (the atoms), in the estimator's input units.
    x : array-like of shape (n, n_features), default=None
        Query rows; None queries ``X_train`` leave-one-out.
    n_neighbors : int, default=20
        Size of the index set when ``indices`` is None.
    indices : array-like of int, shape (n, k), default=None
        Index sets to use instead of the nearest neighbours.

    Returns
    -------
    result : Bunch
        ``indices`` (n, k), ``log_weights`` (n, k) (log q(z_hat_m | x)
        normalised over the set), ``log_density`` (n, k) (unnormalised) and
        ``codes`` (n, k, n_components), the z_hat_m.

    Examples
    --------
    >>> from skmapa import VAEDensity
    >>> from skmapa.datasets import make_figure1
    >>> from skmapa.diagnostics import estimator_posterior
    >>> data = make_figure1(200, random_state=0)
    >>> vae = VAEDensity(n_components=1, hidden_layer_sizes=(16,), max_iter=5,
    ...                  random_state=0).fit(data.X)
    >>> post = estimator_posterior(vae, data.X, n_neighbors=10)
    >>> post.log_weights.shape, post.codes.shape
    ((200, 10), (200, 10, 1))
    """
    check_is_fitted(estimator)
    X_train = check_array(X_train, dtype=np.float64, input_name="X_train")
    xq = X_train if x is None else check_array(x, dtype=np.float64, input_name="x")
    if indices is None:
        n_neighbors = _check_positive_int(n_neighbors, "n_neighbors")
        _, indices = _neighbours(X_train, None if x is None else xq, n_neighbors)
    indices = _check_indices(indices, xq.shape[0], X_train.shape[0])
    codes = estimator.transform(X_train)[indices]
    log_density = _estimator_log_q(estimator, xq, codes)
    return Bunch(
        indices=indices,
        log_weights=log_density - logsumexp(log_density, axis=1, keepdims=True),
        log_density=log_density,
        codes=codes,
    )


# ---------------------------------------------------------------------------
# agreement summaries
# ---------------------------------------------------------------------------
def _summary(rho):
    ok = np.isfinite(rho)
    return (
        float(np.mean(rho[ok])) if ok.any() else float("nan"),
        float(np.median(rho[ok])) if ok.any() else float("nan"),
    )


def posterior_agreement(
    bunch,
    X=None,
    *,
    estimator=None,
    n_neighbors=20,
    bandwidth="auto",
    target="empirical",
):
    r"""How well MAPA (or a fitted estimator's posterior) ranks the true posterior.

    For each query row, the Spearman rank correlation over its
    ``n_neighbors`` nearest training rows between the approximation's
    log-weights and the truth's:

    * approximation: MAPA computed from ``bunch.X`` alone
      (:func:`mapa_posterior`), or, with ``estimator``, the estimator's own
      posterior at its codes of the neighbours (:func:`estimator_posterior`);
    * truth (``target``): the empiricalized posterior ``p_hat(m | x)``
      (:func:`empirical_posterior`, the quantity MAPA approximates), or the
      original model's posterior density at the neighbours' true codes
      (:func:`true_posterior`). With a uniform prior the two differ by a
      constant and give the same correlation.

    Measured (leave-one-out, ``random_state=0``, ``bandwidth='auto'``): the
    correlation grows with the share of the posterior the neighbourhood
    spans (``coverage``). Median Spearman of MAPA, k = 20 / 50 / 100 / 200:
    Figure 1 (noise 0.01), N = 300: 0.11 / 0.43 / 0.77 / 0.92 (median
    coverage 0.44 / 0.88 / 0.99 / 1.00); N = 500: 0.08 / 0.22 / 0.49 / 0.82;
    absolute value, N = 500: 0.20 / 0.53 / 0.84 / 0.95; circle, N = 500: 0.25
    / 0.59 / 0.86 / 0.96. Inside the bulk of the posterior (coverage well
    below 1) every neighbour is about equally likely, and their order is set
    by each neighbour's own noise, which MAPA cannot remove. At N = 1000
    (Figure 1) the default k = 20 held a median 15% of the empiricalized
    posterior (Spearman 0.02; k = 200: 91%, 0.53). A decoder that has learned
    the curve can discount the noise across it: a well-fitted VAE's encoder
    (N = 1000, 2x32 units, 300 epochs) ranked the neighbours better than MAPA
    on the absolute value (k = 50: 0.37 vs 0.27) and the circle (0.31 vs
    0.29), and the same in 1-D (Figure 1: 0.10 vs 0.10).

    Parameters
    ----------
    bunch : sklearn.utils.Bunch
        A data set from :mod:`skmapa.datasets`: the training rows ``X`` with
        their true ``codes`` and ``f``.
    X : array-like of shape (n, n_features), default=None
        Query rows (held out). None queries every training row against the
        others (leave-one-out).
    estimator : fitted estimator, default=None
        None scores MAPA; otherwise the estimator's posterior (fitted on
        ``bunch.X`` or on data from the same distribution).
    n_neighbors : int, default=20
        k: the index set, and MAPA's truncation.
    bandwidth : 'auto' or float, default='auto'
        MAPA's tau, in X's units (see :func:`mapa_posterior`); ignored with
        ``estimator`` (and it does not change a rank correlation).
    target : {'empirical', 'true'}, default='empirical'
        The truth to compare with.

    Returns
    -------
    result : Bunch
        ``spearman`` (n,), ``mean`` and ``median`` (of the finite values),
        ``coverage`` (n,) (empiricalized posterior mass of the index set),
        ``indices`` (n, k), ``log_weights`` (n, k) of the approximation and
        ``target_log_weights`` (n, k) of the truth.

    See Also
    --------
    latent_posterior_agreement : Compares posteriors in latent space.

    Examples
    --------
    >>> from skmapa.datasets import make_figure1
    >>> from skmapa.diagnostics import posterior_agreement
    >>> data = make_figure1(300, random_state=0)
    >>> res = posterior_agreement(data, n_neighbors=100)
    >>> round(res.median, 2)  # MAPA follows the empiricalized posterior
    0.77
    >>> res.spearman.shape
    (300,)
    """
    _check_bunch(bunch)
    if target not in ("empirical", "true"):
        raise ValueError(f"target must be 'empirical' or 'true', got {target!r}.")
    n_neighbors = _check_positive_int(n_neighbors, "n_neighbors")
    X_train = check_array(bunch.X, dtype=np.float64, input_name="bunch.X")
    xq = None if X is None else check_array(X, dtype=np.float64, input_name="X")
    if estimator is None:
        approx = mapa_posterior(X_train, xq, n_neighbors=n_neighbors,
                                bandwidth=bandwidth)
        indices = approx.indices
    else:
        _, indices = _neighbours(X_train, xq, n_neighbors)
        approx = estimator_posterior(estimator, X_train, xq, indices=indices)
    emp = empirical_posterior(bunch, xq, indices=indices)
    if target == "empirical":
        truth = emp.log_weights
    else:
        xt = X_train if xq is None else xq
        truth = true_posterior(bunch, xt, _codes_2d(bunch.codes)[indices, 0])
    rho = rowwise_spearman(approx.log_weights, truth)
    mean, median = _summary(rho)
    return Bunch(
        spearman=rho,
        mean=mean,
        median=median,
        coverage=emp.coverage,
        indices=indices,
        log_weights=approx.log_weights,
        target_log_weights=truth,
    )


def latent_posterior_agreement(estimator, bunch, X=None, *, n_neighbors=20):
    r"""Does a fitted model's posterior have the latent shape of the true one?

    Over one index set the two members of a non-identifiable pair have the
    same posterior (see :func:`make_nonidentifiable_pair`); they differ in
    the latent space, e.g. Figure 1's variant 1 puts the neighbours of ``x``
    in two separate groups of codes (``z = 0.5 ± sqrt(x)``) and variant 2 in
    one. This compares the shapes between the neighbours: for each row and
    each pair ``a < b`` of its ``n_neighbors`` nearest training rows, the
    estimator's log q at the midpoint of its codes ``(z_hat_a + z_hat_b) / 2``
    against the true log p(z | x) at the midpoint of the true codes
    ``(z_a + z_b) / 2``; Spearman over the ``k (k - 1) / 2`` pairs.

    A Gaussian (unimodal, convex) posterior in the estimator's latent space
    agrees with a member whose neighbours' codes form one group and not with
    one whose codes split. MAPA itself has no latent space: it is a
    posterior over indices, the same for both members.

    Measured (median, member 1 / member 2, N = 1000, k = 100, leave-one-out,
    2x32 units, 300 epochs): VAE: Figure 1 0.10 / 0.28, absolute value 0.22 /
    0.62, circle 0.52 / 0.51; the MAPADensity fitted to the same data
    (its MAPA mixture at its codes): 0.09 / 0.27, 0.19 / 0.52, 0.41 / 0.51.
    Any fitted decoder has chosen a parametrisation, MAPA's too; on the
    circle both members are injective but for one cut each, and the
    preference is weak.

    Parameters
    ----------
    estimator : fitted VAEDensity, IWAEDensity or MAPADensity
        Its ``transform`` gives the codes, its own q the density (see
        :func:`estimator_posterior`); any ``n_components``.
    bunch : sklearn.utils.Bunch
        A data set from :mod:`skmapa.datasets` (training rows and truth).
    X : array-like of shape (n, n_features), default=None
        Query rows; None queries the training rows leave-one-out.
    n_neighbors : int, default=20
        k.

    Returns
    -------
    result : Bunch
        ``spearman`` (n,), ``mean`` and ``median``.

    Examples
    --------
    >>> from skmapa import VAEDensity
    >>> from skmapa.datasets import make_figure1
    >>> from skmapa.diagnostics import latent_posterior_agreement
    >>> data = make_figure1(200, random_state=0)
    >>> vae = VAEDensity(n_components=1, hidden_layer_sizes=(16,), max_iter=5,
    ...                  random_state=0).fit(data.X)
    >>> latent_posterior_agreement(vae, data, n_neighbors=10).spearman.shape
    (200,)
    """
    check_is_fitted(estimator)
    _check_bunch(bunch)
    n_neighbors = _check_positive_int(n_neighbors, "n_neighbors")
    if n_neighbors < 3:
        raise ValueError("n_neighbors must be at least 3 (pairs of neighbours).")
    X_train = check_array(bunch.X, dtype=np.float64, input_name="bunch.X")
    xq = None if X is None else check_array(X, dtype=np.float64, input_name="X")
    _, indices = _neighbours(X_train, xq, n_neighbors)
    xt = X_train if xq is None else xq
    a, b = np.triu_indices(n_neighbors, k=1)
    codes_hat = estimator.transform(X_train)
    mid_hat = 0.5 * (codes_hat[indices[:, a]] + codes_hat[indices[:, b]])
    lq = _estimator_log_q(estimator, xt, mid_hat)
    codes = _codes_2d(bunch.codes)[:, 0]
    mid = 0.5 * (codes[indices[:, a]] + codes[indices[:, b]])
    lp = true_posterior(bunch, xt, mid)
    rho = rowwise_spearman(lq, lp)
    mean, median = _summary(rho)
    return Bunch(spearman=rho, mean=mean, median=median)


# ---------------------------------------------------------------------------
# non-identifiable pairs on the same data
# ---------------------------------------------------------------------------
def _figure1_partner(z):
    return np.abs(1.0 - 2.0 * z)


def _absolute_value_partner(z):
    return 2.0 * np.abs(z) - 1.0


def _circle_partner(z):
    # angle 2 pi Phi(z) = pi/2 - 2 pi Phi(z') (mod 2 pi)
    # <=> Phi(z') = 1/4 - Phi(z) (mod 1)
    u = np.mod(0.25 - ndtr(z), 1.0)
    tiny = np.finfo(np.float64).tiny
    return ndtri(np.clip(u, tiny, 1.0 - 1e-16))


_PARTNERS = {
    "figure1": _figure1_partner,
    "absolute_value": _absolute_value_partner,
    "circle": _circle_partner,
}


def make_nonidentifiable_pair(name, n_samples=2000, *, noise=None, random_state=None):
    """The two members of a non-identifiable pair, explaining the *same* data.

    The data sets of :mod:`skmapa.datasets` generate each variant from its
    own mean function, so two calls give two different samples. Here the
    data come from variant 1, and variant 2 explains the same rows with codes
    ``z'_m`` mapped so that ``f_2(z'_m) = f_1(z_m)`` and ``z'`` has variant 2's
    prior (``z' = |1 - 2 z|`` for Figure 1, ``2 |z| - 1`` for the absolute
    value, the reflected angle for the circle): the same X, noise and
    density, different ``f``, codes and posteriors.

    Parameters
    ----------
    name : {'figure1', 'absolute_value', 'circle'}
        The pair.
    n_samples : int, default=2000
        Number of rows.
    noise : float, default=None
        Noise standard deviation; None uses the data set's default.
    random_state : int, RandomState instance or None, default=None
        Seed of the draws.

    Returns
    -------
    member1, member2 : Bunch
        Data sets as from :mod:`skmapa.datasets`, sharing ``X``.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa.diagnostics import make_nonidentifiable_pair
    >>> m1, m2 = make_nonidentifiable_pair("figure1", 100, random_state=0)
    >>> m1.X is m2.X
    True
    >>> bool(np.allclose(m1.f(m1.codes), m2.f(m2.codes)))
    True
    """
    if name not in _PARTNERS:
        raise ValueError(f"name must be one of {sorted(_PARTNERS)}, got {name!r}.")
    make = DATASETS[name]
    kwargs = {} if noise is None else {"noise": noise}
    member1 = make(n_samples, variant=1, random_state=random_state, **kwargs)
    member2 = make(1, variant=2, random_state=0, noise=member1.noise)
    codes2 = _PARTNERS[name](member1.codes[:, 0])[:, None]
    member2.X = member1.X
    member2.codes = codes2
    member2.DESCR = member2.DESCR + " Rows and codes mapped from variant 1 (same X)."
    return member1, member2


# ---------------------------------------------------------------------------
# inference gaps
# ---------------------------------------------------------------------------
class _CounterGuard:
    """Restore the networks' forward-row counters: diagnostics do not count as use."""

    def __init__(self, estimator):
        self.modules = [
            m for net in estimator._networks().values() for m in net.modules()
            if isinstance(m, MLP)
        ]

    def __enter__(self):
        self.saved = [m.rows_forward for m in self.modules]
        return self

    def __exit__(self, *exc):
        for m, value in zip(self.modules, self.saved):
            m.rows_forward = value
        return False


def _draw(shape, generator, like, kind="normal"):
    if kind == "normal":
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        t = torch.rand(shape, generator=generator, dtype=torch.float64)
    return t.to(device=like.device, dtype=like.dtype)


def _mixture_log_weights(decoder, x, means, log_stds, log_w, eps, u0):
    """log p(x, z_s) - log q(z_s) for stratified draws z_s of a Gaussian mixture
    (``_scoring.mixture_draws``: systematic allocation of the draws to the
    components), so the mean of the returned values is an unbiased
    (stratified) estimate of the ELBO and their log-mean-exp one of log p(x).
    """
    z, log_q = mixture_draws(means, log_stds, log_w, eps, u0)
    return decoder.log_prob(x.unsqueeze(1), z) + standard_normal_log_prob(z) - log_q


def _gaussian_elbo(decoder, x, mu, log_std, eps, stop_gradient=False):
    """ELBO of N(mu, diag(exp(log_std)^2)) per row from base draws eps (n, S, d).

    ``mean_s[log p(x, z_s) - log q(z_s)]`` with ``log q`` evaluated at the
    draws: when q is close to the posterior the summand is nearly constant,
    so this has far less variance than an analytic entropy plus the mean of
    ``log p(x, z_s)``. ``stop_gradient`` detaches q's parameters inside
    ``log q`` (the "sticking the landing" gradient of Roeder et al., 2017,
    whose variance vanishes at the exact posterior).
    """
    std = torch.exp(log_std)
    z = mu.unsqueeze(1) + std.unsqueeze(1) * eps
    if stop_gradient:
        log_q = gaussian_log_prob(z, mu.detach().unsqueeze(1),
                                  std.detach().unsqueeze(1))
    else:
        log_q = gaussian_log_prob(z, mu.unsqueeze(1), std.unsqueeze(1))
    joint = decoder.log_prob(x.unsqueeze(1), z) + standard_normal_log_prob(z)
    return (joint - log_q).mean(1)


def _importance_log_px(decoder, x, means, log_stds, log_w, n_samples, generator):
    """Importance sampling with q mixed with the prior: (estimate, stderr) per row."""
    means, log_stds, log_w = add_prior_component(means, log_stds, log_w)
    n, C, d = means.shape
    eps = _draw((n, n_samples, d), generator, x)
    u0 = _draw((n, 1), generator, x, "uniform")
    lw = _mixture_log_weights(decoder, x, means, log_stds, log_w, eps, u0)
    return torch.logsumexp(lw, dim=1) - math.log(n_samples), _log_mean_exp_stderr(lw)


def _posterior_variance_guess(means, log_stds, log_w):
    """Mean over latent dimensions of q's within-component variance, in [1e-6, 1]."""
    var = (torch.exp(log_w).unsqueeze(-1) * torch.exp(2 * log_stds)).sum(1).mean(-1)
    return var.double().cpu().numpy().clip(1e-6, 1.0)


def _ais_schedule(n_steps, beta0):
    r"""Inverse temperatures 0 = b_0 < ... < b_T = 1 for each row, shape (T + 1, n).

    Along ``p(z) p(x|z)^beta`` with a locally Gaussian posterior of variance
    ``v`` (prior variance 1), the tempered target has variance about
    ``v / (beta + v)`` and ``log p(x|z)`` varies under it with a variance of
    about ``d / (2 (beta + v)^2)``; the variance of the AIS weights is smallest
    when every step has the same ``delta beta / (beta + v)``, i.e. with
    ``log(beta + beta0)`` evenly spaced, ``beta0 = v``. ``beta0`` per row
    comes from the estimator's q; the schedule depends on no chain, so AIS
    stays valid whatever it is. (On a linear Gaussian model with noise 0.05 a
    sigmoidal schedule gave 3x the error of this one.)
    """
    t = np.linspace(0.0, 1.0, n_steps + 1)[:, None]
    b0 = np.asarray(beta0, dtype=np.float64)[None, :]
    betas = b0 * np.expm1(t * np.log1p(1.0 / b0))
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def _ais_log_px(decoder, x, n_latent, n_steps, n_chains, n_leapfrog, generator,
                beta0=None, step_size=0.5, adapt=True):
    r"""AIS from the prior to the posterior along p(z) p(x|z)^beta with HMC moves.

    Rows are independent; each has ``n_chains`` chains, its own schedule (see
    ``_ais_schedule``; ``beta0`` (n,) the posterior variance guess, default
    1e-3) and its own step size, adapted after every transition towards a
    mean acceptance probability of ``AIS_TARGET_ACCEPTANCE`` (as in Wu et
    al., 2017). Returns the log p(x) estimate (n,), its delta-method
    standard error over the chains (n,), the mean acceptance (n,), and the
    chains' final states (n, n_chains, d) with their log weights
    (n, n_chains): a weighted sample of the posterior.
    """
    n, d = x.shape[0], n_latent
    if beta0 is None:
        beta0 = np.full(n, 1e-3)
    betas = torch.as_tensor(_ais_schedule(n_steps, beta0), device=x.device).to(x.dtype)
    xr = x.unsqueeze(1)

    def loglik_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            ll = decoder.log_prob(xr, z)
            (g,) = torch.autograd.grad(ll.sum(), z)
        return ll.detach(), g

    z = _draw((n, n_chains, d), generator, x)
    ll, g_ll = loglik_and_grad(z)
    log_w = torch.zeros((n, n_chains), dtype=x.dtype, device=x.device)
    eps = torch.full((n, 1, 1), float(step_size), dtype=x.dtype, device=x.device)
    acc_sum = torch.zeros(n, dtype=x.dtype, device=x.device)
    for t in range(1, n_steps + 1):
        beta = betas[t].view(n, 1)
        log_w = log_w + (betas[t] - betas[t - 1]).view(n, 1) * ll
        # one HMC transition leaving p(z) p(x|z)^beta invariant
        p0 = _draw((n, n_chains, d), generator, x)
        u = _draw((n, n_chains), generator, x, "uniform")
        energy0 = 0.5 * (z * z).sum(-1) - beta * ll + 0.5 * (p0 * p0).sum(-1)
        bg = beta.unsqueeze(-1)
        zn, lln, gn = z, ll, g_ll
        p = p0 + 0.5 * eps * (bg * gn - zn)
        for step in range(n_leapfrog):
            zn = zn + eps * p
            lln, gn = loglik_and_grad(zn)
            grad = bg * gn - zn
            p = p + (eps if step < n_leapfrog - 1 else 0.5 * eps) * grad
        energy1 = 0.5 * (zn * zn).sum(-1) - beta * lln + 0.5 * (p * p).sum(-1)
        log_accept = torch.clamp(energy0 - energy1, max=0.0)
        log_accept = torch.where(torch.isfinite(log_accept), log_accept,
                                 torch.full_like(log_accept, -math.inf))
        accept = torch.log(u) < log_accept
        z = torch.where(accept.unsqueeze(-1), zn, z)
        ll = torch.where(accept, lln, ll)
        g_ll = torch.where(accept.unsqueeze(-1), gn, g_ll)
        rate = torch.exp(log_accept).mean(1)
        acc_sum += rate
        if adapt:
            eps = eps * torch.exp(0.5 * (rate - AIS_TARGET_ACCEPTANCE)).view(n, 1, 1)
    estimate = torch.logsumexp(log_w, dim=1) - math.log(n_chains)
    return estimate, _log_mean_exp_stderr(log_w), acc_sum / n_steps, z, log_w


def _log_mean_exp_stderr(log_w):
    """Delta-method standard error of log(mean(exp(log_w))) along axis 1."""
    w = torch.exp(log_w - log_w.max(1, keepdim=True).values)
    m = w.mean(1)
    S = log_w.shape[1]
    return torch.sqrt(w.var(1) / S) / m if S > 1 else torch.full_like(m, math.inf)


def _optimise_gaussian(decoder, x, mu0, log_std0, n_iter, n_samples, learning_rate,
                       generator):
    """Per-row diagonal Gaussian maximising the reparameterised ELBO (Adam).

    Parametrised relative to the start, ``mu = mu0 + s0 * a`` and
    ``log_std = log_std0 + b``, so that the step size is in units of the
    starting width whatever the posterior's scale; the rate decays to zero
    on a cosine. Adam is elementwise, so rows do not interact.
    """
    mu0, log_std0 = mu0.detach(), log_std0.detach()
    s0 = torch.exp(log_std0)
    a = torch.zeros_like(mu0, requires_grad=True)
    b = torch.zeros_like(log_std0, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=learning_rate)
    n, d = mu0.shape
    for it in range(n_iter):
        for group in opt.param_groups:
            group["lr"] = learning_rate * 0.5 * (1.0 + math.cos(math.pi * it / n_iter))
        eps = _draw((n, n_samples, d), generator, x)
        with torch.enable_grad():
            value = _gaussian_elbo(decoder, x, mu0 + s0 * a, log_std0 + b, eps,
                                   stop_gradient=True)
            loss = -value.sum()
            ga, gb = torch.autograd.grad(loss, [a, b])
        a.grad, b.grad = ga, gb
        opt.step()
    with torch.no_grad():
        return mu0 + s0 * a, log_std0 + b


def _posterior_sample_candidates(decoder, z, log_w):
    """Two Gaussians from a weighted posterior sample z (n, S, d), log_w (n, S).

    The weighted mean and variance of the sample, and a Laplace approximation
    (Gauss-Newton precision ``I + J^T diag(1/sigma^2) J``) at its heaviest
    point, which sits in the dominant mode of a multimodal posterior.
    """
    w = torch.softmax(log_w, dim=1).unsqueeze(-1)
    m = (w * z).sum(1)
    var = (w * (z - m.unsqueeze(1)) ** 2).sum(1)
    tiny = torch.finfo(z.dtype).tiny
    rows = torch.arange(z.shape[0], device=z.device)
    best = z[rows, log_w.argmax(1)]
    return [
        (m, 0.5 * torch.log(var + tiny)),
        (best, _mapa.laplace_log_scales(decoder, best)),
    ]


def _gaussian_start(decoder, x, means, log_stds, log_w, n_samples, generator,
                    extra=()):
    """The start of q*: the Gaussian with the best ELBO among the candidates.

    The candidates are q's components, their moment-matched Gaussian (when
    q is a mixture) and the ``extra`` ``(mu, log_std)`` pairs; each ELBO is
    estimated with ``n_samples`` draws.
    """
    n, C, d = means.shape
    cand_mu, cand_ls = [means], [log_stds]
    if C > 1:
        w = torch.exp(log_w).unsqueeze(-1)
        m = (w * means).sum(1)
        var = (w * (torch.exp(2 * log_stds) + (means - m.unsqueeze(1)) ** 2)).sum(1)
        cand_mu.append(m.unsqueeze(1))
        cand_ls.append(0.5 * torch.log(var).unsqueeze(1))
    for mu, ls in extra:
        cand_mu.append(mu.unsqueeze(1))
        cand_ls.append(ls.unsqueeze(1))
    if len(cand_mu) == 1 and C == 1:
        return means[:, 0], log_stds[:, 0]
    cand_mu = torch.cat(cand_mu, dim=1)  # (n, K, d)
    cand_ls = torch.cat(cand_ls, dim=1)
    eps = _draw((n, 1, n_samples, d), generator, x)
    z = cand_mu.unsqueeze(2) + torch.exp(cand_ls).unsqueeze(2) * eps  # (n, K, S, d)
    joint = decoder.log_prob(x[:, None, None, :], z) + standard_normal_log_prob(z)
    value = joint.mean(2) + cand_ls.sum(-1)
    value = torch.where(torch.isfinite(value), value, torch.full_like(value, -math.inf))
    best = value.argmax(1)
    rows = torch.arange(n, device=x.device)
    return cand_mu[rows, best], cand_ls[rows, best]


def _disagree(out):
    """Rows where the two log p(x) estimates differ beyond their noise."""
    difference = out["log_px_importance"] - out["log_px_ais"]
    noise = np.hypot(out["importance_stderr"], out["ais_stderr"])
    return np.abs(difference) > AIS_IS_WARN + 4 * noise


def _combine_log_px(out):
    """Inverse-variance mean of the two estimates, or the larger where they disagree.

    Both are stochastic lower bounds that fail low (a proposal or an
    annealing run that misses posterior mass), so where they disagree beyond
    their noise the larger is kept; elsewhere the precision-weighted mean
    has less error than either, and unlike the maximum it is not biased
    upwards by the noisier one.
    """
    a, b = out["log_px_importance"], out["log_px_ais"]
    wa = 1.0 / np.maximum(out["importance_stderr"], 1e-6) ** 2
    wb = 1.0 / np.maximum(out["ais_stderr"], 1e-6) ** 2
    with np.errstate(invalid="ignore"):
        mean = (wa * a + wb * b) / (wa + wb)
    mean = np.where(np.isfinite(mean), mean, np.maximum(a, b))
    return np.where(_disagree(out), np.maximum(a, b), mean)


def inference_gaps(
    estimator,
    X,
    *,
    n_samples=4096,
    n_ais_steps=1000,
    n_ais_chains=64,
    n_leapfrog=2,
    n_elbo_samples=1024,
    n_opt_iter=300,
    n_opt_samples=16,
    learning_rate=0.1,
    random_state=None,
):
    r"""Inference gaps of a fitted estimator (Cremer, Li & Duvenaud, 2018).

    For each row, with the estimator's generative model ``p(z) p(x | z)``:

    * ``log_px_importance``: importance sampling with ``n_samples`` draws from
      the estimator's scoring proposal (its q mixed with the prior);
    * ``log_px_ais``: annealed importance sampling from the prior to the
      posterior along ``p(z) p(x | z)^beta``: ``n_ais_steps`` temperatures
      with ``log(beta + v)`` evenly spaced (``v`` the posterior variance
      suggested by the estimator's q), one HMC transition of ``n_leapfrog``
      leapfrog steps at each, the step size adapted per row towards a mean
      acceptance of 0.65, ``n_ais_chains`` chains per row;
    * ``log_px``: their inverse-variance weighted mean, or, on rows where
      they disagree beyond their standard errors, the larger (both are
      stochastic lower bounds, which fail low);
    * ``elbo_q``: the ELBO of the estimator's own q: the encoder Gaussian for
      VAE/IWAE (without the widening scoring applies), the MAPA mixture over
      the neighbours' codes for MAPA (its proposal without the prior
      component); a mixture's ELBO is a stratified Monte Carlo estimate of
      ``E_q[log p(x, z) - log q(z)]``;
    * ``elbo_q_star``: the ELBO of ``q*``, the diagonal Gaussian optimised for
      the row (Adam on the reparameterised ELBO with the "sticking the
      landing" gradient, ``n_opt_iter`` steps of ``n_opt_samples`` draws),
      started at the best, by ELBO, of: q's components (the encoder's
      Gaussian for VAE/IWAE) and their moment-matched Gaussian, the weighted
      moments of the AIS chains' final states, and a Laplace approximation
      at the heaviest AIS chain (so that a poor encoder does not leave q*
      stuck far from the posterior);

    and the gaps ``approximation_gap = log_px - elbo_q_star``,
    ``amortization_gap = elbo_q_star - elbo_q`` and ``inference_gap =
    log_px - elbo_q``. Each ELBO uses ``n_elbo_samples`` fresh draws. For
    MAPA (and a recursive mixture encoder) the amortization gap can be
    negative: its q is a mixture, richer than the Gaussian family of q*.

    Everything runs in torch on the estimator's device and dtype, batched
    over rows; the estimator is not changed (not even its forward-row
    counters). A warning names the rows where AIS and importance sampling
    disagree by more than ``AIS_IS_WARN`` nats plus four standard errors
    (typically the proposal misses part of the posterior, and importance
    sampling is far below AIS).

    Measured with the defaults on 100 held-out rows, 1-D latents, 2x32
    units, 300 epochs, N = 1000 (one CPU thread, 20-50 s per call on a busy
    machine): against quadrature, importance sampling was within 0.01 nats
    on average and AIS within 0.02-0.08 (``ais_stderr`` 0.03-0.09; larger
    for MAPA, whose decoders have sharper posteriors). Mean gaps
    (approximation / amortization), Figure 1: VAE 0.014 / 0.052, IWAE
    0.031 / 0.154, MAPA 0.003 / 1.07; spiral: VAE 0.039 / 0.092, IWAE 0.064
    / 3.91, MAPA 0.009 / 1.42. MAPA's own q is its importance proposal,
    whose Laplace widths are doubled (``_mapa.PROPOSAL_WIDENING``) to keep
    importance weights bounded; without the doubling its ELBO is within
    0.09 (Figure 1) and 0.11 (spiral) nats of q*'s, so most of its
    amortization gap is that widening.

    Parameters
    ----------
    estimator : fitted VAEDensity, IWAEDensity or MAPADensity
    X : array-like of shape (n, n_features)
        Rows, in the estimator's input units.
    n_samples : int, default=4096
        Importance-sampling draws per row.
    n_ais_steps : int, default=1000
        AIS temperatures.
    n_ais_chains : int, default=64
        AIS chains per row. The AIS error falls as ``1 / sqrt(n_ais_steps *
        n_ais_chains)``; ``ais_stderr`` estimates it.
    n_leapfrog : int, default=2
        Leapfrog steps per HMC transition.
    n_elbo_samples : int, default=1024
        Draws per row in each ELBO estimate.
    n_opt_iter : int, default=300
        Adam steps for q* (0 keeps the starting Gaussian).
    n_opt_samples : int, default=16
        Draws per Adam step.
    learning_rate : float, default=0.1
        Adam's initial step, in units of the starting standard deviation
        (decayed to 0 on a cosine).
    random_state : int, RandomState instance or None, default=None
        Seed of every draw; an int makes the result reproducible (for the
        same X).

    Returns
    -------
    result : Bunch
        Arrays of shape (n,): ``log_px``, ``log_px_importance``,
        ``log_px_ais``, ``elbo_q``, ``elbo_q_star``, ``approximation_gap``,
        ``amortization_gap``, ``inference_gap``, ``importance_stderr`` and
        ``ais_stderr`` (delta-method standard errors over the draws or
        chains), ``ais_acceptance``; ``q_star_mean`` and ``q_star_log_std``
        (n, n_components); ``summary``, a dict of the row means of the (n,)
        arrays. Log-densities are in X's units, as ``score_samples``.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa import VAEDensity
    >>> from skmapa.datasets import make_figure1
    >>> from skmapa.diagnostics import inference_gaps
    >>> data = make_figure1(300, random_state=0)
    >>> vae = VAEDensity(n_components=1, hidden_layer_sizes=(16,), max_iter=20,
    ...                  random_state=0).fit(data.X)
    >>> gaps = inference_gaps(vae, data.X[:5], n_samples=1024, n_ais_steps=300,
    ...                       n_opt_iter=100, n_elbo_samples=256, random_state=0)
    >>> gaps.log_px.shape
    (5,)
    >>> # AIS and importance sampling agree within their standard errors
    >>> diff = gaps.log_px_ais - gaps.log_px_importance
    >>> noise = np.hypot(gaps.ais_stderr, gaps.importance_stderr)
    >>> bool(np.all(np.abs(diff) < 4 * noise))
    True
    >>> # q* is at least as good as the encoder's q
    >>> bool(np.all(gaps.amortization_gap > -0.02))
    True
    >>> sorted(gaps.summary)[:4]
    ['ais_acceptance', 'ais_stderr', 'amortization_gap', 'approximation_gap']
    """
    check_is_fitted(estimator)
    n_samples = _check_positive_int(n_samples, "n_samples")
    n_ais_steps = _check_positive_int(n_ais_steps, "n_ais_steps")
    n_ais_chains = _check_positive_int(n_ais_chains, "n_ais_chains")
    n_leapfrog = _check_positive_int(n_leapfrog, "n_leapfrog")
    n_elbo_samples = _check_positive_int(n_elbo_samples, "n_elbo_samples")
    n_opt_samples = _check_positive_int(n_opt_samples, "n_opt_samples")
    n_opt_iter = _check_positive_int(n_opt_iter, "n_opt_iter", minimum=0)
    if not _is_positive_float(learning_rate):
        raise ValueError(
            f"learning_rate must be a positive float, got {learning_rate!r}."
        )
    X = estimator._check_X(X)
    generator = torch_generator(random_state)
    decoder = estimator.decoder_
    d = estimator.n_components
    keys = ("log_px_importance", "importance_stderr", "log_px_ais", "ais_stderr",
            "ais_acceptance", "elbo_q", "elbo_q_star", "q_star_mean", "q_star_log_std")
    parts = {k: [] for k in keys}
    with _CounterGuard(estimator), torch.no_grad():
        Xs_all = estimator._standardize(X)
        C = _own_q(estimator, Xs_all[:1])[0].shape[1]
        # each estimate in its own chunks of rows: importance sampling holds
        # (rows, draws, components) at once, AIS only (rows, chains)
        rows_is = max(1, _TORCH_CHUNK // (n_samples * (C + 1) * d))
        for Xs in Xs_all.split(rows_is):
            lp, se = _importance_log_px(decoder, Xs, *_own_q(estimator, Xs), n_samples,
                                        generator)
            parts["log_px_importance"].append(lp)
            parts["importance_stderr"].append(se)
        rows_ais = max(1, _TORCH_CHUNK // (64 * n_ais_chains * d))
        ais_candidates = []
        for Xs in Xs_all.split(rows_ais):
            lp, se, acc, z, log_w = _ais_log_px(
                decoder, Xs, d, n_ais_steps, n_ais_chains, n_leapfrog, generator,
                beta0=_posterior_variance_guess(*_own_q(estimator, Xs)),
            )
            ais_candidates.append(_posterior_sample_candidates(decoder, z, log_w))
            parts["log_px_ais"].append(lp)
            parts["ais_stderr"].append(se)
            parts["ais_acceptance"].append(acc)
        # ELBO[q] and the start of q*, in chunks that hold (rows, draws, components);
        # ELBO[q*] later reuses each chunk's base draws (common random numbers:
        # for a Gaussian q the difference of the two, the amortization gap, is
        # then precise), regenerated from a per-chunk seed
        rows_elbo = max(1, _TORCH_CHUNK // (max(n_elbo_samples * C, 64 * (C + 1)) * d))
        chunks = Xs_all.split(rows_elbo)
        seeds = torch.randint(2**62, (len(chunks),), generator=generator).tolist()

        def elbo_draws(Xs, seed):
            g = torch.Generator().manual_seed(seed)
            return (_draw((Xs.shape[0], n_elbo_samples, d), g, Xs),
                    _draw((Xs.shape[0], 1), g, Xs, "uniform"))

        starts = []
        for Xs, seed in zip(chunks, seeds):
            means, log_stds, log_w = _own_q(estimator, Xs)
            eps, u0 = elbo_draws(Xs, seed)
            parts["elbo_q"].append(_mixture_log_weights(
                decoder, Xs, means, log_stds, log_w, eps, u0).mean(1))
            starts.append((means, log_stds, log_w))
        # the candidates from the AIS chains, re-split into the ELBO chunks
        extra = [
            (torch.cat([chunk[j][0] for chunk in ais_candidates]).split(rows_elbo),
             torch.cat([chunk[j][1] for chunk in ais_candidates]).split(rows_elbo))
            for j in range(len(ais_candidates[0]))
        ]
        mu0, ls0 = [], []
        for c, (means, log_stds, log_w) in enumerate(starts):
            m, ls = _gaussian_start(
                decoder, chunks[c], means, log_stds, log_w, 64, generator,
                extra=[(mus[c], log_stds_[c]) for mus, log_stds_ in extra],
            )
            mu0.append(m)
            ls0.append(ls)
        mu0, ls0 = torch.cat(mu0), torch.cat(ls0)
        # q*: rows are independent; the optimisation holds (rows, n_opt_samples)
        rows_opt = max(1, _TORCH_CHUNK // (64 * n_opt_samples * d))
        for sl in torch.arange(Xs_all.shape[0]).split(rows_opt):
            sl = slice(int(sl[0]), int(sl[-1]) + 1)
            mu, ls = _optimise_gaussian(decoder, Xs_all[sl], mu0[sl], ls0[sl],
                                        n_opt_iter, n_opt_samples, learning_rate,
                                        generator)
            parts["q_star_mean"].append(mu)
            parts["q_star_log_std"].append(ls)
        mu = torch.cat(parts["q_star_mean"])
        ls = torch.cat(parts["q_star_log_std"])
        start = 0
        for Xs, seed in zip(chunks, seeds):
            sl = slice(start, start + Xs.shape[0])
            start += Xs.shape[0]
            eps, _ = elbo_draws(Xs, seed)
            parts["elbo_q_star"].append(
                _gaussian_elbo(decoder, Xs, mu[sl], ls[sl], eps)
            )
    log_det = estimator._log_det()
    out = {k: torch.cat(v).double().cpu().numpy() for k, v in parts.items()}
    for k in ("log_px_importance", "log_px_ais", "elbo_q", "elbo_q_star"):
        out[k] = out[k] - log_det
    out["log_px"] = _combine_log_px(out)
    out["approximation_gap"] = out["log_px"] - out["elbo_q_star"]
    out["amortization_gap"] = out["elbo_q_star"] - out["elbo_q"]
    out["inference_gap"] = out["log_px"] - out["elbo_q"]
    difference = out["log_px_importance"] - out["log_px_ais"]
    bad = np.flatnonzero(_disagree(out))
    if bad.size:
        worst = bad[np.argmax(np.abs(difference[bad]))]
        warnings.warn(
            f"AIS and importance sampling disagree on {bad.size} of {len(difference)} "
            f"rows by more than {AIS_IS_WARN} nats + 4 standard errors (worst: row "
            f"{worst}, importance minus AIS {difference[worst]:+.3f}); there log_px "
            "is the larger of the two. Importance sampling far below AIS means the "
            "proposal misses part of the posterior; otherwise increase n_ais_steps "
            "or n_ais_chains.",
            UserWarning,
        )
    summary = {k: float(np.mean(v)) for k, v in sorted(out.items()) if v.ndim == 1}
    return Bunch(**out, summary=summary)
