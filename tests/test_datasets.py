"""Tests for skmapa.datasets: the returned ground truth is really the truth."""

import functools
import pickle

import numpy as np
import pytest
from scipy import stats
from scipy.integrate import simpson, trapezoid
from scipy.special import logsumexp, ndtr

from skmapa import datasets
from skmapa.datasets import (
    DATASETS,
    make_absolute_value,
    make_circle,
    make_figure1,
    make_manifold,
    make_spiral,
    make_two_clusters,
)

PAIRS = ["figure1", "absolute_value", "circle"]
CASES = [(name, v) for name in PAIRS for v in (1, 2)] + [
    ("spiral", None),
    ("two_clusters", None),
]
CASE_IDS = [name if v is None else f"{name}-{v}" for name, v in CASES]
DEFAULT_NOISE = {
    "figure1": 0.01,
    "absolute_value": 0.05,
    "circle": 0.1,
    "spiral": 0.05,
    "two_clusters": 0.1,
}
N_FEATURES = {
    "figure1": 1,
    "absolute_value": 2,
    "circle": 2,
    "spiral": 2,
    "two_clusters": 2,
}

cases = pytest.mark.parametrize("name, variant", CASES, ids=CASE_IDS)


def make(name, variant, n_samples=2000, **kwargs):
    if variant is not None:
        kwargs["variant"] = variant
    return DATASETS[name](n_samples, **kwargs)


def log_normal(X, means, noise):
    """log N(x_i; means_g, noise^2 I) as an (n, G) array, the direct way."""
    sq = ((X[:, None, :] - means[None, :, :]) ** 2).sum(axis=-1)
    return -0.5 * sq / noise**2 - 0.5 * X.shape[1] * np.log(
        2 * np.pi * noise**2
    )


@functools.lru_cache(maxsize=None)
def x_grid(name, variant):
    """A uniform x grid covering the density; returns (data, axes, log p)."""
    data = make(name, variant, n_samples=10, random_state=0)
    noise = data.noise
    # Curve points that carry any mass, padded by 9 noise widths.
    keep = data.latent_log_weights > np.log(1e-16)
    means = data.f(data.latent_grid[keep])
    low = means.min(axis=0) - 9 * noise
    high = means.max(axis=0) + 9 * noise
    # Trapezoid on a Gaussian mixture: aliasing error ~ exp(-2 pi^2 s^2/h^2)
    # is < 1e-30 for h = noise / 2 (1-D: noise / 4).
    h = noise / (4 if data.X.shape[1] == 1 else 2)
    axes = [np.arange(lo, hi + h, h) for lo, hi in zip(low, high)]
    mesh = np.meshgrid(*axes, indexing="ij")
    points = np.column_stack([m.ravel() for m in mesh])
    log_p = data.log_density(points).reshape(mesh[0].shape)
    return data, axes, log_p


def integrate(values, axes):
    for ax in reversed(axes):
        values = trapezoid(values, ax, axis=-1)
    return float(values)


def reference_log_density(data, X, support, n_nodes=50_001):
    """Independent check: Simpson's rule on a uniform latent grid."""
    z = np.linspace(*support, n_nodes)
    integrand = data.log_prior(z)[None, :] + log_normal(
        X, data.f(z), data.noise
    )
    peak = integrand.max(axis=1, keepdims=True)
    return peak[:, 0] + np.log(simpson(np.exp(integrand - peak), x=z, axis=1))


def mixture_cdf(data, direction):
    """Exact CDF of direction . x under the mixture given by the Bunch."""
    centres = data.f(data.latent_grid) @ direction
    weights = np.exp(data.latent_log_weights)
    scale = data.noise * np.linalg.norm(direction)

    def cdf(t):
        t = np.atleast_1d(t)
        return ndtr((t[:, None] - centres[None, :]) / scale) @ weights

    return cdf


# ---------------------------------------------------------------------------
# API, shapes, dtypes, determinism
# ---------------------------------------------------------------------------


def test_registry():
    assert DATASETS == {
        "figure1": make_figure1,
        "absolute_value": make_absolute_value,
        "circle": make_circle,
        "spiral": make_spiral,
        "two_clusters": make_two_clusters,
    }


@cases
def test_bunch_contents(name, variant):
    n = 123
    data = make(name, variant, n_samples=n, random_state=0)
    d = N_FEATURES[name]
    assert set(data) == {
        "X",
        "codes",
        "log_density",
        "f",
        "log_prior",
        "noise",
        "latent_grid",
        "latent_log_weights",
        "DESCR",
    }
    assert data.X.shape == (n, d) and data.X.dtype == np.float64
    assert data.codes.shape == (n, 1) and data.codes.dtype == np.float64
    assert isinstance(data.noise, float) and data.noise == DEFAULT_NOISE[name]
    assert isinstance(data.DESCR, str) and data.DESCR

    G = data.latent_grid.shape[0]
    assert data.latent_grid.shape == data.latent_log_weights.shape == (G,)
    assert np.all(np.diff(data.latent_grid) > 0)
    assert logsumexp(data.latent_log_weights) == pytest.approx(0, abs=1e-12)

    # f and log_prior accept (m,) and (m, 1).
    assert data.f(data.codes).shape == (n, d)
    np.testing.assert_array_equal(data.f(data.codes), data.f(data.codes[:, 0]))
    lp = data.log_prior(data.codes)
    assert lp.shape == (n,) and np.all(np.isfinite(lp))
    np.testing.assert_array_equal(lp, data.log_prior(data.codes[:, 0]))

    log_p = data.log_density(data.X)
    assert log_p.shape == (n,) and log_p.dtype == np.float64
    assert np.all(np.isfinite(log_p))


@cases
def test_determinism(name, variant):
    a = make(name, variant, n_samples=50, random_state=7)
    b = make(name, variant, n_samples=50, random_state=7)
    c = make(name, variant, n_samples=50, random_state=8)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.latent_grid, b.latent_grid)
    assert not np.array_equal(a.X, c.X)
    # A RandomState instance is used as is.
    rng = np.random.RandomState(7)
    d = make(name, variant, n_samples=50, random_state=rng)
    np.testing.assert_array_equal(a.X, d.X)


@cases
def test_noise_model(name, variant):
    """X = f(codes) + noise * eps with standard normal eps; codes ~ prior."""
    noise = 0.3 * DEFAULT_NOISE[name]
    data = make(name, variant, n_samples=4000, noise=noise, random_state=1)
    eps = (data.X - data.f(data.codes)) / noise
    assert np.abs(eps.mean(axis=0)).max() < 4 / np.sqrt(eps.size)
    assert np.abs(eps.std(axis=0) - 1).max() < 0.05
    assert np.all(np.isfinite(data.log_prior(data.codes)))
    assert data.noise == noise


def test_priors():
    uniform01 = make_figure1(10, random_state=0).log_prior
    np.testing.assert_allclose(
        np.exp(uniform01(np.array([0.0, 0.3, 1.0]))), 1.0
    )
    assert np.all(np.isneginf(uniform01(np.array([-0.1, 1.1]))))
    uniform11 = make_absolute_value(10, random_state=0).log_prior
    np.testing.assert_allclose(np.exp(uniform11(np.array([-1.0, 0.9]))), 0.5)
    assert np.all(np.isneginf(uniform11(np.array([-1.5, 1.01]))))
    normal = make_two_clusters(10, random_state=0).log_prior
    z = np.array([-3.0, 0.0, 1.5])
    np.testing.assert_allclose(normal(z), stats.norm.logpdf(z))
    assert make_spiral(10, random_state=0).log_prior is not None


def test_pair_mean_functions():
    z = np.linspace(0, 1, 11)
    np.testing.assert_allclose(
        make_figure1(5, variant=1, random_state=0).f(z)[:, 0], (0.5 - z) ** 2
    )
    np.testing.assert_allclose(
        make_figure1(5, variant=2, random_state=0).f(z)[:, 0], z**2 / 4
    )
    z = np.linspace(-1, 1, 21)
    f1 = make_absolute_value(5, variant=1, random_state=0).f
    f2 = make_absolute_value(5, variant=2, random_state=0).f
    np.testing.assert_allclose(f1(z), f1(-z))  # not injective
    np.testing.assert_allclose(f2(z), np.column_stack([z, z**2]))
    assert not np.allclose(f1(z), f2(z))
    z = np.linspace(-3, 3, 31)
    c1 = make_circle(5, variant=1, random_state=0).f(z)
    c2 = make_circle(5, variant=2, random_state=0).f(z)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1)
    np.testing.assert_allclose(c2, c1[:, ::-1], atol=1e-12)  # reflection


# ---------------------------------------------------------------------------
# The density is exact
# ---------------------------------------------------------------------------


@cases
def test_log_density_is_the_grid_mixture(name, variant):
    """log_density uses exactly latent_grid and latent_log_weights."""
    data = make(name, variant, n_samples=40, random_state=2)
    expected = logsumexp(
        data.latent_log_weights[None, :]
        + log_normal(data.X, data.f(data.latent_grid), data.noise),
        axis=1,
    )
    np.testing.assert_allclose(data.log_density(data.X), expected, atol=1e-9)


@cases
def test_log_density_matches_independent_quadrature(name, variant):
    """On samples and on points up to ~12 noise widths off the curve."""
    data = make(name, variant, n_samples=20, random_state=3)
    support = datasets._MODELS[name](variant).support
    rng = np.random.RandomState(3)
    direction = rng.standard_normal(data.X.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    far = data.X + 12 * data.noise * direction
    X = np.vstack([data.X, far])
    expected = reference_log_density(data, X, support)
    np.testing.assert_allclose(data.log_density(X), expected, atol=1e-6)


@cases
def test_refined_quadrature_agrees(name, variant):
    """Halving every panel twice changes log p by far less than 1e-4."""
    data = make(name, variant, n_samples=2000, random_state=4)
    model = datasets._MODELS[name](variant)
    fine = model.make(10, data.noise, random_state=0, refine=4)
    assert fine.latent_grid.size > 2.5 * data.latent_grid.size
    diff = np.abs(data.log_density(data.X) - fine.log_density(data.X))
    assert diff.max() < 1e-5


@pytest.mark.parametrize("noise", [0.002, 0.05])
def test_quadrature_adapts_to_noise(noise):
    """Smaller noise gets more nodes and stays accurate."""
    data = make_absolute_value(30, variant=1, noise=noise, random_state=5)
    expected = reference_log_density(data, data.X, (-1.0, 1.0))
    np.testing.assert_allclose(data.log_density(data.X), expected, atol=1e-6)


@cases
def test_density_integrates_to_one(name, variant):
    data, axes, log_p = x_grid(name, variant)
    assert integrate(np.exp(log_p), axes) == pytest.approx(1, abs=1e-6)


@cases
def test_entropy_two_ways(name, variant):
    """Mean log p on fresh samples estimates -H = int p log p."""
    data, axes, log_p = x_grid(name, variant)
    neg_entropy = integrate(np.exp(log_p) * log_p, axes)
    sample = make(name, variant, n_samples=4000, random_state=6)
    values = sample.log_density(sample.X)
    standard_error = values.std() / np.sqrt(values.size)
    assert abs(values.mean() - neg_entropy) < 4 * standard_error


@cases
def test_samples_lie_where_density_is_high(name, variant):
    data, axes, log_p = x_grid(name, variant)
    rng = np.random.RandomState(0)
    box = np.column_stack(
        [rng.uniform(ax[0], ax[-1], size=2000) for ax in axes]
    )
    log_box = data.log_density(box)
    sample = make(name, variant, n_samples=2000, random_state=7)
    log_sample = sample.log_density(sample.X)
    assert np.median(log_sample) > np.quantile(log_box, 0.8)
    assert log_sample.mean() > log_box.mean() + 2


@cases
def test_samples_follow_the_density(name, variant):
    """One-sample KS of projections against the exact mixture CDF."""
    data = make(name, variant, n_samples=3000, random_state=8)
    directions = (
        [np.array([1.0])]
        if data.X.shape[1] == 1
        else [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.6, 0.8])]
    )
    for u in directions:
        result = stats.kstest(data.X @ u, mixture_cdf(data, u))
        assert result.pvalue > 1e-3, (u, result)


# ---------------------------------------------------------------------------
# Non-identifiable pairs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRS)
def test_pairs_have_the_same_density(name):
    d1 = make(name, 1, n_samples=1000, random_state=9)
    d2 = make(name, 2, n_samples=1000, random_state=9)
    assert not np.allclose(d1.f(d1.codes), d2.f(d1.codes))
    _, axes, _ = x_grid(name, 1)
    rng = np.random.RandomState(1)
    box = np.column_stack(
        [rng.uniform(ax[0], ax[-1], size=500) for ax in axes]
    )
    for X in (d1.X, d2.X, box):
        np.testing.assert_allclose(
            d1.log_density(X), d2.log_density(X), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("name", PAIRS)
def test_pairs_samples_agree(name):
    """Same seed, both variants: samples from the same p(x) (two-sample KS)."""
    d1 = make(name, 1, n_samples=3000, random_state=10)
    d2 = make(name, 2, n_samples=3000, random_state=10)
    assert not np.array_equal(d1.X, d2.X)
    projections = [d1.X.shape[1] * [1.0], [1.0] + (d1.X.shape[1] - 1) * [-0.5]]
    for u in np.array(projections):
        assert stats.ks_2samp(d1.X @ u, d2.X @ u).pvalue > 1e-3


# ---------------------------------------------------------------------------
# Posterior over the grid
# ---------------------------------------------------------------------------


def test_grid_gives_true_posterior():
    """For an injective curve the grid posterior recovers the true codes."""
    data = make_spiral(300, noise=0.02, random_state=11)
    log_post = data.latent_log_weights[None, :] + log_normal(
        data.X, data.f(data.latent_grid), data.noise
    )
    log_post -= logsumexp(log_post, axis=1, keepdims=True)
    post_mean = np.exp(log_post) @ data.latent_grid
    # |f'| >= 3 pi / 4 on the spiral, so the posterior sd is <~ 0.01.
    assert np.abs(post_mean - data.codes[:, 0]).max() < 0.05


# ---------------------------------------------------------------------------
# Robustness of log_density
# ---------------------------------------------------------------------------


def test_log_density_chunks(monkeypatch):
    data = make_circle(1000, random_state=12)
    whole = data.log_density(data.X)
    monkeypatch.setattr(datasets, "_CHUNK_ELEMENTS", 7 * data.latent_grid.size)
    chunked = data.log_density(data.X)
    np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-12)


def test_log_density_many_rows_and_far_points():
    data = make_figure1(100_000, random_state=13)
    log_p = data.log_density(data.X)
    assert log_p.shape == (100_000,) and np.all(np.isfinite(log_p))
    far = data.log_density(np.array([[5.0], [-5.0]]))
    # Far away only the nearest curve point matters: about -d^2 / (2 s^2).
    assert np.all(np.isfinite(far))
    np.testing.assert_allclose(far[1], -(5.0**2) / (2 * 0.01**2), rtol=1e-3)


def test_log_density_rejects_bad_input():
    data = make_spiral(10, random_state=0)
    with pytest.raises(ValueError, match="features"):
        data.log_density(np.zeros((3, 3)))
    with pytest.raises(ValueError):
        data.log_density(np.zeros(4))
    with pytest.raises(ValueError):
        data.log_density(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        data.f(np.zeros((2, 2)))


def test_bunch_pickles():
    data = make_two_clusters(50, random_state=14)
    clone = pickle.loads(pickle.dumps(data))
    np.testing.assert_array_equal(
        clone.log_density(data.X), data.log_density(data.X)
    )
    np.testing.assert_array_equal(clone.f(data.codes), data.f(data.codes))


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("generator", list(DATASETS.values()))
@pytest.mark.parametrize("n_samples", [0, -3, 2.5, "10", True, None])
def test_bad_n_samples(generator, n_samples):
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        generator(n_samples)


@pytest.mark.parametrize("generator", list(DATASETS.values()))
@pytest.mark.parametrize("noise", [0, -0.1, np.nan, np.inf, "0.1", None])
def test_bad_noise(generator, noise):
    with pytest.raises(ValueError, match="noise must be a positive"):
        generator(5, noise=noise)


@pytest.mark.parametrize("generator", [DATASETS[name] for name in PAIRS])
@pytest.mark.parametrize("variant", [0, 3, 1.5, "1", True, None])
def test_bad_variant(generator, variant):
    with pytest.raises(ValueError, match="variant must be 1 or 2"):
        generator(5, variant=variant)


def test_n_samples_accepts_numpy_integers():
    assert make_circle(np.int64(7), random_state=0).X.shape == (7, 2)
    assert make_spiral(1, noise=np.float32(0.1), random_state=0).X.shape == (
        1,
        2,
    )


@pytest.mark.parametrize("generator", [make_spiral, make_two_clusters])
def test_single_sets_have_no_variant(generator):
    with pytest.raises(TypeError):
        generator(5, variant=1)
    with pytest.raises(TypeError):
        generator(5, 0.1)  # noise is keyword-only


# ---------------------------------------------------------------------------
# make_manifold: curves and surfaces in many dimensions
# ---------------------------------------------------------------------------


def manifold_reference(data, X, n_latent, n_nodes):
    """Independent check: Simpson's rule on a uniform grid of the latent box."""
    z1 = np.linspace(-1.0, 1.0, n_nodes)  # n_nodes odd
    w1 = np.ones(n_nodes)
    w1[1:-1:2], w1[2:-1:2] = 4, 2
    w1 *= (z1[1] - z1[0]) / 3
    if n_latent == 1:
        z, weights = z1, w1
    else:
        z = np.column_stack([m.ravel() for m in np.meshgrid(z1, z1, indexing="ij")])
        weights = np.outer(w1, w1).ravel()
    log_w = np.log(weights) + data.log_prior(z)
    means = data.f(z)
    return np.array([
        logsumexp(log_w + log_normal(x[None, :], means, data.noise)[0]) for x in X
    ])


@pytest.mark.parametrize("n_latent, n_features", [(1, 10), (2, 10), (1, 40)])
def test_manifold_bunch(n_latent, n_features):
    data = make_manifold(60, n_latent=n_latent, n_features=n_features, random_state=0)
    assert set(data) == {"X", "codes", "log_density", "f", "log_prior", "noise",
                         "latent_grid", "latent_log_weights", "DESCR"}
    assert data.X.shape == (60, n_features) and data.X.dtype == np.float64
    assert data.codes.shape == (60, n_latent)
    assert np.all(np.abs(data.codes) <= 1)
    grid_shape = data.latent_grid.shape
    assert grid_shape == ((grid_shape[0],) if n_latent == 1 else (grid_shape[0], 2))
    assert data.latent_log_weights.shape == grid_shape[:1]
    assert logsumexp(data.latent_log_weights) == pytest.approx(0, abs=1e-12)
    np.testing.assert_allclose(np.exp(data.log_prior(data.codes)), 0.5**n_latent)
    assert np.isneginf(data.log_prior(np.full((1, n_latent), 1.01))).all()
    log_p = data.log_density(data.X)
    assert log_p.shape == (60,) and np.all(np.isfinite(log_p))
    # The embedding is standardised: every feature has mean 0 and variance 1.
    means = data.f(data.latent_grid)
    w = np.exp(data.latent_log_weights)
    np.testing.assert_allclose(w @ means, 0, atol=1e-6)
    np.testing.assert_allclose(w @ means**2, 1, atol=1e-6)
    assert f"{n_features} dimensions" in data.DESCR


def test_manifold_determinism():
    kwargs = dict(n_latent=2, n_features=10)
    a = make_manifold(50, random_state=7, **kwargs)
    b = make_manifold(50, random_state=np.random.RandomState(7), **kwargs)
    c = make_manifold(50, random_state=8, **kwargs)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.X, c.X)
    # random_state draws the samples only: the manifold and its density are
    # those of embedding_seed.
    np.testing.assert_array_equal(a.latent_grid, c.latent_grid)
    np.testing.assert_array_equal(a.log_density(c.X), c.log_density(c.X))
    np.testing.assert_array_equal(a.f(a.codes), c.f(a.codes))
    other = make_manifold(50, random_state=7, embedding_seed=1, **kwargs)
    assert not np.allclose(other.f(a.codes), a.f(a.codes))
    np.testing.assert_array_equal(other.codes, a.codes)


@pytest.mark.parametrize("n_latent, n_features, noise", [(1, 2, 0.1), (2, 3, 0.5)])
def test_manifold_integrates_to_one(n_latent, n_features, noise):
    """On a low-dimensional instance, by quadrature over x; and mean log p
    on fresh samples estimates the negative entropy int p log p."""
    data = make_manifold(4000, n_latent=n_latent, n_features=n_features,
                         noise=noise, random_state=1)
    means = data.f(data.latent_grid)
    h = noise / 1.5  # trapezoid aliasing error ~ exp(-2 pi^2 1.5^2) ~ 1e-19
    axes = [np.arange(lo, hi + h, h) for lo, hi in
            zip(means.min(axis=0) - 9 * noise, means.max(axis=0) + 9 * noise)]
    mesh = np.meshgrid(*axes, indexing="ij")
    log_p = data.log_density(np.column_stack([m.ravel() for m in mesh]))
    log_p = log_p.reshape(mesh[0].shape)
    assert integrate(np.exp(log_p), axes) == pytest.approx(1, abs=1e-6)
    neg_entropy = integrate(np.exp(log_p) * log_p, axes)
    values = data.log_density(data.X)
    assert abs(values.mean() - neg_entropy) < 4 * values.std() / np.sqrt(values.size)


@pytest.mark.parametrize("n_latent, n_features, noise, n_nodes",
                         [(1, 10, 0.1, 20_001), (2, 10, 0.3, 1201)])
def test_manifold_matches_independent_quadrature(n_latent, n_features, noise, n_nodes):
    """On samples and on points 3 noise widths further off the manifold."""
    data = make_manifold(15, n_latent=n_latent, n_features=n_features,
                         noise=noise, random_state=3)
    rng = np.random.RandomState(3)
    X = np.vstack([data.X, data.X + 3 * noise * rng.standard_normal(data.X.shape)])
    expected = manifold_reference(data, X, n_latent, n_nodes)
    np.testing.assert_allclose(data.log_density(X), expected, atol=1e-6)


def test_manifold_importance_sampling_identity():
    """p(x) = E_{z ~ prior} N(x; f(z), noise^2 I): Monte Carlo with the prior
    as proposal agrees with the quadrature within its standard error."""
    data = make_manifold(5, n_latent=2, n_features=10, noise=0.5, random_state=4)
    rng = np.random.RandomState(4)
    z = rng.uniform(-1, 1, size=(200_000, 2))
    lik = np.exp(log_normal(data.X, data.f(z), data.noise))  # (5, M)
    estimate = lik.mean(axis=1)
    error = lik.std(axis=1) / np.sqrt(z.shape[0])
    exact = np.exp(data.log_density(data.X))
    assert np.all(np.abs(estimate - exact) < 4 * error)
    assert np.all(error < 0.05 * exact)  # the check has teeth


def test_manifold_refined_rule_agrees():
    data = make_manifold(300, n_latent=2, n_features=10, random_state=5)
    model = datasets._manifold_model(2, 10, 0)
    fine_grid, fine_log_w = model.quadrature(data.noise, refine=2)
    assert fine_grid.shape[0] > 1.5 * data.latent_grid.shape[0]
    fine = datasets._MixtureLogDensity(data.f(fine_grid), fine_log_w, data.noise)
    diff = np.abs(data.log_density(data.X) - fine(data.X))
    assert diff.max() < 1e-5


@pytest.mark.parametrize("n_latent, noise", [(1, 0.1), (2, 0.3)])
def test_manifold_samples_follow_the_density(n_latent, noise):
    """One-sample KS of projections of 10-D samples against the exact CDF."""
    data = make_manifold(2000, n_latent=n_latent, n_features=10, noise=noise,
                         random_state=6)
    rng = np.random.RandomState(6)
    for u in [np.eye(10)[0], np.eye(10)[7], rng.standard_normal(10)]:
        result = stats.kstest(data.X @ u, mixture_cdf(data, u))
        assert result.pvalue > 1e-3, (u, result)
    # and mean log p is far above that of points off the manifold
    log_p = data.log_density(data.X)
    off = data.log_density(data.X + 3 * data.noise * rng.standard_normal(data.X.shape))
    assert log_p.mean() > off.mean() + 10


def test_manifold_bunch_pickles():
    data = make_manifold(20, n_latent=2, n_features=10, random_state=9)
    clone = pickle.loads(pickle.dumps(data))
    np.testing.assert_array_equal(clone.log_density(data.X), data.log_density(data.X))
    np.testing.assert_array_equal(clone.f(data.codes), data.f(data.codes))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_latent=0), "n_latent must be an integer in \\[1, 2\\]"),
        (dict(n_latent=3), "n_latent must be an integer in \\[1, 2\\]"),
        (dict(n_latent=1.0), "n_latent must be an integer"),
        (dict(n_latent=True), "n_latent must be an integer"),
        (dict(n_features=1), "n_features must be an integer in \\[2, 100\\]"),
        (dict(n_features=101), "n_features must be an integer in \\[2, 100\\]"),
        (dict(n_features="10"), "n_features must be an integer"),
        (dict(embedding_seed=-1), "embedding_seed must be an integer"),
        (dict(embedding_seed=None), "embedding_seed must be an integer"),
        (dict(embedding_seed=2**32), "embedding_seed must be an integer"),
        (dict(noise=0), "noise must be a positive"),
        (dict(noise=np.nan), "noise must be a positive"),
        (dict(n_samples=0), "n_samples must be a positive int"),
    ],
)
def test_manifold_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_manifold(**{"n_samples": 5, **kwargs})


def test_manifold_codes_shape_is_checked():
    data = make_manifold(5, n_latent=2, n_features=10, random_state=0)
    with pytest.raises(ValueError, match=r"shape \(m, 2\)"):
        data.f(np.zeros(3))
    with pytest.raises(ValueError, match=r"\(m,\) or \(m, 1\)"):
        make_manifold(5, random_state=0).f(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="features"):
        data.log_density(np.zeros((2, 3)))
    with pytest.raises(TypeError):
        make_manifold(5, 1)  # keyword-only
