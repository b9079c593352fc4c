"""Suite ``parallel``: GridSearchCV with ``n_jobs=2`` against ``n_jobs=1``.

A grid of 4 MAPADensity candidates x 2-fold CV = 8 fits on spiral data.
Three ways to use the machine's 2 cores, timed in the same run, median over
repeats:

* ``n_jobs=1``, one torch thread (as the other suites run);
* ``n_jobs=1``, two torch threads (intra-op parallelism inside each fit);
* ``n_jobs=2``: two loky worker processes; joblib gives each
  ``cpu_count // n_jobs`` threads (``OMP_NUM_THREADS``), which torch follows.

The estimators never set torch's thread count; the suite sets it for the
parent process only and restores it. The cross-validated scores of the
three must agree (same fits, only the scheduling differs).
"""

import os
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold

from ._common import (
    deep_estimator,
    environment_section,
    fmt,
    log,
    md_table,
    timed,
    write_csv,
    write_report,
)

FULL = dict(n=1000, params=dict(max_iter=100, refine_iter=20), repeats=3,
            grid={"n_neighbors": [10, 20], "bandwidth": ["auto", 0.1]})
QUICK = dict(n=300, params=dict(max_iter=5, refine_iter=2), repeats=1,
             grid={"n_neighbors": [10, 20], "bandwidth": ["auto", 0.1]})


def _worker_threads():
    import torch

    return torch.get_num_threads()


def search(X, cfg, n_jobs):
    est = deep_estimator("MAPA", 0, n_components=1, **cfg["params"])
    gs = GridSearchCV(est, cfg["grid"], cv=KFold(2, shuffle=True, random_state=0),
                      n_jobs=n_jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with timed() as t:
            gs.fit(X)
    return t, gs.cv_results_["mean_test_score"]


def run(cfg, out_dir, env, datasets=None):
    import torch
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    from skmapa.datasets import make_spiral

    X = make_spiral(cfg["n"], random_state=0).X
    n_fits = len(cfg["grid"]["n_neighbors"]) * len(cfg["grid"]["bandwidth"]) * 2
    setups = [("n_jobs=1, 1 torch thread", 1, 1), ("n_jobs=1, 2 torch threads", 1, 2),
              ("n_jobs=2 (joblib's budget per worker)", 2, None)]
    worker_threads = Parallel(n_jobs=2)(delayed(_worker_threads)() for _ in range(2))
    before = torch.get_num_threads()
    records, scores = [], {}
    search(X[:64], dict(cfg, params=dict(max_iter=1, refine_iter=1)), 2)  # start loky
    for rep in range(cfg["repeats"]):
        for label, n_jobs, threads in setups:
            if threads is not None:
                torch.set_num_threads(threads)
                with threadpool_limits(limits=threads):
                    t, s = search(X, cfg, n_jobs)
                torch.set_num_threads(before)
            else:
                t, s = search(X, cfg, n_jobs)
            scores[label] = s
            records.append({"setup": label, "repeat": rep, "wall_s": t["wall"],
                            "parent_cpu_s": t["cpu"]})
            log(f"parallel {label} repeat {rep}: {t['wall']:.1f}s")
    write_csv(os.path.join(out_dir, "parallel_raw.csv"), records)
    med = {label: float(np.median([r["wall_s"] for r in records if r["setup"] == label]))
           for label, _, _ in setups}
    ref = setups[0][0]
    rows = [[label, fmt(med[label]), fmt(med[ref] / med[label]),
             fmt(float(np.max(np.abs(scores[label] - scores[ref]))))]
            for label, _, _ in setups]
    parts = [
        "# Benchmark `parallel`: GridSearchCV(n_jobs=2) against n_jobs=1",
        "",
        f"MAPADensity (`n_components=1`, {cfg['params']}) on {cfg['n']} spiral rows; grid "
        f"{cfg['grid']} x 2-fold CV = {n_fits} fits; wall time of `GridSearchCV.fit`, "
        f"median over {cfg['repeats']} repeats (the setups interleaved). Torch threads "
        f"in each of 2 loky workers: {worker_threads} (joblib's budget, "
        "cpu_count // n_jobs).",
        "",
        *environment_section(env),
        md_table(["setup", "wall (s)", "speed-up vs n_jobs=1, 1 thread",
                  "max abs score difference"], rows),
        "",
    ]
    write_report(out_dir, "parallel", parts)
    return records
