"""Suite ``density``: held-out KL(true || model) on the synthetic sets, and fit cost.

Every estimator is fitted with ``n_components=1`` at its defaults on N train
rows and scored with ``score_samples`` on separate test rows drawn from the
same generator; KL = mean(log p_true(x) - score_samples(x)) over the test
rows (an unbiased estimate of the KL divergence up to sampling noise, so it
can be slightly negative for a near-perfect model).
"""

import copy
import os
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import KernelDensity
from sklearn.preprocessing import StandardScaler

from skmapa.datasets import DATASETS

from ._common import (
    deep_estimator,
    environment_section,
    fmt,
    log,
    md_table,
    mean_loglik,
    median,
    timed,
    total_row_passes,
    values_of,
    write_csv,
)

#: Column order of the tables.
ESTIMATORS = ["MAPA", "VAE", "IWAE", "KDE (CV)", "GMM (CV)"]
DEEP = ["MAPA", "VAE", "IWAE"]
#: Diagnostic run: MAPA's first phase alone (refine_iter=0), same seed.
MAPA_PHASE1 = "MAPA phase 1 only"

FULL = dict(
    n_train=2000,
    n_test=5000,
    seeds=[0, 1, 2],
    deep_params={},  # package defaults
    kde_bandwidths=np.logspace(-3, 0, 31),
    gmm_components=list(range(1, 16)),
    cv_folds=5,
)
QUICK = dict(
    n_train=300,
    n_test=500,
    seeds=[0],
    deep_params={
        "MAPA": dict(max_iter=15, refine_iter=3),
        "VAE": dict(max_iter=15),
        "IWAE": dict(max_iter=15),
    },
    kde_bandwidths=np.logspace(-3, 0, 7),
    gmm_components=list(range(1, 5)),
    cv_folds=3,
)

#: Offset between the seed of a training set and that of its test set.
TEST_SEED_OFFSET = 10_000


class FittedDensity:
    """A baseline chosen by CV, in the data's units: ``score_samples`` and
    ``sample(n, random_state)`` (KernelDensity fitted on standardized rows:
    ``scaler``; GaussianMixture on the rows as they are)."""

    def __init__(self, estimator, scaler=None):
        self.estimator = estimator
        self.scaler = scaler

    def score_samples(self, X):
        if self.scaler is None:
            return self.estimator.score_samples(X)
        log_det = float(np.sum(np.log(self.scaler.scale_)))
        return self.estimator.score_samples(self.scaler.transform(X)) - log_det

    def sample(self, n_samples, random_state=None):
        if isinstance(self.estimator, GaussianMixture):
            # its sample() draws with its own random_state: a shallow copy
            # takes the seed, the fitted estimator is left as it is
            gmm = copy.copy(self.estimator).set_params(random_state=random_state)
            draws = gmm.sample(n_samples)[0]
        else:
            draws = self.estimator.sample(n_samples, random_state=random_state)
        return draws if self.scaler is None else self.scaler.inverse_transform(draws)


def kde_model(X, seed, cfg):
    """KernelDensity on standardized data, bandwidth chosen by k-fold CV:
    ``(FittedDensity, record of the choice)``."""
    scaler = StandardScaler().fit(X)
    search = GridSearchCV(
        KernelDensity(),
        {"bandwidth": cfg["kde_bandwidths"]},
        cv=KFold(cfg["cv_folds"], shuffle=True, random_state=seed),
        scoring=mean_loglik,
    ).fit(scaler.transform(X))
    kde = search.best_estimator_
    return FittedDensity(kde, scaler), {"bandwidth (std. units)": float(kde.bandwidth)}


def gmm_model(X, seed, cfg):
    """GaussianMixture chosen by k-fold CV: ``(FittedDensity, record of the
    choice)``.

    Over ``cfg["gmm_grid"]`` when given, else over the number of components
    ``cfg["gmm_components"]`` with full covariances.
    """
    grid = cfg.get("gmm_grid", {"n_components": cfg.get("gmm_components")})
    search = GridSearchCV(
        GaussianMixture(covariance_type="full", random_state=seed),
        grid,
        cv=KFold(cfg["cv_folds"], shuffle=True, random_state=seed),
        scoring=mean_loglik,
    ).fit(X)
    gmm = search.best_estimator_
    return FittedDensity(gmm), {"gmm components": int(gmm.n_components),
                                "gmm covariance": gmm.covariance_type}


def fit_kde(X, seed, cfg):
    """KernelDensity chosen by CV (``kde_model``): ``(score_samples, record)``."""
    model, chosen = kde_model(X, seed, cfg)
    return model.score_samples, chosen


def fit_gmm(X, seed, cfg):
    """GaussianMixture chosen by CV (``gmm_model``): ``(score_samples, record)``."""
    model, chosen = gmm_model(X, seed, cfg)
    return model.score_samples, chosen


def run_one(name, X, seed, cfg):
    """Fit one estimator; return (score_samples, record of its fit cost)."""
    rec = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if name in DEEP or name == MAPA_PHASE1:
            base = "MAPA" if name == MAPA_PHASE1 else name
            params = dict(cfg["deep_params"].get(base, {}))
            if name == MAPA_PHASE1:
                params["refine_iter"] = 0
            est = deep_estimator(base, seed, n_components=1, **params)
            with timed() as t:
                est.fit(X)
            rec.update(
                row_passes=total_row_passes(est),
                flops=int(est.n_flops_),
                n_iter=int(est.n_iter_),
                converged=bool(est.converged_),
                final_loss=float(est.loss_curve_[-1]) if est.loss_curve_ else None,
            )
            for net, rows in est.n_row_passes_.items():
                rec[f"{net} row_passes"] = int(rows)
            score = est.score_samples
        elif name == "KDE (CV)":
            with timed() as t:
                score, extra = fit_kde(X, seed, cfg)
            rec.update(extra)
        elif name == "GMM (CV)":
            with timed() as t:
                score, extra = fit_gmm(X, seed, cfg)
            rec.update(extra)
        else:
            raise ValueError(name)
    rec["fit_wall_s"] = t["wall"]
    rec["fit_cpu_s"] = t["cpu"]
    return score, rec


def run(cfg, out_dir, env, datasets=None):
    datasets = datasets or list(DATASETS)
    records = []
    names = ESTIMATORS + [MAPA_PHASE1]
    for ds in datasets:
        gen = DATASETS[ds]
        for seed in cfg["seeds"]:
            train = gen(cfg["n_train"], random_state=seed)
            test = gen(cfg["n_test"], random_state=TEST_SEED_OFFSET + seed)
            lp_true = test.log_density(test.X)
            for name in names:
                score, rec = run_one(name, train.X, seed, cfg)
                with timed() as t:
                    lp = score(test.X)
                kl = float(np.mean(lp_true - lp))
                records.append(
                    {
                        "dataset": ds,
                        "seed": seed,
                        "estimator": name,
                        "kl": kl,
                        "score_wall_s": t["wall"],
                        **rec,
                    }
                )
                log(
                    f"density {ds} seed={seed} {name}: KL={kl:.4f} "
                    f"fit={rec['fit_wall_s']:.1f}s (cpu {rec['fit_cpu_s']:.1f}s) "
                    f"passes={rec.get('row_passes', '-')} n_iter={rec.get('n_iter', '-')}"
                )
            # partial results survive an interrupted run
            write_csv(os.path.join(out_dir, "density_raw.csv"), records)
    write_report(records, cfg, out_dir, env, datasets)
    return records


def write_report(records, cfg, out_dir, env, datasets):
    seeds = cfg["seeds"]
    agg = "median over seeds" if len(seeds) > 1 else "one seed"
    parts = [
        "# Benchmark `density`: held-out KL to the true density",
        "",
        f"Train N={cfg['n_train']}, test N={cfg['n_test']} (test seed = "
        f"{TEST_SEED_OFFSET} + seed), seeds {seeds} for data and estimator; "
        f"every figure is the {agg}. All estimators have `n_components=1` (deep) "
        "at package defaults"
        + (f" except {cfg['deep_params']}" if cfg["deep_params"] else "")
        + f". KDE: bandwidth on standardized data from {len(cfg['kde_bandwidths'])} "
        f"log-spaced values in [{cfg['kde_bandwidths'][0]:g}, {cfg['kde_bandwidths'][-1]:g}] "
        f"by {cfg['cv_folds']}-fold CV; GMM: `covariance_type='full'`, n_components in "
        f"{cfg['gmm_components'][0]}..{cfg['gmm_components'][-1]} by {cfg['cv_folds']}-fold CV; "
        "CV scores are mean `score_samples`. KL = mean(log p_true(x) - score_samples(x)) "
        "on the test rows (nats; lower is better; sampling noise can make it "
        "slightly negative).",
        "",
        *environment_section(env),
        f"## Held-out KL (nats), {agg}" + (" [min, max]" if len(seeds) > 1 else ""),
        "",
    ]
    rows = []
    for ds in datasets:
        meds = {n: median(values_of(records, ds, n, "kl")) for n in ESTIMATORS}
        best = min(meds, key=lambda n: meds[n])
        row = [ds]
        for n in ESTIMATORS:
            vals = values_of(records, ds, n, "kl")
            cell = fmt(meds[n])
            if len(vals) > 1:
                cell += f" [{fmt(min(vals))}, {fmt(max(vals))}]"
            row.append(f"**{cell}**" if n == best else cell)
        rows.append(row)
    parts += [md_table(["data set"] + ESTIMATORS, rows), ""]

    parts += [
        f"## Fit wall time (s), {agg}",
        "",
        "KDE and GMM times include their cross-validated model selection "
        "(fits over the whole grid x folds, then the refit).",
        "",
    ]
    rows = [
        [ds] + [fmt(median(values_of(records, ds, n, "fit_wall_s"))) for n in ESTIMATORS]
        for ds in datasets
    ]
    parts += [md_table(["data set"] + ESTIMATORS, rows), ""]

    parts += [
        f"## Training cost of the deep estimators, {agg}",
        "",
        "Row-passes: rows pushed forward through every network during `fit` "
        "(`n_row_passes_`, summed over networks), in millions; GFLOP: forward FLOPs "
        "(`n_flops_`). Ratios are per seed (same run), then the median.",
        "",
    ]
    rows = []
    for ds in datasets:
        row = [ds]
        for n in DEEP:
            row.append(fmt(median(values_of(records, ds, n, "row_passes")) / 1e6))
        for n in DEEP:
            row.append(fmt(median(values_of(records, ds, n, "flops")) / 1e9))
        for num, key in (("IWAE", "row_passes"), ("VAE", "row_passes"),
                         ("IWAE", "flops"), ("IWAE", "fit_cpu_s")):
            ratios = [
                a / b
                for a, b in zip(values_of(records, ds, num, key),
                                values_of(records, ds, "MAPA", key))
                if a is not None and b
            ]
            row.append(fmt(median(ratios)))
        rows.append(row)
    parts += [
        md_table(
            ["data set", "MAPA Mrows", "VAE Mrows", "IWAE Mrows", "MAPA GFLOP",
             "VAE GFLOP", "IWAE GFLOP", "IWAE/MAPA rows", "VAE/MAPA rows",
             "IWAE/MAPA FLOPs", "IWAE/MAPA CPU time"],
            rows,
        ),
        "",
    ]

    parts += [
        "## Diagnostics",
        "",
        "Epochs run (`n_iter_`; for MAPA phase 1 + phase 2, phase 1 being the "
        "epochs of the same-seed `refine_iter=0` run, whose training is identical "
        "up to the end of phase 1) and the fraction of seeds that converged "
        "(stopped by `tol` before `max_iter`); KL of MAPA's phase 1 alone; the "
        "KDE bandwidth and GMM size chosen by CV (medians).",
        "",
    ]
    rows = []
    for ds in datasets:
        p1 = median(values_of(records, ds, MAPA_PHASE1, "n_iter"))
        tot = median(values_of(records, ds, "MAPA", "n_iter"))
        row = [ds, f"{fmt(p1)} + {fmt(tot - p1)}"]
        for n in DEEP:
            conv = values_of(records, ds, n, "converged")
            if n != "MAPA":
                row.append(fmt(median(values_of(records, ds, n, "n_iter"))))
            row.append(f"{sum(bool(c) for c in conv)}/{len(conv)}")
        row.append(fmt(median(values_of(records, ds, MAPA_PHASE1, "kl"))))
        row.append(fmt(median(values_of(records, ds, MAPA_PHASE1, "fit_wall_s"))))
        row.append(fmt(median(values_of(records, ds, "KDE (CV)", "bandwidth (std. units)"))))
        row.append(fmt(median(values_of(records, ds, "GMM (CV)", "gmm components"))))
        rows.append(row)
    parts += [
        md_table(
            ["data set", "MAPA epochs (ph.1 + ph.2)", "MAPA conv.", "VAE epochs",
             "VAE conv.", "IWAE epochs", "IWAE conv.", "MAPA ph.1-only KL",
             "MAPA ph.1-only fit (s)", "KDE bandwidth", "GMM components"],
            rows,
        ),
        "",
        "Per-seed values: `density_raw.csv`.",
        "",
    ]
    with open(os.path.join(out_dir, "density.md"), "w") as fh:
        fh.write("\n".join(parts))
