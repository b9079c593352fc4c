import os

import numpy as np
import pytest

# Small models run fastest on one thread, and a busy shared machine makes
# OpenMP's spinning threads pathologically slow; tests pin torch to the
# thread count given in SKMAPA_TEST_THREADS (default 1).
import torch

torch.set_num_threads(int(os.environ.get("SKMAPA_TEST_THREADS", "1")))


@pytest.fixture
def curve_data():
    """A noisy 2-D arc with a 1-D latent: (train, test)."""
    rng = np.random.RandomState(0)
    t = rng.uniform(0, 1, 1200)
    X = np.c_[np.cos(3 * t), np.sin(3 * t)] + 0.05 * rng.randn(1200, 2)
    return X[:800], X[800:]
