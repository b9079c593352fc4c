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
