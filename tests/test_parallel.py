"""Threads under joblib, and a search on a Dask cluster through joblib."""

import numpy as np
import pytest
import torch
from joblib import Parallel, delayed
from sklearn.model_selection import GridSearchCV

from skmapa import MAPADensity, VAEDensity


def _fit_in_worker(X):
    before = torch.get_num_threads()
    VAEDensity(n_components=1, max_iter=2, hidden_layer_sizes=(8,), random_state=0).fit(X)
    return before, torch.get_num_threads()


def test_workers_use_the_thread_budget_joblib_gives_them(curve_data):
    """loky gives each of 2 workers cpu_count // 2 threads; fitting keeps it."""
    X, _ = curve_data
    results = Parallel(n_jobs=2)(delayed(_fit_in_worker)(X) for _ in range(2))
    import os

    budget = max(1, (os.cpu_count() or 1) // 2)
    for before, after in results:
        assert before == after
        assert after <= budget


def test_fit_never_changes_torch_threads(curve_data):
    X, _ = curve_data
    before = torch.get_num_threads()
    MAPADensity(max_iter=2, refine_iter=1, random_state=0).fit(X)
    assert torch.get_num_threads() == before


def test_search_on_a_local_dask_cluster_matches_local_search(curve_data):
    distributed = pytest.importorskip("distributed")
    from joblib import parallel_backend

    X, _ = curve_data
    grid = {"n_neighbors": [5, 10], "bandwidth": ["auto", 0.3]}
    est = MAPADensity(n_components=1, max_iter=3, refine_iter=1, hidden_layer_sizes=(8,),
                      n_eval_samples=64, random_state=0)
    local = GridSearchCV(est, grid, cv=2).fit(X)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        with parallel_backend("dask"):
            remote = GridSearchCV(est, grid, cv=2, n_jobs=-1).fit(X)
    # Worker processes may run BLAS with other thread pools than this one;
    # training amplifies last-bit differences to ~1e-7 relative (seen with
    # numpy 1.26), so "the same search" is checked at rtol=1e-6.
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"],
                               local.cv_results_["mean_test_score"], rtol=1e-6)
    assert remote.best_params_ == local.best_params_
