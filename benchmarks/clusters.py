"""Suite ``clusters``: few rows of Gaussian clusters in many dimensions.

``sklearn.datasets.make_blobs`` with three centres (standard deviation 1,
so the density is known exactly), ``n_features`` 10, 20 and 50, 150
training rows (and 300 in 50-D) and 2000 test rows from one call,
standardized on the training rows. The neighbour graph falls apart into
the clusters, and within each the rows are isotropic noise: no
low-dimensional structure for a deep model to find, few rows per
dimension. MAPA, VAE and IWAE at the package defaults but
``n_components``, against probabilistic PCA. Reported: held-out KL to the
true density (nats per standardized row), which of MAPA's checks held rows
out (``validation_scores_``) and where its second phase started.
"""

import os
import warnings

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

from ._common import (deep_estimator, environment_section, fmt, log, md_table, write_csv,
                      write_report)

#: (n_features, training rows, n_components) per configuration.
FULL = dict(configs=[(10, 150, 1), (10, 150, 2), (10, 150, 4), (20, 150, 1), (20, 150, 2),
                     (20, 150, 4), (50, 150, 1), (50, 150, 2), (50, 150, 4), (50, 300, 2)],
            seeds=(0, 1), n_test=2000)
QUICK = dict(configs=[(20, 150, 2)], seeds=(0,), n_test=500)
NAMES = ("MAPA", "VAE", "IWAE")


def split(n_features, n_train, n_test, seed):
    """Standardized training and test rows and the test rows' exact log
    density in standardized units."""
    X, _, centers = make_blobs(n_train + n_test, n_features=n_features, centers=3,
                               random_state=seed, return_centers=True)
    perm = np.random.RandomState(seed).permutation(len(X))
    X = X[perm]
    scaler = StandardScaler().fit(X[:n_train])
    test = X[n_train:]
    # make_blobs splits the rows evenly over the centres (up to one row)
    log_density = logsumexp([norm.logpdf(test - c).sum(1) for c in centers], axis=0) - np.log(3)
    log_density += np.log(scaler.scale_).sum()
    return scaler.transform(X[:n_train]), scaler.transform(test), log_density


def run(cfg, out_dir, env, datasets=None):
    records = []
    for n_features, n_train, d in cfg["configs"]:
        for seed in cfg["seeds"]:
            train, test, truth = split(n_features, n_train, cfg["n_test"], seed)
            rec = {"n_features": n_features, "n_train": n_train, "n_components": d,
                   "seed": seed, "PPCA": float(np.mean(truth - PCA(d).fit(train)
                                                       .score_samples(test)))}
            for name in NAMES:
                est = deep_estimator(name, seed, n_components=d)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    est.fit(train)
                rec[name] = float(np.mean(truth - est.score_samples(test)))
                if name == "MAPA":
                    rec["MAPA held out"] = est.validation_scores_ is not None
                    rec["MAPA start"] = est.refine_start_
                    rec["MAPA pieces"] = est.n_graph_components_
            records.append(rec)
            log(f"clusters D={n_features} n={n_train} d={d} seed {seed}: "
                + ", ".join(f"{k} {rec[k]:.3f}" for k in ("PPCA",) + NAMES))
    write_csv(os.path.join(out_dir, "clusters_raw.csv"), records)

    rows = []
    for r in records:
        best = min(r["VAE"], r["IWAE"])
        rows.append([r["n_features"], r["n_train"], r["n_components"], r["seed"],
                     fmt(r["MAPA"]), fmt(r["VAE"]), fmt(r["IWAE"]), fmt(r["PPCA"]),
                     fmt(r["MAPA"] - best), r["MAPA pieces"], str(r["MAPA held out"]),
                     r["MAPA start"]])
    parts = [
        "# Benchmark `clusters`: few rows of Gaussian clusters in many dimensions",
        "",
        "`make_blobs`, three centres (standard deviation 1), training rows and 2000 test "
        "rows from one call, standardized on the training rows. Held-out KL to the exact "
        "density (nats per standardized row; lower is better). Package defaults but "
        "`n_components` (n); IWAE with k=10; PPCA = probabilistic PCA "
        "(`PCA(n).score_samples`). MAPA - best deep: MAPA's KL minus the lower of "
        "VAE's and IWAE's (negative: MAPA ahead). pieces: connected components of MAPA's "
        "neighbour graph; held out: rows held out of both phases by the linear check.",
        "",
        *environment_section(env),
        md_table(["D", "rows", "n", "seed", "MAPA", "VAE", "IWAE", "PPCA",
                  "MAPA - best deep", "pieces", "held out", "MAPA start"], rows),
        "",
    ]
    write_report(out_dir, "clusters", parts)
    return records
