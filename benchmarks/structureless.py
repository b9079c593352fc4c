"""Suite ``structureless``: data a linear model describes as well as any.

Gaussian noise in 10-D (160, 1000 and 2000 training rows),
``make_gaussian_quantiles`` (10-D, 1000 rows), ``make_classification`` (50
features, 5 informative, 1000 rows) and ``make_friedman1`` (10-D uniform,
2000 rows): no low-dimensional structure for a deep latent model to find,
so probabilistic PCA with the same ``n_components`` (2) is the bar every
estimator must reach. 2000 test rows from the same call, standardized on
the training rows. MAPA, VAE and IWAE at the package defaults but
``n_components``. Reported: held-out nats per standardized row, each
estimator minus PPCA, whether rows were held out and whether the fit fell
back to the linear model (``linear_fallback_``).
"""

import os
import warnings

import numpy as np
from sklearn.datasets import make_classification, make_friedman1, make_gaussian_quantiles
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

from ._common import (deep_estimator, environment_section, fmt, log, md_table, write_csv,
                      write_report)


def _gaussian(n, seed):
    return np.random.RandomState(seed).standard_normal((n, 10))


#: name: generator(n_rows, seed) of the rows
GENERATORS = {
    "gaussian": _gaussian,
    "gaussian_quantiles": lambda n, s: make_gaussian_quantiles(n_samples=n, n_features=10,
                                                               random_state=s)[0],
    "classification": lambda n, s: make_classification(n, 50, n_informative=5,
                                                       random_state=s)[0],
    "friedman1": lambda n, s: make_friedman1(n, random_state=s)[0],
}
FULL = dict(sets=[("gaussian", 160), ("gaussian", 1000), ("gaussian", 2000),
                  ("gaussian_quantiles", 1000), ("classification", 1000),
                  ("friedman1", 2000)],
            seeds=(0, 1, 2), n_test=2000, n_components=2)
QUICK = dict(sets=[("gaussian", 160)], seeds=(0,), n_test=500, n_components=2)
NAMES = ("MAPA", "VAE", "IWAE")


def split(name, n_train, n_test, seed):
    """Standardized training and test rows (one generator call, shuffled)."""
    X = GENERATORS[name](n_train + n_test, seed)
    X = X[np.random.RandomState(seed).permutation(len(X))]
    scaler = StandardScaler().fit(X[:n_train])
    return scaler.transform(X[:n_train]), scaler.transform(X[n_train:])


def run(cfg, out_dir, env, datasets=None):
    d = cfg["n_components"]
    records = []
    for name, n_train in cfg["sets"]:
        if datasets and name not in datasets:
            continue
        for seed in cfg["seeds"]:
            train, test = split(name, n_train, cfg["n_test"], seed)
            rec = {"set": name, "n_train": n_train, "n_features": train.shape[1],
                   "seed": seed, "PPCA": float(PCA(d).fit(train).score(test))}
            for est_name in NAMES:
                est = deep_estimator(est_name, seed, n_components=d)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    est.fit(train)
                rec[est_name] = float(est.score(test))
                rec[f"{est_name} held out"] = est.n_held_out_ > 0
                rec[f"{est_name} fallback"] = bool(est.linear_fallback_)
            records.append(rec)
            log(f"structureless {name} n={n_train} seed {seed}: "
                + ", ".join(f"{k} {rec[k]:.4f}" for k in ("PPCA",) + NAMES))
    write_csv(os.path.join(out_dir, "structureless_raw.csv"), records)

    def flags(r, est_name):
        return ("held out" if r[f"{est_name} held out"] else "-") + (
            ", linear" if r[f"{est_name} fallback"] else "")

    rows = [[r["set"], r["n_features"], r["n_train"], r["seed"], f"{r['PPCA']:.3f}",
             *(fmt(r[n] - r["PPCA"]) for n in NAMES), *(flags(r, n) for n in NAMES)]
            for r in records]
    below = {n: sum(r[n] < r["PPCA"] - 0.005 for r in records) for n in NAMES}
    parts = [
        "# Benchmark `structureless`: data without low-dimensional structure",
        "",
        "Training rows and 2000 test rows from one call of each generator, shuffled and "
        "standardized on the training rows; Gaussian noise and "
        "`make_gaussian_quantiles` / `make_friedman1` in 10-D, `make_classification` with "
        "50 features (5 informative). Package defaults but `n_components=2`; IWAE with "
        "k=10. PPCA: `PCA(2).score` (held-out nats per standardized row); the estimator "
        "columns are each estimator's held-out log-likelihood minus PPCA's (negative: "
        "below the linear model). Flags: rows held out of training (`n_held_out_`: early "
        "stopping's, or the estimator's own on data without a low-dimensional structure), "
        "and 'linear' where the fit fell back to probabilistic PCA (`linear_fallback_`).",
        "",
        *environment_section(env),
        md_table(["set", "features", "rows", "seed", "PPCA", "MAPA - PPCA", "VAE - PPCA",
                  "IWAE - PPCA", "MAPA", "VAE", "IWAE"], rows),
        "",
        "Fits more than 0.005 nats per row below PPCA: "
        + ", ".join(f"{n} {below[n]} of {len(records)}" for n in NAMES) + ".",
        "",
    ]
    write_report(out_dir, "structureless", parts)
    return records
