"""Suite ``digits``: held-out log-likelihood on real 64-D data, 5-fold CV.

``sklearn.datasets.load_digits`` (1797 images of 8 x 8 integer pixels in
0..16), no download. The integer pixels are *uniformly dequantised* once,
with a fixed seed, before any split: ``u = (pixels + U[0, 1)) / 17`` lies in
``[0, 1)^64``, and every estimator models the density of ``u``. For a
density ``p`` of ``u``, ``E_U[log p(u)] - 64 log 17`` is a lower bound on
the log-probability of the integer image (Theis, van den Oord & Bethge,
2016), so the table also gives bits per pixel of the integer data,
``-(LL - 64 log 17) / (64 log 2)``.

Estimators: MAPADensity, VAEDensity and IWAEDensity (``n_components=8``,
package defaults otherwise; ``score_samples`` by importance sampling),
KernelDensity (bandwidth by an inner 3-fold CV on standardized pixels) and
GaussianMixture (number of components and covariance type by an inner 3-fold
CV). MAPA variants probe its distance kernel in 64-D: the bandwidth halved
quartered and doubled around its 'auto' value, and more neighbours.

Per held-out row MAPA's posterior q(m | x) over its ``n_neighbors`` atoms is
summarised by its effective number of atoms ``exp(H(q))`` and by the ratio
of the nearest to the k-th neighbour distance (near 1: distances
concentrate, the kernel cannot tell neighbours apart).
"""

import math
import os
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

from ._common import (
    deep_estimator,
    environment_section,
    fmt,
    log,
    md_table,
    mean_sd,
    timed,
    total_row_passes,
    write_csv,
)
from .density import fit_gmm, fit_kde

LOG17 = math.log(17.0)
N_PIXELS = 64

FULL = dict(
    folds=5,
    n_rows=None,  # all 1797
    n_components=8,
    deep_params={},
    mapa_variants={
        "MAPA bandwidth x0.5": dict(bandwidth_factor=0.5),
        "MAPA bandwidth x0.25": dict(bandwidth_factor=0.25),
        "MAPA bandwidth x2": dict(bandwidth_factor=2.0),
        "MAPA k=50": dict(n_neighbors=50),
        "MAPA input-unit neighbours": dict(input_unit_neighbours=True),
    },
    kde_bandwidths=np.logspace(-1, 1, 21),
    gmm_grid={"n_components": [1, 2, 4, 8, 16, 32], "covariance_type": ["full", "diag"]},
    inner_folds=3,
    jobs=1,  # the scale suite runs beside it on the other core
)
QUICK = dict(
    folds=2,
    n_rows=400,
    n_components=4,
    deep_params={"MAPA": dict(max_iter=10, refine_iter=2), "VAE": dict(max_iter=10),
                 "IWAE": dict(max_iter=10)},
    mapa_variants={"MAPA bandwidth x2": dict(bandwidth_factor=2.0),
                   "MAPA input-unit neighbours": dict(input_unit_neighbours=True)},
    kde_bandwidths=np.logspace(-1, 1, 5),
    gmm_grid={"n_components": [1, 2], "covariance_type": ["diag"]},
    inner_folds=2,
    jobs=2,
)
DEEP = ["MAPA", "VAE", "IWAE"]


class _ScaledIndex:
    """A k-NN index over ``X * weights`` that scales its queries the same way."""

    def __init__(self, weights):
        self.weights = weights

    def fit(self, X):
        from sklearn.neighbors import NearestNeighbors

        self.index = NearestNeighbors().fit(X * self.weights)
        return self

    def kneighbors(self, X, n_neighbors):
        return self.index.kneighbors(X * self.weights, n_neighbors=n_neighbors)


def _input_unit_mapa():
    """An experiment, not a feature: MAPADensity whose neighbours (and MAPA
    weights) use distances in the input units (up to one overall scale)
    instead of the standardized ones; everything else is unchanged."""
    from skmapa import MAPADensity, _mapa

    class InputUnitMAPA(MAPADensity):
        def _set_atoms(self, data, generator, codes=None):
            weights = self.scale_ / np.sqrt(np.mean(self.scale_**2))
            fit_neighbors = _mapa.fit_neighbors
            _mapa.fit_neighbors = lambda X: _ScaledIndex(weights).fit(X)
            try:
                super()._set_atoms(data, generator, codes)
            finally:
                _mapa.fit_neighbors = fit_neighbors

    return InputUnitMAPA


def neighbour_purity(X, labels, k=20):
    """Fraction of each row's k nearest rows with its label; nearest/k-th distance."""
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    return (float(np.mean(labels[idx[:, 1:]] == labels[:, None])),
            float(np.median(dist[:, 1] / dist[:, -1])))


def dequantised_digits(n_rows=None, seed=0):
    """Digits pixels with uniform dequantisation, scaled to ``[0, 1)``."""
    pixels = load_digits().data
    if n_rows is not None:
        pixels = pixels[:n_rows]
    rng = np.random.RandomState(seed)
    return (pixels + rng.uniform(size=pixels.shape)) / 17.0


def bits_per_pixel(loglik):
    """Bits per integer pixel implied by a log-likelihood of dequantised ``u``."""
    return -(loglik - N_PIXELS * LOG17) / (N_PIXELS * math.log(2.0))


def mapa_kernel_summary(est, X):
    """Effective atoms exp(H(q)) and nearest/k-th distance ratio, medians over rows."""
    from skmapa import _mapa

    Xs = est._standardize(X).double().cpu().numpy()
    dist, idx = _mapa.kneighbors(est.neighbors_, Xs, est.n_neighbors_)
    log_q = _mapa.mapa_log_weights(dist, idx, est.bandwidth_, est.atom_log_prior_)
    entropy = -(np.exp(log_q) * log_q).sum(1)
    return {
        "effective_atoms": float(np.median(np.exp(entropy))),
        "nearest_over_kth": float(np.median(dist[:, 0] / dist[:, -1])),
        "bandwidth": float(est.bandwidth_),
    }


def fit_one(name, X_train, fold, cfg, params=None):
    """Fit one estimator on a fold: (score_samples callable, record)."""
    import torch

    torch.set_num_threads(1)
    rec = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if name in DEEP or name.startswith("MAPA"):
            base = "MAPA" if name.startswith("MAPA") else name
            p = dict(cfg["deep_params"].get(base, {}), **(params or {}))
            if p.pop("input_unit_neighbours", False):
                est = _input_unit_mapa()(n_components=cfg["n_components"],
                                         random_state=fold, device="cpu", **p)
            else:
                est = deep_estimator(base, fold, n_components=cfg["n_components"], **p)
            with timed() as t:
                est.fit(X_train)
            rec.update(row_passes=total_row_passes(est), n_iter=int(est.n_iter_),
                       converged=bool(est.converged_),
                       noise_scale=float(np.mean(est.noise_scale_)))
            score = est.score_samples
            if base == "MAPA":
                rec["_estimator"] = est
        elif name in ("KDE (CV)", "GMM (CV)"):
            inner = dict(cfg, cv_folds=cfg["inner_folds"])
            fit = fit_kde if name == "KDE (CV)" else fit_gmm
            with timed() as t:
                score, chosen = fit(X_train, fold, inner)
            rec["chosen"] = ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}"
                                      for k, v in chosen.items())
        else:
            raise ValueError(name)
    rec["fit_wall_s"] = t["wall"]
    return score, rec


def run_fold(fold, train, test, X, cfg):
    """Every estimator (and MAPA's variants) on one fold."""
    X_train, X_test = X[train], X[test]
    records = []

    def record(name, score, rec):
        est = rec.pop("_estimator", None)
        lp = score(X_test)
        out = {"fold": fold, "estimator": name, "heldout_ll": float(np.mean(lp)),
               "train_ll": float(np.mean(score(X_train))),
               "finite": bool(np.all(np.isfinite(lp))), **rec}
        if est is not None:
            out.update(mapa_kernel_summary(est, X_test))
        records.append(out)
        log(f"digits fold={fold} {name}: held-out LL={out['heldout_ll']:.2f} "
            f"fit={rec['fit_wall_s']:.1f}s")
        return est

    mapa = None
    for name in DEEP + ["KDE (CV)", "GMM (CV)"]:
        est = record(name, *fit_one(name, X_train, fold, cfg))
        mapa = est if name == "MAPA" else mapa
    for name, variant in cfg["mapa_variants"].items():
        params = dict(variant)
        factor = params.pop("bandwidth_factor", None)
        if factor is not None:
            params["bandwidth"] = factor * mapa.bandwidth_
        record(name, *fit_one(name, X_train, fold, cfg, params))
    return records


def run(cfg, out_dir, env, datasets=None):
    from joblib import Parallel, delayed

    X = dequantised_digits(cfg["n_rows"])
    splits = KFold(cfg["folds"], shuffle=True, random_state=0).split(X)
    per_fold = Parallel(n_jobs=cfg["jobs"])(
        delayed(run_fold)(fold, train, test, X, cfg)
        for fold, (train, test) in enumerate(splits)
    )
    records = [r for recs in per_fold for r in recs]
    write_csv(os.path.join(out_dir, "digits_raw.csv"), records)
    labels = load_digits().target[: X.shape[0]]
    purity = {"standardized (MAPA's space)": neighbour_purity(StandardScaler().fit_transform(X),
                                                             labels),
              "input units": neighbour_purity(X, labels)}
    write_report(records, cfg, out_dir, env, X.shape, purity)
    return records


def write_report(records, cfg, out_dir, env, shape, purity):
    names = list(dict.fromkeys(r["estimator"] for r in records))
    by = {n: [r for r in records if r["estimator"] == n] for n in names}
    best = max(names, key=lambda n: np.mean([r["heldout_ll"] for r in by[n]]))
    rows = []
    for n in names:
        rs = by[n]
        ll = [r["heldout_ll"] for r in rs]
        rows.append([
            n, mean_sd(ll, 2), mean_sd([r["train_ll"] for r in rs], 2),
            f"{bits_per_pixel(np.mean(ll)):.3f}",
            fmt(np.mean(ll) - np.mean([r["heldout_ll"] for r in by[best]])),
            fmt(float(np.median([r["fit_wall_s"] for r in rs]))),
            fmt(float(np.median([r["row_passes"] for r in rs]))) if "row_passes" in rs[0]
            else "-",
            "; ".join(dict.fromkeys(r["chosen"] for r in rs)) if "chosen" in rs[0] else "-",
        ])
    kernel_rows = [
        [n, fmt(float(np.median([r["bandwidth"] for r in by[n]]))),
         fmt(float(np.median([r["effective_atoms"] for r in by[n]]))),
         fmt(float(np.median([r["nearest_over_kth"] for r in by[n]]))),
         fmt(float(np.median([r["noise_scale"] for r in by[n]])))]
        for n in names if "effective_atoms" in by[n][0]
    ]
    parts = [
        "# Benchmark `digits`: held-out log-likelihood on 64-D real data",
        "",
        f"`sklearn.datasets.load_digits`, {shape[0]} images x {shape[1]} pixels, uniformly "
        "dequantised once (fixed seed) and scaled to [0, 1): u = (pixel + U[0, 1)) / 17. "
        f"{cfg['folds']}-fold CV (shuffled, seed 0); mean ± sd over the folds. "
        f"Deep estimators: `n_components={cfg['n_components']}`, package defaults "
        f"otherwise, `score_samples` by importance sampling (1024 draws). KDE: bandwidth "
        f"by inner {cfg['inner_folds']}-fold CV on standardized pixels; GMM: components "
        f"and covariance type by inner {cfg['inner_folds']}-fold CV over {cfg['gmm_grid']}.",
        "",
        "LL: nats per image of u (higher is better). Bits per pixel: the lower bound "
        "on the integer pixels' log-probability that LL implies, "
        "-(LL - 64 log 17) / (64 log 2) (lower is better). 'vs best': mean held-out LL "
        "minus that of the best row.",
        "",
        *environment_section(env),
        md_table(["estimator", "held-out LL", "train LL", "bits/pixel", "vs best",
                  "fit wall (s, median)", "row-passes (median)", "chosen by CV"], rows,
                 align=["---"] + ["--:"] * 6 + ["---"]),
        "",
        "## MAPA's kernel in 64-D",
        "",
        "Medians over folds of the per-row medians on held-out rows: the bandwidth "
        "(standardized units), the effective number of atoms exp(H(q)) of the MAPA "
        "posterior over the k neighbours, the ratio of the nearest to the k-th "
        "neighbour distance, and the fitted noise scale `noise_scale_` (mean over "
        "pixels, in u's units).",
        "",
        md_table(["MAPA run", "bandwidth", "effective atoms", "nearest / k-th distance",
                  "fitted noise"], kernel_rows),
        "",
        "'input-unit neighbours' is an experiment (`_input_unit_mapa` in this module): "
        "MAPA's neighbours and weights from distances in the input units instead of "
        "the standardized ones. Data alone, on all rows: the fraction of a row's 20 "
        "nearest rows that show the same digit, and the nearest / 20th distance.",
        "",
        md_table(["distances in", "same digit among 20-NN", "nearest / 20th distance"],
                 [[k, f"{v[0]:.3f}", f"{v[1]:.3f}"] for k, v in purity.items()]),
        "",
        "Raw values: `digits_raw.csv`.",
        "",
    ]
    with open(os.path.join(out_dir, "digits.md"), "w") as fh:
        fh.write("\n".join(parts))
