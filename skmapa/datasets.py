r"""Synthetic data sets with a known latent-variable density.

Every generator draws ``n_samples`` points from a model with a
one-dimensional latent code (two-dimensional for ``make_manifold`` with
``n_latent=2``, whose codes, latent grid and ``f`` then have two columns)

.. math::

    z \sim p(z), \qquad x = f(z) + \sigma \varepsilon,
    \qquad \varepsilon \sim \mathcal{N}(0, I),

and returns a :class:`sklearn.utils.Bunch` that carries the ground truth
along with the data:

``X``
    ndarray of shape (n_samples, n_features), the observations.
``codes``
    ndarray of shape (n_samples, 1), the true latent codes ``z``.
``log_density``
    callable, ``X -> ndarray (n,)``, the exact log density
    :math:`\log p(x) = \log \int p(z) \mathcal{N}(x; f(z), \sigma^2 I) dz`.
``f``
    callable, ``z -> ndarray (m, n_features)``, the true mean function;
    ``z`` may have shape (m,) or (m, 1).
``log_prior``
    callable, ``z -> ndarray (m,)``, the log density of the true latent
    distribution (``-inf`` outside its support).
``noise``
    float, the noise standard deviation :math:`\sigma`.
``latent_grid``, ``latent_log_weights``
    ndarrays of shape (G,): quadrature nodes on the latent space and log
    quadrature weights *including* :math:`\log p(z)`, normalised so that
    ``logsumexp(latent_log_weights) == 0``.  ``log_density`` is exactly the
    Gaussian mixture

    .. math::

        \log p(x) = \operatorname{logsumexp}_g \big(
        \texttt{latent\_log\_weights}[g]
        + \log \mathcal{N}(x; f(\texttt{latent\_grid}[g]), \sigma^2 I)
        \big),

    so the same grid gives the true posterior :math:`p(z \mid x)` over the
    nodes (softmax over ``g`` of the summand).
``DESCR``
    str, a short description.

The quadrature is a composite Gauss-Legendre rule (10 nodes per panel)
whose panels follow the integrand :math:`z \mapsto \mathcal{N}(x; f(z),
\sigma^2 I)`.  That integrand varies on the latent length
:math:`\sigma / |f'(z)|` (one noise width of arc length), so the number of
nodes grows with the slope of ``f`` over the noise; a curvature term
resolves stationary points of ``f`` for ``x`` up to 10 noise widths from the
curve, kinks of ``f`` are panel boundaries, the panels at the ends of the
latent interval are graded (beyond an end of the curve the integrand decays
exponentially from it), and the panel width is capped in latent units (for
the prior).  The log density agrees with an independent fine-grid
quadrature to about ``1e-9`` nats on the data and within 15 noise widths
of the curve (far better than the ``1e-4`` needed).  Gaussian latents are
integrated over ``[-8.5, 8.5]`` (the neglected prior mass is ~2e-17).
``log_density`` costs about one second per ``10^5`` rows and works in
chunks of rows, so memory stays bounded.

``make_figure1``, ``make_absolute_value`` and ``make_circle`` each come in
two variants with *different* mean functions but the *same* density
:math:`p(x)`: the model is not identifiable from data.

Examples
--------
>>> from skmapa.datasets import DATASETS
>>> sorted(DATASETS)
['absolute_value', 'circle', 'figure1', 'spiral', 'two_clusters']
>>> data = DATASETS["circle"](n_samples=100, random_state=0)
>>> data.X.shape, data.codes.shape, data.log_density(data.X).shape
((100, 2), (100, 1), (100,))
"""

import functools
import math
import numbers

import numpy as np
from scipy.special import logsumexp, ndtr
from sklearn.utils import Bunch, check_array, check_random_state

__all__ = [
    "DATASETS",
    "make_absolute_value",
    "make_circle",
    "make_figure1",
    "make_manifold",
    "make_spiral",
    "make_two_clusters",
]

# Gaussian latents are integrated over [-_Z_MAX, _Z_MAX]; the neglected mass
# 2 * Phi(-8.5) ~ 2e-17 is below double precision relative to 1.
_Z_MAX = 8.5

# Quadrature defaults (see _adaptive_gauss_legendre): Gauss-Legendre order
# per panel, panel length in noise widths (of arc length), maximal panel width
# in latent units, and the distance from the curve, in noise widths, up to
# which the curvature of f is resolved.
_GL_ORDER = 10
_PANEL_NOISE_WIDTHS = 4.0
_PANEL_MAX_WIDTH = 1.0
_REACH_NOISE_WIDTHS = 10.0
_END_GRADING = 4.0 ** -np.arange(1, 4)

# Rows of X per chunk in log_density are chosen so that a chunk holds at most
# this many (row, node) pairs (~32 MiB of float64 temporaries).
_CHUNK_ELEMENTS = 2**22
_LOG_TINY = 60.0


# ---------------------------------------------------------------------------
# Argument validation and small helpers
# ---------------------------------------------------------------------------


def _check_n_samples(n_samples):
    if (
        isinstance(n_samples, bool)
        or not isinstance(n_samples, numbers.Integral)
        or n_samples < 1
    ):
        raise ValueError(
            f"n_samples must be a positive integer, got {n_samples!r}."
        )
    return int(n_samples)


def _check_variant(variant):
    if (
        isinstance(variant, bool)
        or not isinstance(variant, numbers.Integral)
        or variant not in (1, 2)
    ):
        raise ValueError(f"variant must be 1 or 2, got {variant!r}.")
    return int(variant)


def _check_noise(noise):
    if (
        isinstance(noise, bool)
        or not isinstance(noise, numbers.Real)
        or not math.isfinite(noise)
        or noise <= 0
    ):
        raise ValueError(
            f"noise must be a positive finite number, got {noise!r}."
        )
    return float(noise)


def _as_codes(z):
    """Return latent codes of shape (m,) or (m, 1) as a float array (m,)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        return z[:, 0]
    if z.ndim == 1:
        return z
    raise ValueError(
        f"latent codes must have shape (m,) or (m, 1), got {z.shape}."
    )


# ---------------------------------------------------------------------------
# Latent distributions (module-level functions so that Bunches pickle)
# ---------------------------------------------------------------------------


def _log_prior_uniform(z, low, high):
    z = _as_codes(z)
    inside = (z >= low) & (z <= high)
    return np.where(inside, -math.log(high - low), -np.inf)


def _log_prior_normal(z):
    z = _as_codes(z)
    return -0.5 * z**2 - 0.5 * math.log(2 * math.pi)


def _sample_uniform(rng, n, low, high):
    return rng.uniform(low, high, size=n)


def _sample_normal(rng, n):
    return rng.standard_normal(n)


# ---------------------------------------------------------------------------
# Mean functions
# ---------------------------------------------------------------------------


def _f_figure1(z, variant):
    z = _as_codes(z)
    if variant == 1:
        return ((0.5 - z) ** 2)[:, None]
    return (0.25 * z**2)[:, None]


def _parabola(s):
    return np.stack([s, s**2], axis=1)


def _f_absolute_value(z, variant):
    z = _as_codes(z)
    if variant == 1:
        return _parabola(2.0 * np.abs(z) - 1.0)
    return _parabola(z)


def _f_circle(z, variant):
    z = _as_codes(z)
    angle = 2.0 * np.pi * ndtr(z)
    if variant == 2:
        angle = 0.5 * np.pi - angle
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


_SPIRAL_T0 = np.pi
_SPIRAL_T1 = 4.0 * np.pi


def _f_spiral(z):
    z = _as_codes(z)
    t = _SPIRAL_T0 + (_SPIRAL_T1 - _SPIRAL_T0) * z
    r = t / _SPIRAL_T1
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


_TWO_CLUSTERS_STEEPNESS = 8.0


def _f_two_clusters(z):
    z = _as_codes(z)
    return np.stack(
        [2.0 * np.tanh(_TWO_CLUSTERS_STEEPNESS * z), 0.5 * z], axis=1
    )


# ---------------------------------------------------------------------------
# Quadrature and the exact log density
# ---------------------------------------------------------------------------


def _adaptive_gauss_legendre(
    f, low, high, *, scale, max_width, reach, breakpoints=(), order=_GL_ORDER
):
    """Composite Gauss-Legendre rule on [low, high] adapted to the curve f.

    The integrand is ``exp(phi(z))`` with ``phi(z) = -|x - f(z)|^2 / (2
    sigma^2)``.  For ``|x - f(z)| <= reach`` its curvature is bounded by
    ``|phi''(z)| <= (|f'(z)|^2 + reach |f''(z)|) / sigma^2``, so the
    integrand varies on the latent length ``sigma / sqrt(|f'(z)|^2 + reach
    |f''(z)|)``: one noise width of arc length where the curve is straight,
    ``sqrt(sigma^2 / (reach |f''|))`` at stationary points of ``f``.  Panels
    have the latent length

        ell(z) = scale / sqrt(|f'(z)|^2 + reach |f''(z)|)

    (``scale`` is a few ``sigma``): their boundaries are placed at unit steps
    of the monotone measure ``int dz / ell(z) + (z - low) / max_width`` on
    each interval between breakpoints (kinks of ``f``), so every panel spans
    at most about one ``ell`` and at most ``max_width`` (for the prior).  The
    first and last panel of each interval are split geometrically towards
    its ends.  Derivatives are finite differences on a fine grid.

    Returns the nodes and the (positive) weights, both of shape (G,).
    """
    inner = [b for b in breakpoints if low < b < high]
    edges = np.unique(np.concatenate([[low, high], inner]))

    def rate(z_fine, step):
        d1 = np.gradient(f(z_fine), step, axis=0)
        d2 = np.gradient(d1, step, axis=0)
        return np.sqrt(
            (d1**2).sum(axis=1) + reach * np.linalg.norm(d2, axis=1)
        )

    nodes, weights = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        z, w = _place_panels(
            rate, lo, hi, scale=scale, max_width=max_width, order=order
        )
        nodes.append(z)
        weights.append(w)
    return np.concatenate(nodes), np.concatenate(weights)


def _place_panels(rate, lo, hi, *, scale, max_width, order=_GL_ORDER):
    """Composite Gauss-Legendre rule on [lo, hi] with panels of length ``ell``.

    ``rate(z_fine, step)`` returns, on a uniform grid of spacing ``step``,
    the curvature scale ``sqrt(|f'|^2 + reach |f''|)`` of the integrand (see
    :func:`_adaptive_gauss_legendre`).  Panel boundaries are placed at unit
    steps of the measure ``int (rate / scale + 1 / max_width) dz``, and the
    first and last panels are split geometrically towards the ends.

    Returns the nodes and the (positive) weights, both of shape (G,).
    """
    ref_nodes, ref_weights = np.polynomial.legendre.leggauss(order)
    n_fine = 2**14
    while True:
        # The measure is tabulated on a fine grid with >= 16 points per
        # panel so that the panels it places are close to equal.
        z_fine = np.linspace(lo, hi, n_fine + 1)
        step = (hi - lo) / n_fine
        density = rate(z_fine, step) / scale + 1.0 / max_width
        measure = np.concatenate(
            [[0.0], np.cumsum(0.5 * step * (density[1:] + density[:-1]))]
        )
        n_panels = max(1, math.ceil(measure[-1]))
        if 16 * n_panels <= n_fine:
            break
        n_fine = 16 * n_panels
    bounds = np.interp(
        np.linspace(0.0, measure[-1], n_panels + 1), measure, z_fine
    )
    bounds[0], bounds[-1] = lo, hi
    # Beyond an end of the curve the integrand decays exponentially from
    # the end, on a length that shrinks with the distance of x from the
    # curve: grade the end panels geometrically towards the ends.
    first, last = bounds[1] - lo, hi - bounds[-2]
    bounds = np.unique(
        np.concatenate(
            [bounds, lo + first * _END_GRADING, hi - last * _END_GRADING]
        )
    )
    half = 0.5 * np.diff(bounds)
    mid = 0.5 * (bounds[:-1] + bounds[1:])
    return (
        (mid[:, None] + half[:, None] * ref_nodes).ravel(),
        (half[:, None] * ref_weights).ravel(),
    )


class _MixtureLogDensity:
    """Log density of ``sum_g w_g N(x; means[g], noise^2 I)``.

    Parameters
    ----------
    means : ndarray of shape (G, n_features)
    log_weights : ndarray of shape (G,)
    noise : float
    """

    def __init__(self, means, log_weights, noise):
        self.means = np.asarray(means, dtype=np.float64)
        self.log_weights = np.asarray(log_weights, dtype=np.float64)
        self.noise = float(noise)
        # -|x - mu|^2 / (2 var) = -|x|^2 / (2 var) + x . mu / var
        # - |mu|^2 / (2 var), with x and mu centred to limit cancellation.
        var = self.noise**2
        self._center = self.means.mean(axis=0)
        centred = self.means - self._center
        self._coef = np.ascontiguousarray(centred.T / var)
        self._offset = self.log_weights - 0.5 * (centred**2).sum(axis=1) / var

    def __call__(self, X):
        n_nodes, n_features = self.means.shape
        X = check_array(X, dtype=np.float64, input_name="X")
        if X.shape[1] != n_features:
            raise ValueError(
                f"X has {X.shape[1]} features, but this density is defined "
                f"on {n_features} features."
            )
        var = self.noise**2
        log_norm = -0.5 * n_features * math.log(2 * math.pi * var)
        chunk = max(1, _CHUNK_ELEMENTS // n_nodes)
        out = np.empty(X.shape[0])
        for start in range(0, X.shape[0], chunk):
            xb = X[start : start + chunk] - self._center
            # a[i, g] = log w_g + log N(x_i; mu_g, var I) - const_i
            a = xb @ self._coef
            a += self._offset
            amax = a.max(axis=1)
            a -= amax[:, None]
            # Terms below exp(-_LOG_TINY) change the sum by < G * 1e-26
            # relative; clipping them keeps exp away from slow subnormals.
            np.maximum(a, -_LOG_TINY, out=a)
            np.exp(a, out=a)
            out[start : start + chunk] = (
                amax + np.log(a.sum(axis=1)) - 0.5 * (xb**2).sum(axis=1) / var
            )
        return out + log_norm


class _LatentCurveModel:
    """A 1-D latent model ``x = f(z) + noise * eps``: sampling and density.

    This is the single place that turns a data-set description into the
    returned Bunch.

    Parameters
    ----------
    f : callable
        Mean function, codes (m,) or (m, 1) -> (m, n_features).
    log_prior : callable
        Log density of the latent distribution.
    sample_latent : callable
        ``sample_latent(rng, n) -> ndarray (n,)``.
    support : tuple of float
        Latent interval over which to integrate.
    breakpoints : tuple of float
        Latent values where f is not smooth (made panel boundaries).
    descr : str
        Description; formatted with ``noise``.
    """

    def __init__(
        self, f, log_prior, sample_latent, support, descr, breakpoints=()
    ):
        self.f = f
        self.log_prior = log_prior
        self.sample_latent = sample_latent
        self.support = support
        self.breakpoints = breakpoints
        self.descr = descr

    def quadrature(self, noise, refine=1):
        """Latent nodes and log weights (incl. log prior, summing to one).

        ``refine`` divides every panel length by that factor, which is how
        the accuracy of the default rule is checked.
        """
        grid, weights = _adaptive_gauss_legendre(
            self.f,
            *self.support,
            scale=_PANEL_NOISE_WIDTHS * noise / refine,
            max_width=_PANEL_MAX_WIDTH / refine,
            reach=_REACH_NOISE_WIDTHS * noise,
            breakpoints=self.breakpoints,
        )
        log_weights = np.log(weights) + self.log_prior(grid)
        # The rule integrates the prior to 1 up to the neglected tail mass
        # (Gaussian latents) and rounding; renormalising makes log_density an
        # exactly normalised Gaussian mixture.
        log_weights -= logsumexp(log_weights)
        return grid, log_weights

    def make(self, n_samples, noise, random_state, refine=1):
        n_samples = _check_n_samples(n_samples)
        noise = _check_noise(noise)
        rng = check_random_state(random_state)

        codes = self.sample_latent(rng, n_samples)
        means = self.f(codes)
        X = means + noise * rng.standard_normal(means.shape)

        grid, log_weights = self.quadrature(noise, refine=refine)
        return Bunch(
            X=X,
            codes=codes.reshape(n_samples, -1),
            log_density=_MixtureLogDensity(self.f(grid), log_weights, noise),
            f=self.f,
            log_prior=self.log_prior,
            noise=noise,
            latent_grid=grid,
            latent_log_weights=log_weights,
            DESCR=self.descr.format(noise=noise),
        )


# ---------------------------------------------------------------------------
# Data-set descriptions
# ---------------------------------------------------------------------------


def _figure1_model(variant):
    # Same p(x) for both variants: with z ~ U[0, 1], |0.5 - z| ~ U[0, 0.5]
    # and z / 2 ~ U[0, 0.5], so f1(z) = |0.5 - z|^2 and f2(z) = (z / 2)^2
    # are the same function (w -> w^2) of a U[0, 0.5] variable; hence f1(z)
    # and f2(z) have the same law, and so do f(z) + noise * eps.
    formula = "(0.5 - z)^2" if variant == 1 else "0.25 z^2"
    return _LatentCurveModel(
        f=functools.partial(_f_figure1, variant=variant),
        log_prior=functools.partial(_log_prior_uniform, low=0.0, high=1.0),
        sample_latent=functools.partial(_sample_uniform, low=0.0, high=1.0),
        support=(0.0, 1.0),
        descr=(
            f"Figure-1 pair, variant {variant}: z ~ U[0, 1], "
            f"x = {formula} + {{noise:g}} * eps (1-D). Variants 1 and 2 "
            "have the same p(x)."
        ),
    )


def _absolute_value_model(variant):
    # Same p(x) for both variants: with g(s) = (s, s^2) and z ~ U[-1, 1],
    # variant 1 is g(2|z| - 1) and variant 2 is g(z).  Since |z| ~ U[0, 1],
    # 2|z| - 1 ~ U[-1, 1], i.e. has the same law as z; so f1(z) and f2(z)
    # have the same law (uniform in s along the parabola).  Variant 1 maps
    # the two codes z and -z to the same point (not injective).
    formula = "g(2|z| - 1)" if variant == 1 else "g(z)"
    return _LatentCurveModel(
        f=functools.partial(_f_absolute_value, variant=variant),
        log_prior=functools.partial(_log_prior_uniform, low=-1.0, high=1.0),
        sample_latent=functools.partial(_sample_uniform, low=-1.0, high=1.0),
        support=(-1.0, 1.0),
        breakpoints=(0.0,) if variant == 1 else (),
        descr=(
            f"Absolute-value pair, variant {variant}: z ~ U[-1, 1], "
            f"g(s) = (s, s^2), x = {formula} + {{noise:g}} * eps (2-D). "
            "Variants 1 and 2 have the same p(x)."
        ),
    )


def _circle_model(variant):
    # Same p(x) for both variants: with z ~ N(0, 1), u = Phi(z) ~ U[0, 1],
    # so angle 2 pi u is uniform on [0, 2 pi) and so is pi/2 - 2 pi u modulo
    # 2 pi (a reflection of the circle, which preserves the uniform law).
    # Both variants put the uniform distribution on the unit circle.
    formula = "2 pi Phi(z)" if variant == 1 else "pi/2 - 2 pi Phi(z)"
    return _LatentCurveModel(
        f=functools.partial(_f_circle, variant=variant),
        log_prior=_log_prior_normal,
        sample_latent=_sample_normal,
        support=(-_Z_MAX, _Z_MAX),
        descr=(
            f"Circle pair, variant {variant}: z ~ N(0, 1), "
            f"angle = {formula}, x = (cos angle, sin angle) + {{noise:g}} * "
            "eps (2-D). Variants 1 and 2 have the same p(x) (uniform on the "
            "unit circle, blurred)."
        ),
    )


def _spiral_model():
    return _LatentCurveModel(
        f=_f_spiral,
        log_prior=functools.partial(_log_prior_uniform, low=0.0, high=1.0),
        sample_latent=functools.partial(_sample_uniform, low=0.0, high=1.0),
        support=(0.0, 1.0),
        descr=(
            "Spiral: z ~ U[0, 1], t = pi + 3 pi z, x = (t / 4 pi) "
            "(cos t, sin t) + {noise:g} * eps (2-D, 1.5 turns, radius <= 1)."
        ),
    )


def _two_clusters_model():
    return _LatentCurveModel(
        f=_f_two_clusters,
        log_prior=_log_prior_normal,
        sample_latent=_sample_normal,
        support=(-_Z_MAX, _Z_MAX),
        descr=(
            "Two clusters: z ~ N(0, 1), x = (2 tanh(8 z), z / 2) + "
            "{noise:g} * eps (2-D); the steep tanh splits the data into two "
            "clusters around x_1 = -2 and x_1 = 2 joined by a sparse bridge."
        ),
    )


# ---------------------------------------------------------------------------
# Manifolds embedded in many dimensions
# ---------------------------------------------------------------------------

# The latent of make_manifold is uniform on the box [-1, 1]^n_latent.
_BOX = (-1.0, 1.0)
# Random features of the embedding and the standard deviation of their
# frequencies (radians per latent unit: over the box a feature turns through
# about 0.3-1.5 periods).
_N_RANDOM_FEATURES = 16
_FREQUENCY_SCALE = 2.0
# Gauss-Legendre nodes per latent axis for the moments of the embedding
# (its frequencies are a few radians per unit: exact to rounding).
_MOMENT_NODES = 96
# Slices of the other latent axis over which the rate of a 2-D rule is
# maximised, rows that check the rule and the agreement two resolutions must
# reach on them (nats); the rule is refined at most this many times.
# The first rule has panels _REFINE_START times the curves' default length
# (Gauss-Legendre converges fast enough for the check to pass early), the
# next ones _REFINE_STEP times shorter each.
_SLICES = 33
_CHECK_ROWS = 200
_RULE_TOL = 1e-5
_REFINE_START = 1 / 3
_REFINE_STEP = 1.5
_MAX_REFINEMENTS = 6


def _check_int_in(value, name, allowed):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < allowed[0]
        or value > allowed[-1]
    ):
        raise ValueError(
            f"{name} must be an integer in [{allowed[0]}, {allowed[-1]}], "
            f"got {value!r}."
        )
    return int(value)


def _as_latent(z, n_latent):
    """Latent codes as a float array (m, n_latent); (m,) allowed if 1-D."""
    z = np.asarray(z, dtype=np.float64)
    if n_latent == 1 and z.ndim == 1:
        return z[:, None]
    if z.ndim == 2 and z.shape[1] == n_latent:
        return z
    expected = "(m,) or (m, 1)" if n_latent == 1 else f"(m, {n_latent})"
    raise ValueError(
        f"latent codes must have shape {expected}, got {z.shape}."
    )


def _box_gauss_legendre(n_latent, n_nodes=_MOMENT_NODES):
    """Tensor Gauss-Legendre rule for the uniform law on the box."""
    x, w = np.polynomial.legendre.leggauss(n_nodes)
    low, high = _BOX
    x = low + (high - low) * (x + 1) / 2
    w = w / 2
    mesh = np.meshgrid(*[x] * n_latent, indexing="ij")
    weights = np.prod(np.meshgrid(*[w] * n_latent, indexing="ij"), axis=0)
    return np.column_stack([m.ravel() for m in mesh]), weights.ravel()


def _log_prior_box(z, n_latent):
    z = _as_latent(z, n_latent)
    low, high = _BOX
    inside = np.all((z >= low) & (z <= high), axis=1)
    return np.where(inside, -n_latent * math.log(high - low), -np.inf)


def _sample_box(rng, n, n_latent):
    return rng.uniform(*_BOX, size=(n, n_latent))


class _RandomFeatureMap:
    """A smooth random embedding of the box ``[-1, 1]^d`` in ``R^D``.

    ``f(z) = (z A^T + sin(z W^T + b) C^T - mean) / scale``: a random linear
    part plus ``_N_RANDOM_FEATURES`` random Fourier features, every output
    feature standardised to mean 0 and variance 1 under the uniform latent
    (so the manifold has an extent of order one along every feature).
    Everything is drawn from ``RandomState(seed)``.
    """

    def __init__(self, n_latent, n_features, seed):
        rng = np.random.RandomState(seed)
        k = _N_RANDOM_FEATURES
        self.n_latent = n_latent
        self.linear = rng.standard_normal((n_features, n_latent))
        self.frequencies = _FREQUENCY_SCALE * rng.standard_normal(
            (k, n_latent)
        )
        self.phases = rng.uniform(0.0, 2 * np.pi, size=k)
        self.amplitudes = math.sqrt(2.0 / k) * rng.standard_normal(
            (n_features, k)
        )
        self.mean = np.zeros(n_features)
        self.scale = np.ones(n_features)
        nodes, weights = _box_gauss_legendre(n_latent)
        raw = self(nodes)
        self.mean = weights @ raw
        self.scale = np.sqrt(weights @ (raw - self.mean) ** 2)

    def __call__(self, z):
        z = _as_latent(z, self.n_latent)
        out = z @ self.linear.T
        out += np.sin(z @ self.frequencies.T + self.phases) @ self.amplitudes.T
        out -= self.mean
        out /= self.scale
        return out


class _LatentManifoldModel(_LatentCurveModel):
    """``x = f(z) + noise * eps`` with ``z`` uniform on ``[-1, 1]^d``.

    For ``d = 1`` the rule is the adaptive rule of the curves; for ``d = 2``
    it is the tensor product of one adaptive rule per latent axis, each
    placed by the largest rate along that axis over slices of the other.
    Either rule is refined (every panel ``_REFINE_STEP`` times shorter)
    until two resolutions agree to ``_RULE_TOL`` nats on fixed check points,
    and the coarser of the two is kept.  The check points depend on the
    model and the noise only, so every call with the same embedding and
    noise returns the same density.
    """

    def __init__(self, n_latent, n_features, embedding_seed):
        f = _RandomFeatureMap(n_latent, n_features, embedding_seed)
        shape = "curve" if n_latent == 1 else "surface"
        super().__init__(
            f=f,
            log_prior=functools.partial(_log_prior_box, n_latent=n_latent),
            sample_latent=functools.partial(_sample_box, n_latent=n_latent),
            support=_BOX,
            descr=(
                f"Manifold: z ~ U[-1, 1]^{n_latent}, x = f(z) + {{noise:g}} "
                f"* eps in {n_features} dimensions, f a smooth random "
                f"embedding (embedding_seed={embedding_seed}; a {shape} "
                "with every feature of mean 0 and variance 1 over z)."
            ),
        )
        self.n_latent = n_latent
        # (noise, refine) -> rule: every Bunch of this model shares its rule.
        self._rules = {}

    def _rule(self, noise, refine):
        scale = _PANEL_NOISE_WIDTHS * noise / refine
        max_width = _PANEL_MAX_WIDTH / refine
        reach = _REACH_NOISE_WIDTHS * noise
        if self.n_latent == 1:
            grid, weights = _adaptive_gauss_legendre(
                self.f, *_BOX, scale=scale, max_width=max_width, reach=reach
            )
        else:
            slices = np.linspace(*_BOX, _SLICES)
            axes = []
            for axis in range(2):

                def rate(t, step, axis=axis):
                    out = np.zeros(t.size)
                    for s in slices:
                        z = np.empty((t.size, 2))
                        z[:, axis], z[:, 1 - axis] = t, s
                        d1 = np.gradient(self.f(z), step, axis=0)
                        d2 = np.gradient(d1, step, axis=0)
                        np.maximum(
                            out,
                            np.sqrt(
                                (d1**2).sum(axis=1)
                                + reach * np.linalg.norm(d2, axis=1)
                            ),
                            out=out,
                        )
                    return out

                axes.append(
                    _place_panels(
                        rate, *_BOX, scale=scale, max_width=max_width
                    )
                )
            (z1, w1), (z2, w2) = axes
            mesh = np.meshgrid(z1, z2, indexing="ij")
            grid = np.column_stack([m.ravel() for m in mesh])
            weights = np.outer(w1, w2).ravel()
        log_weights = np.log(weights) + self.log_prior(grid)
        log_weights -= logsumexp(log_weights)
        return grid, log_weights

    def _density(self, rule, noise):
        grid, log_weights = rule
        return _MixtureLogDensity(self.f(grid), log_weights, noise)

    def quadrature(self, noise, refine=1):
        """The coarsest rule that agrees with the next finer one.

        The first rule tried has panels ``1 / (refine * _REFINE_START)``
        times the curves' default length.
        """
        key = (noise, refine)
        if key not in self._rules:
            self._rules[key] = self._refined_rule(
                noise, refine * _REFINE_START
            )
        grid, log_weights = self._rules[key]
        return grid.copy(), log_weights.copy()

    def _refined_rule(self, noise, refine):
        rng = np.random.RandomState(0)
        means = self.f(self.sample_latent(rng, _CHECK_ROWS))
        # Samples, and points 3 noise widths further out.
        eps = rng.standard_normal((2,) + means.shape)
        check = np.vstack([means + noise * eps[0], means + 3 * noise * eps[1]])
        coarse = self._rule(noise, refine)
        log_p = self._density(coarse, noise)(check)
        for _ in range(_MAX_REFINEMENTS):
            refine *= _REFINE_STEP
            fine = self._rule(noise, refine)
            log_p_fine = self._density(fine, noise)(check)
            if np.max(np.abs(log_p - log_p_fine)) < _RULE_TOL:
                break
            coarse, log_p = fine, log_p_fine
        else:
            raise RuntimeError(
                "the latent quadrature did not converge; use a larger noise."
            )
        return coarse


# ---------------------------------------------------------------------------
# Public generators
# ---------------------------------------------------------------------------


def make_figure1(n_samples=2000, *, variant=1, noise=0.01, random_state=None):
    """Generate the 1-D non-identifiable pair of the MAPA paper's Figure 1.

    The latent is ``z ~ U[0, 1]`` and ``x = f(z) + noise * eps`` with
    ``f(z) = (0.5 - z)^2`` (variant 1) or ``f(z) = 0.25 z^2`` (variant 2).
    Both variants have exactly the same density ``p(x)`` (``|0.5 - z|`` and
    ``z / 2`` are both ``U[0, 0.5]``), so the mean function cannot be
    identified from the data.  The noiseless data lie in ``[0, 0.25]`` with
    a density proportional to ``x^(-1/2)``.

    Parameters
    ----------
    n_samples : int, default=2000
        Number of samples.
    variant : {1, 2}, default=1
        Which of the two mean functions to use.
    noise : float, default=0.01
        Standard deviation of the Gaussian noise.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for the draws.

    Returns
    -------
    data : sklearn.utils.Bunch
        With keys ``X`` (n_samples, 1), ``codes`` (n_samples, 1),
        ``log_density``, ``f``, ``log_prior``, ``noise``, ``latent_grid``,
        ``latent_log_weights`` and ``DESCR``; see :mod:`skmapa.datasets`.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa.datasets import make_figure1
    >>> d1 = make_figure1(n_samples=500, variant=1, random_state=0)
    >>> d2 = make_figure1(n_samples=500, variant=2, random_state=0)
    >>> d1.X.shape, d1.codes.shape
    ((500, 1), (500, 1))
    >>> x = np.array([[0.0], [0.1], [0.2]])
    >>> bool(np.allclose(d1.log_density(x), d2.log_density(x)))
    True
    >>> d1.f(np.array([0.0, 0.5, 1.0])).ravel().tolist()
    [0.25, 0.0, 0.25]
    """
    variant = _check_variant(variant)
    return _figure1_model(variant).make(n_samples, noise, random_state)


def make_absolute_value(
    n_samples=2000, *, variant=1, noise=0.05, random_state=None
):
    """Generate a 2-D non-identifiable pair on a parabola.

    The latent is ``z ~ U[-1, 1]``; with ``g(s) = (s, s^2)`` the mean is
    ``f(z) = g(2|z| - 1)`` (variant 1, two codes ``z`` and ``-z`` map to
    the same point) or ``f(z) = g(z)`` (variant 2, injective).  Because
    ``2|z| - 1 ~ U[-1, 1]`` the two variants have exactly the same density
    ``p(x)``.

    Parameters
    ----------
    n_samples : int, default=2000
        Number of samples.
    variant : {1, 2}, default=1
        Which of the two mean functions to use.
    noise : float, default=0.05
        Standard deviation of the Gaussian noise.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for the draws.

    Returns
    -------
    data : sklearn.utils.Bunch
        With keys ``X`` (n_samples, 2), ``codes`` (n_samples, 1),
        ``log_density``, ``f``, ``log_prior``, ``noise``, ``latent_grid``,
        ``latent_log_weights`` and ``DESCR``; see :mod:`skmapa.datasets`.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa.datasets import make_absolute_value
    >>> data = make_absolute_value(n_samples=300, random_state=0)
    >>> data.X.shape, data.codes.shape
    ((300, 2), (300, 1))
    >>> data.f(np.array([-0.5, 0.5])).tolist()  # z and -z give the same x
    [[0.0, 0.0], [0.0, 0.0]]
    >>> other = make_absolute_value(variant=2, random_state=0)
    >>> bool(np.allclose(data.log_density(data.X), other.log_density(data.X)))
    True
    """
    variant = _check_variant(variant)
    return _absolute_value_model(variant).make(n_samples, noise, random_state)


def make_circle(n_samples=2000, *, variant=1, noise=0.1, random_state=None):
    """Generate a noisy unit circle with two different parametrisations.

    The latent is ``z ~ N(0, 1)`` and ``x = (cos a, sin a) + noise * eps``
    with ``a = 2 pi Phi(z)`` (variant 1) or ``a = pi/2 - 2 pi Phi(z)``
    (variant 2), where ``Phi`` is the standard normal CDF.  In both
    variants the angle is uniform on the circle, so ``p(x)`` is the same.

    Parameters
    ----------
    n_samples : int, default=2000
        Number of samples.
    variant : {1, 2}, default=1
        Which of the two parametrisations to use.
    noise : float, default=0.1
        Standard deviation of the Gaussian noise.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for the draws.

    Returns
    -------
    data : sklearn.utils.Bunch
        With keys ``X`` (n_samples, 2), ``codes`` (n_samples, 1),
        ``log_density``, ``f``, ``log_prior``, ``noise``, ``latent_grid``,
        ``latent_log_weights`` and ``DESCR``; see :mod:`skmapa.datasets`.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa.datasets import make_circle
    >>> data = make_circle(n_samples=1000, random_state=0)
    >>> data.X.shape
    (1000, 2)
    >>> radius = np.linalg.norm(data.f(data.codes), axis=1)
    >>> bool(np.allclose(radius, 1.0))
    True
    >>> round(float(np.exp(data.log_prior(np.array([0.0])))[0]), 4)
    0.3989
    """
    variant = _check_variant(variant)
    return _circle_model(variant).make(n_samples, noise, random_state)


def make_spiral(n_samples=2000, *, noise=0.05, random_state=None):
    """Generate a noisy open spiral in 2-D.

    The latent is ``z ~ U[0, 1]``; with ``t = pi + 3 pi z`` the mean is
    ``f(z) = (t / (4 pi)) (cos t, sin t)``: 1.5 turns with radius growing
    from 0.25 to 1 and a gap of 0.5 between neighbouring arms.

    Parameters
    ----------
    n_samples : int, default=2000
        Number of samples.
    noise : float, default=0.05
        Standard deviation of the Gaussian noise.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for the draws.

    Returns
    -------
    data : sklearn.utils.Bunch
        With keys ``X`` (n_samples, 2), ``codes`` (n_samples, 1),
        ``log_density``, ``f``, ``log_prior``, ``noise``, ``latent_grid``,
        ``latent_log_weights`` and ``DESCR``; see :mod:`skmapa.datasets`.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa.datasets import make_spiral
    >>> data = make_spiral(n_samples=200, random_state=0)
    >>> data.X.shape, data.codes.shape
    ((200, 2), (200, 1))
    >>> np.linalg.norm(data.f(np.array([0.0, 1.0])), axis=1).round(3).tolist()
    [0.25, 1.0]
    """
    return _spiral_model().make(n_samples, noise, random_state)


def make_two_clusters(n_samples=2000, *, noise=0.1, random_state=None):
    """Generate two well separated clusters from a smooth 1-D curve.

    The latent is ``z ~ N(0, 1)`` and ``f(z) = (2 tanh(8 z), z / 2)``: the
    steep ``tanh`` sends the codes ``z < 0`` to a cluster around
    ``x_1 = -2`` and ``z > 0`` to one around ``x_1 = 2``; only about 10 %
    of the data lie in the bridge ``|x_1| < 1.5`` between them.

    Parameters
    ----------
    n_samples : int, default=2000
        Number of samples.
    noise : float, default=0.1
        Standard deviation of the Gaussian noise.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for the draws.

    Returns
    -------
    data : sklearn.utils.Bunch
        With keys ``X`` (n_samples, 2), ``codes`` (n_samples, 1),
        ``log_density``, ``f``, ``log_prior``, ``noise``, ``latent_grid``,
        ``latent_log_weights`` and ``DESCR``; see :mod:`skmapa.datasets`.

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa.datasets import make_two_clusters
    >>> data = make_two_clusters(n_samples=1000, random_state=0)
    >>> data.X.shape
    (1000, 2)
    >>> side = np.sign(data.f(data.codes)[:, 0])
    >>> bool(np.all(side == np.sign(data.codes[:, 0])))
    True
    """
    return _two_clusters_model().make(n_samples, noise, random_state)


def make_manifold(
    n_samples=2000,
    *,
    n_latent=1,
    n_features=10,
    noise=0.1,
    embedding_seed=0,
    random_state=None,
):
    """Generate a noisy curve or surface embedded smoothly in many dimensions.

    The latent is uniform on the box, ``z ~ U[-1, 1]^n_latent``, and
    ``x = f(z) + noise * eps`` in ``n_features`` dimensions, where ``f`` is
    a smooth random embedding: a random linear map of ``z`` plus random
    Fourier features ``sin(w . z + b)`` (16 of them, frequencies ``w ~ N(0,
    4 I)``) mixed by a random matrix, every output feature then standardised
    to mean 0 and variance 1 over the latent.  ``embedding_seed`` alone
    draws ``f``, ``random_state`` alone the samples: the same
    ``embedding_seed`` gives the same manifold and the same density whatever
    ``random_state``, so fresh samples of one distribution come from calls
    that differ in ``random_state`` only.

    The exact log density is a latent quadrature as for the other sets: the
    adaptive rule of the curves for ``n_latent=1``, and for ``n_latent=2``
    the tensor product of one adaptive rule per latent axis.  The rule is
    refined (every panel 1.5 times shorter) until two resolutions agree to
    ``1e-5`` nats on fixed check points (samples, and points three noise widths
    further out), and the coarser of the two is kept.  The number of nodes
    grows like ``(sqrt(n_features) / noise)^n_latent``: at ``noise=0.1`` a
    curve needs a few hundred, a surface in 10 dimensions about ``10^5``
    (``log_density`` then costs about 0.7 ms per row) and one in 30
    dimensions about ``3.5 10^5`` (4 ms per row; 7 10^5 nodes and 12 ms
    per row in 50 dimensions).

    Parameters
    ----------
    n_samples : int, default=2000
        Number of samples.
    n_latent : {1, 2}, default=1
        Dimension of the latent space: 1 for a curve, 2 for a surface.
    n_features : int, default=10
        Dimension of the data, from 2 to 100.
    noise : float, default=0.1
        Standard deviation of the Gaussian noise on every feature.
    embedding_seed : int, default=0
        Seed of the random embedding ``f``.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for the draws of ``z`` and of the noise.

    Returns
    -------
    data : sklearn.utils.Bunch
        With keys ``X`` (n_samples, n_features), ``codes`` (n_samples,
        n_latent), ``log_density``, ``f``, ``log_prior``, ``noise``,
        ``latent_grid``, ``latent_log_weights`` and ``DESCR``; see
        :mod:`skmapa.datasets`.  ``latent_grid`` has shape (G,) for
        ``n_latent=1``, as for the other sets, and (G, 2) for
        ``n_latent=2``; ``f`` and ``log_prior`` take codes of shape (m,
        n_latent) (or (m,) when ``n_latent=1``).

    Examples
    --------
    >>> import numpy as np
    >>> from skmapa.datasets import make_manifold
    >>> train = make_manifold(500, n_latent=2, n_features=10, random_state=0)
    >>> train.X.shape, train.codes.shape, train.latent_grid.shape[1]
    ((500, 10), (500, 2), 2)
    >>> mean = train.f(train.latent_grid).T @ np.exp(train.latent_log_weights)
    >>> bool(np.allclose(mean, 0.0, atol=1e-6))  # every feature is centred
    True
    >>> test = make_manifold(500, n_latent=2, n_features=10, random_state=1)
    >>> bool(np.array_equal(train.latent_grid, test.latent_grid))
    True
    >>> gap = test.log_density(test.X) - train.log_density(test.X)
    >>> float(np.abs(gap).max())  # one density: KL(test || train) = 0
    0.0
    """
    n_latent = _check_int_in(n_latent, "n_latent", (1, 2))
    n_features = _check_int_in(n_features, "n_features", (2, 100))
    embedding_seed = _check_int_in(
        embedding_seed, "embedding_seed", (0, 2**32 - 1)
    )
    n_samples = _check_n_samples(n_samples)
    noise = _check_noise(noise)
    model = _manifold_model(n_latent, n_features, embedding_seed)
    return model.make(n_samples, noise, random_state)


@functools.lru_cache(maxsize=8)
def _manifold_model(n_latent, n_features, embedding_seed):
    return _LatentManifoldModel(n_latent, n_features, embedding_seed)


DATASETS = {
    "figure1": make_figure1,
    "absolute_value": make_absolute_value,
    "circle": make_circle,
    "spiral": make_spiral,
    "two_clusters": make_two_clusters,
}
"""Mapping from data-set name to generator, for benchmarks to iterate over."""

# Private: name -> factory of the underlying model (tests use it to refine the
# quadrature).  Factories of the pairs take the variant.
_MODELS = {
    "figure1": _figure1_model,
    "absolute_value": _absolute_value_model,
    "circle": _circle_model,
    "spiral": lambda variant=1: _spiral_model(),
    "two_clusters": lambda variant=1: _two_clusters_model(),
}
