"""Suite ``overfit``: training and held-out curves on a small real table.

``sklearn.datasets.load_wine`` (178 rows x 13 features, standardized on the
training rows), a fixed 80/20 split: 142 training rows, the small-table case
where long training overfits. For ``n_components`` 2 and 8, each of MAPA,
VAE and IWAE is fitted at the package defaults with ``early_stopping=True``
(the default 'auto' already turns it on for VAE and IWAE at this size; MAPA
gets it here so that its validation curve is recorded) and with
``early_stopping=False``. Reported: held-out log-likelihood (nats per
standardized row) against probabilistic PCA at the same ``n_components``,
training log-likelihood, and a plot of the training bound and the
validation bound per 50-step round (``loss_curve_`` and
``validation_scores_``) of the early-stopping fits, the model kept marked.
"""

import os
import warnings

import numpy as np
from sklearn.datasets import load_wine
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

from ._common import (deep_estimator, environment_section, fmt, log, md_table, write_csv,
                      write_report)

FULL = dict(n_components=(2, 8), seed=0)
QUICK = dict(n_components=(2,), seed=0)
NAMES = ("MAPA", "VAE", "IWAE")


def _table(seed):
    X = load_wine().data
    perm = np.random.RandomState(seed).permutation(len(X))
    X = X[perm]
    n = int(0.8 * len(X))
    scaler = StandardScaler().fit(X[:n])
    return scaler.transform(X[:n]), scaler.transform(X[n:])


def run(cfg, out_dir, env, datasets=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X_train, X_test = _table(cfg["seed"])
    records, curves = [], {}
    for d in cfg["n_components"]:
        ppca = PCA(d).fit(X_train).score(X_test)
        for name in NAMES:
            for stopping in (True, False):
                est = deep_estimator(name, cfg["seed"], n_components=d,
                                     early_stopping=stopping)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    est.fit(X_train)
                rec = {"n_components": d, "estimator": name, "early_stopping": stopping,
                       "held_out": est.score(X_test), "train": est.score(X_train),
                       "ppca_held_out": ppca, "steps": est.n_steps_}
                records.append(rec)
                log(f"overfit d={d} {name} es={stopping}: held-out {rec['held_out']:.2f} "
                    f"(PPCA {ppca:.2f}), train {rec['train']:.2f}")
                if stopping:
                    curves[(d, name)] = (list(est.loss_curve_), list(est.validation_scores_))
    write_csv(os.path.join(out_dir, "overfit_raw.csv"), records)

    fig, axes = plt.subplots(len(cfg["n_components"]), len(NAMES), squeeze=False,
                             figsize=(4 * len(NAMES), 3.2 * len(cfg["n_components"])))
    for i, d in enumerate(cfg["n_components"]):
        for j, name in enumerate(NAMES):
            ax = axes[i, j]
            train, val = curves[(d, name)]
            steps = 50 * np.arange(1, len(train) + 1)
            ax.plot(steps, -np.asarray(train), label="training bound")
            ax.plot(steps[:len(val)], val, label="validation bound")
            ax.axvline(50 * (int(np.argmax(val)) + 1), color="grey", ls=":",
                       label="model kept")
            ax.set_title(f"{name}, n_components={d}")
            ax.set_xlabel("optimizer steps (last run)")
            ax.set_ylabel("nats per row")
            lo = np.percentile(np.r_[-np.asarray(train), val], 5)
            ax.set_ylim(lo, None)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "overfit_curves.png"), dpi=90)
    plt.close(fig)

    rows = [[r["n_components"], r["estimator"], str(r["early_stopping"]), fmt(r["held_out"]),
             fmt(r["ppca_held_out"]), fmt(r["held_out"] - r["ppca_held_out"]), fmt(r["train"]),
             r["steps"]] for r in records]
    parts = [
        "# Benchmark `overfit`: training and held-out curves on a small real table",
        "",
        "`load_wine`, 142 training and 36 held-out rows (standardized on the training "
        "rows), package defaults but `n_components` and `early_stopping`. Log-likelihoods "
        "in nats per standardized row; PPCA = `PCA(n_components).score` on the same split. "
        "Curves: `overfit_curves.png` (training and validation bound per 50-step round of "
        "the early-stopping fits; for VAE and IWAE the run from the start that was kept).",
        "",
        *environment_section(env),
        md_table(["n_components", "estimator", "early_stopping", "held-out", "PPCA",
                  "held-out - PPCA", "train", "steps (all runs)"], rows),
        "",
    ]
    write_report(out_dir, "overfit", parts)
    return records
