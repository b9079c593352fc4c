"""The benchmarks' 10-D spiral: its exact density, checked independently."""

import numpy as np
import pytest

from skmapa.datasets import _MixtureLogDensity, make_spiral

common = pytest.importorskip("benchmarks._common")


def test_rotated_spiral_density_is_the_rotated_mixture():
    # The spiral's density is a Gaussian mixture over latent nodes; rotating
    # the data into 10-D with the noise in the extra coordinates rotates the
    # mixture's means (padded with zeros), which gives the density directly.
    X, log_density = common.spiral_data(300, n_features=10, random_state=3)
    assert X.shape == (300, 10)
    base = make_spiral(300, random_state=3).log_density
    Q, _ = np.linalg.qr(np.random.RandomState(12345).normal(size=(10, 10)))
    means = np.hstack([base.means, np.zeros((base.means.shape[0], 8))]) @ Q.T
    direct = _MixtureLogDensity(means, base.log_weights, base.noise)
    probe = np.vstack([X[:50], X[:50] + 0.1 * np.random.RandomState(0).normal(size=(50, 10))])
    np.testing.assert_allclose(log_density(probe), direct(probe), rtol=1e-10, atol=1e-8)


def test_rotated_spiral_keeps_the_spiral_when_two_dimensional():
    X, log_density = common.spiral_data(100, n_features=2, random_state=1)
    base = make_spiral(100, random_state=1)
    np.testing.assert_array_equal(X, base.X)
    np.testing.assert_allclose(log_density(X), base.log_density(X))


def _assert_continuous(X, columns, min_distinct=10, max_tied=0.05):
    assert X.shape[1] == len(columns)
    assert np.all(np.isfinite(X))
    for j in range(X.shape[1]):
        _, counts = np.unique(X[:, j], return_counts=True)
        assert len(counts) >= min_distinct, columns[j]
        assert counts.max() <= max(max_tied * X.shape[0], 2), columns[j]
    # no column is (up to rounding) a linear function of the others
    Z = (X - X.mean(0)) / X.std(0)
    assert np.linalg.svd(Z / np.sqrt(len(Z)), compute_uv=False)[-1] > 1e-3


def test_real_suite_sklearn_tables_are_continuous():
    real = pytest.importorskip("benchmarks.real")
    X, columns = real.load_table("iris")
    assert X.shape == (150, 4)
    _assert_continuous(X, columns, max_tied=0.25)  # measured to 0.1 cm
    X, columns = real.load_table("diabetes")
    assert X.shape == (442, 7)
    assert not {"sex", "s2", "s4"} & set(columns)
    _assert_continuous(X, columns, max_tied=0.1)
    X, columns = real.load_table("digits", max_rows=300)
    assert X.shape == (300, 64)
    assert np.all((X >= 0) & (X < 1))
    np.testing.assert_array_equal(X, real.load_table("digits", max_rows=300)[0])


def test_diabetes_ldl_is_derived_from_the_other_columns():
    # why the real suite drops s2: the Friedewald formula ldl = tc - hdl -
    # tg / 5 (s1, s3 and exp(s5) on the raw table) gives it to 0.1% of its
    # standard deviation, so the full table lies on a curved surface
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    col = dict(zip(data.feature_names, data.data.T))
    residual = col["s2"] - (col["s1"] - col["s3"] - np.exp(col["s5"]) / 5)
    assert np.std(residual) < 0.005 * np.std(col["s2"])


def test_real_suite_statsmodels_tables_are_continuous():
    pytest.importorskip("statsmodels")
    real = pytest.importorskip("benchmarks.real")
    X, columns = real.load_table("star98")
    assert X.shape == (303, 12)
    _assert_continuous(X, columns)
    X, columns = real.load_table("macrodata")
    assert X.shape == (202, 10)
    _assert_continuous(X, columns, max_tied=0.1)


@pytest.mark.parametrize("name", ["moons", "blobs", "swiss_roll", "spiral",
                                  "manifold d1 D10", "iris"])
def test_zoo_splits(name):
    zoo = pytest.importorskip("benchmarks.zoo")
    cfg = dict(zoo.QUICK, n_train=120, n_test=80)
    A, B, log_density = zoo.load_split(name, 0, cfg)
    kind = zoo.SETS[name][2]
    if kind == "real":
        assert A.shape[0] == 120 and B.shape[0] == 30  # iris, 80/20
    else:
        assert (A.shape[0], B.shape[0]) == (120, 80)
    assert A.shape[1] == B.shape[1] >= zoo.SETS[name][1]
    if kind == "skmapa":
        assert log_density(B).shape == (80,)
    else:  # standardized on the training rows
        assert log_density is None
        np.testing.assert_allclose(A.mean(0), 0, atol=1e-12)
        np.testing.assert_allclose(A.std(0), 1)
    again = zoo.load_split(name, 0, cfg)
    np.testing.assert_array_equal(again[1], B)


def test_zoo_pairs_mapa_with_each_seeds_better_deep_baseline():
    """The gaps behind 'paired' and 'seeds ahead' pair each seed's MAPA with
    that seed's better deep baseline (a tie is a gap of 0, counted as
    ahead), not the medians; 'paired' is their mean ± standard error."""
    zoo = pytest.importorskip("benchmarks.zoo")
    lls = {0: (-1.0, -2.0, -1.5), 1: (-1.2, -1.3, -1.1), 2: (-0.9, -0.9, -1.0)}
    records = [{"dataset": "d", "seed": seed, "estimator": name, "heldout_ll": ll}
               for seed, values in lls.items()
               for name, ll in zip(["MAPA", "VAE", "IWAE"], values)]
    records.append({"dataset": "other", "seed": 1, "estimator": "MAPA", "heldout_ll": 9.0})
    gaps = zoo._gaps(records, "d", [0, 1, 2])
    np.testing.assert_allclose(gaps, [0.5, -0.1, 0.0], atol=1e-12)
    assert int(np.sum(gaps >= 0)) == 2
    np.testing.assert_allclose(zoo._gaps(records, "d", [1]), [-0.1])
    # mean 2/15; deviations 11/30, -7/30, -4/30: sd^2 = (121 + 49 + 16) / 900 / 2
    mean, se = (float(v) for v in zoo._mean_se(gaps).split(" ± "))
    np.testing.assert_allclose(mean, 2 / 15, rtol=1e-2)
    np.testing.assert_allclose(se, (186 / 1800 / 3) ** 0.5, rtol=1e-2)
    assert zoo._mean_se(np.array([0.25])) == "0.250"


@pytest.mark.parametrize("maker", ["kde_model", "gmm_model"])
def test_baselines_score_and_sample_in_the_data_units(maker):
    """The CV baselines behind the zoo's sample gallery: a Gaussian of mean 5
    and standard deviation 10 (the KDE is fitted on standardized rows) gives
    draws of that mean and spread, the same draws for the same seed, and a
    density in the data's units: it integrates to 1 over a grid."""
    density = pytest.importorskip("benchmarks.density")
    X = 5 + 10 * np.random.RandomState(0).normal(size=(400, 1))
    cfg = dict(kde_bandwidths=np.logspace(-1, 0, 4), gmm_components=[1, 2], cv_folds=2)
    model, chosen = getattr(density, maker)(X, 0, cfg)
    draws = model.sample(4000, random_state=1)
    assert draws.shape == (4000, 1)
    np.testing.assert_array_equal(draws, model.sample(4000, random_state=1))
    # a kernel of width h (standardized units) adds (h * sd)^2 to the variance
    h = chosen.get("bandwidth (std. units)", 0.0)
    spread = np.sqrt(X.var() * (1 + h ** 2))
    assert abs(draws.mean() - X.mean()) < 0.5 and abs(draws.std() / spread - 1) < 0.05
    grid = np.linspace(-60, 70, 4001)[:, None]
    mass = np.exp(model.score_samples(grid)).sum() * (grid[1, 0] - grid[0, 0])
    np.testing.assert_allclose(mass, 1.0, rtol=1e-3)
    np.testing.assert_array_equal(X, 5 + 10 * np.random.RandomState(0).normal(size=(400, 1)))
