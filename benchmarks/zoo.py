"""Suite ``zoo``: every kind of data set the estimators should handle.

Sets (``SETS``): scikit-learn's ``make_moons`` (noise 0.1), ``make_circles``
(noise 0.05, factor 0.5), ``make_blobs`` with unequal spreads (3 centres,
``cluster_std=[0.5, 1.5, 1.0]``), ``make_s_curve`` and ``make_swiss_roll``
(3-D, noise 0.1 and 0.5); the five synthetic sets of ``skmapa.datasets``;
curves and surfaces in 10-50 dimensions (``make_manifold``); iris and the
dequantised digits (``benchmarks.digits.dequantised_digits``).

Generators draw ``n_train + n_test`` rows in one call (seed = the seed of the
run) and split them; iris and digits are split 80/20 (shuffled by the seed).
scikit-learn and real sets are standardized by a StandardScaler fitted on
the training rows (log-likelihoods are per standardized row); the skmapa
sets are used as they are, so that their exact log density gives the
held-out KL = mean(log p_true(x) - score_samples(x)) on the test rows.

Estimators: MAPADensity, VAEDensity and IWAEDensity at package defaults
(``benchmarks._common.deep_estimator``) except ``n_components`` = the
intrinsic dimension where known, 2 else; KernelDensity and GaussianMixture
chosen by CV (``benchmarks.density.kde_model`` and ``gmm_model``).

The report's two galleries (first seed): each estimator's density on a grid
next to the training rows of the 2-D sets (``GALLERY``), and as many rows
drawn from each estimator as there are training rows for every other set
(one feature: histograms, with the true density where it is known; more:
the first two principal components of the training rows).
"""

import os
import warnings

import numpy as np
from sklearn import datasets as skd
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from skmapa.datasets import DATASETS, make_manifold

from ._common import (
    deep_estimator,
    environment_section,
    fmt,
    log,
    md_table,
    median,
    setup_threads,
    timed,
    total_row_passes,
    values_of,
    write_csv,
)
from .density import gmm_model, kde_model
from .digits import dequantised_digits

DEEP = ["MAPA", "VAE", "IWAE"]
BASELINES = ["KDE (CV)", "GMM (CV)"]
ESTIMATORS = DEEP + BASELINES


def _sklearn(maker, **kwargs):
    def load(n, seed):
        return maker(n_samples=n, random_state=seed, **kwargs)[0]
    return load


def _skmapa(name):
    def load(n, seed):
        data = DATASETS[name](n, random_state=seed)
        return data.X, data.log_density
    return load


def _manifold(n_latent, n_features):
    def load(n, seed):
        data = make_manifold(n, n_latent=n_latent, n_features=n_features,
                             random_state=seed)
        return data.X, data.log_density
    return load


def _table(loader):
    def load(n, seed):
        return loader()
    return load


#: name -> (loader(n, seed), n_components, kind). Kinds: "sklearn" (standardized,
#: no true density), "skmapa" (exact log density), "real" (fixed table, 80/20).
SETS = {
    "moons": (_sklearn(skd.make_moons, noise=0.1), 1, "sklearn"),
    "circles": (_sklearn(skd.make_circles, noise=0.05, factor=0.5), 1, "sklearn"),
    "blobs": (_sklearn(skd.make_blobs, centers=3, cluster_std=[0.5, 1.5, 1.0]), 2,
              "sklearn"),
    "s_curve": (_sklearn(skd.make_s_curve, noise=0.1), 2, "sklearn"),
    "swiss_roll": (_sklearn(skd.make_swiss_roll, noise=0.5), 2, "sklearn"),
    **{name: (_skmapa(name), 1, "skmapa") for name in DATASETS},
    "manifold d1 D10": (_manifold(1, 10), 1, "skmapa"),
    "manifold d2 D10": (_manifold(2, 10), 2, "skmapa"),
    "manifold d1 D50": (_manifold(1, 50), 1, "skmapa"),
    "manifold d2 D30": (_manifold(2, 30), 2, "skmapa"),
    "iris": (_table(lambda: skd.load_iris().data), 2, "real"),
    "digits": (_table(dequantised_digits), 2, "real"),
}
#: The 2-D sets drawn in the gallery.
GALLERY = ["moons", "circles", "blobs", "absolute_value", "circle", "spiral", "two_clusters"]

FULL = dict(
    sets=list(SETS),
    n_train=1000,
    n_test=2000,
    test_fraction=0.2,
    # seven seeds: single-seed gaps between MAPA and the IWAE of 0.001-0.02
    # nats changed sign from one seed to the next, and with three the median
    # of such gaps was a coin flip (the paired mean and its standard error
    # in the report say which gaps are more than seed noise)
    seeds=[0, 1, 2, 3, 4, 5, 6],
    jobs=2,  # (set, seed) tasks on the two cores, one torch thread each
    deep_params={},  # package defaults
    kde_bandwidths=np.logspace(-2, 0.5, 16),
    gmm_components=[1, 2, 3, 4, 6, 8, 12, 16],
    cv_folds=3,
    gallery_points=50,
)
QUICK = dict(
    sets=list(SETS),
    n_train=300,
    n_test=300,
    test_fraction=0.2,
    seeds=[0],
    jobs=1,
    deep_params={"MAPA": dict(max_iter=5, refine_iter=2), "VAE": dict(max_iter=5),
                 "IWAE": dict(max_iter=5)},
    kde_bandwidths=np.logspace(-2, 0.5, 4),
    gmm_components=[1, 2, 4],
    cv_folds=2,
    gallery_points=20,
)


def load_split(name, seed, cfg):
    """``(X_train, X_test, log_density or None)`` of one set, standardized if
    it has no exact density."""
    loader, _, kind = SETS[name]
    if kind == "real":
        X = np.asarray(loader(None, seed), dtype=float)
        A, B = train_test_split(X, test_size=cfg["test_fraction"], random_state=seed)
        log_density = None
    else:
        out = loader(cfg["n_train"] + cfg["n_test"], seed)
        X, log_density = out if kind == "skmapa" else (out, None)
        A, B = X[:cfg["n_train"]], X[cfg["n_train"]:]
    if kind != "skmapa":
        scaler = StandardScaler().fit(A)
        A, B = scaler.transform(A), scaler.transform(B)
    return A, B, log_density


def fit_one(name, X, seed, n_components, cfg):
    """Fit one estimator; (the fitted model: ``score_samples`` and
    ``sample(n, random_state)``, record of the fit)."""
    rec = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if name in DEEP:
            est = deep_estimator(name, seed, n_components=n_components,
                                 **cfg["deep_params"].get(name, {}))
            with timed() as t:
                est.fit(X)
            rec.update(flops=int(est.n_flops_), row_passes=total_row_passes(est),
                       n_iter=int(est.n_iter_), converged=bool(est.converged_),
                       noise_scale=float(np.mean(est.noise_scale_)))
        else:
            fit = kde_model if name == "KDE (CV)" else gmm_model
            with timed() as t:
                est, chosen = fit(X, seed, cfg)
            rec.update(chosen)
    rec.update(fit_wall_s=t["wall"], fit_cpu_s=t["cpu"])
    return est, rec


def _grid(X, n):
    low, high = X.min(axis=0), X.max(axis=0)
    pad = 0.15 * (high - low)
    axes = [np.linspace(lo, hi, n) for lo, hi in zip(low - pad, high + pad)]
    mesh = np.meshgrid(*axes, indexing="xy")
    return axes, np.column_stack([m.ravel() for m in mesh])


def run_split(ds, seed, cfg, show):
    """Every estimator on one split of one set: (records, gallery entry or
    None); ``show``: also score each estimator on the grid of a 2-D set
    (``GALLERY``), or draw as many rows from it as there are training rows
    (after scoring: the records do not depend on ``show``)."""
    setup_threads()  # in a worker process too: the serial run's single thread
    n_components = SETS[ds][1]
    A, B, log_density = load_split(ds, seed, cfg)
    lp_true = log_density(B) if log_density is not None else None
    records, gallery = [], None
    density_grid = show and ds in GALLERY
    if density_grid:
        axes, points = _grid(A, cfg["gallery_points"])
        gallery = {"data": A, "axes": axes}
    elif show:
        gallery = {"data": A, "log_density": log_density}
    for name in ESTIMATORS:
        est, rec = fit_one(name, A, seed, n_components, cfg)
        with timed() as t:
            lp = est.score_samples(B)
        out = {"dataset": ds, "seed": seed, "estimator": name,
               "n_components": n_components, "n_train": A.shape[0],
               "n_test": B.shape[0], "n_features": A.shape[1],
               "heldout_ll": float(np.mean(lp)),
               "kl": float(np.mean(lp_true - lp)) if lp_true is not None else None,
               "score_wall_s": t["wall"], **rec}
        records.append(out)
        if density_grid:
            gallery[name] = est.score_samples(points)
        elif show:
            gallery[name] = est.sample(A.shape[0], random_state=seed)
        log(f"zoo {ds} seed={seed} {name}: LL={out['heldout_ll']:.3f}"
            + (f" KL={out['kl']:.4f}" if out["kl"] is not None else "")
            + f" fit={rec['fit_wall_s']:.1f}s score={t['wall']:.1f}s")
    if lp_true is not None:
        records.append({"dataset": ds, "seed": seed, "estimator": "truth",
                        "heldout_ll": float(np.mean(lp_true))})
    return records, gallery


def run(cfg, out_dir, env, datasets=None):
    from joblib import Parallel, delayed

    sets = list(datasets or cfg["sets"])
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose from {list(SETS)}")
    tasks = [(ds, seed, seed == cfg["seeds"][0]) for ds in sets for seed in cfg["seeds"]]
    records, gallery = [], {}
    results = Parallel(n_jobs=cfg["jobs"], return_as="generator_unordered")(
        delayed(run_split)(ds, seed, cfg, show) for ds, seed, show in tasks)
    for recs, entry in results:
        records += recs
        if entry is not None:
            gallery[recs[0]["dataset"]] = entry
        # partial results survive an interrupted run
        write_csv(os.path.join(out_dir, "zoo_raw.csv"), records)
    order = {ds: i for i, ds in enumerate(sets)}
    names = ESTIMATORS + ["truth"]
    records.sort(key=lambda r: (order[r["dataset"]], r["seed"], names.index(r["estimator"])))
    write_csv(os.path.join(out_dir, "zoo_raw.csv"), records)
    grids = {ds: gallery[ds] for ds in sets if ds in gallery and ds in GALLERY}
    draws = {ds: gallery[ds] for ds in sets if ds in gallery and ds not in GALLERY}
    figures = {"density": plot_gallery(grids, out_dir) if grids else None,
               "samples": plot_samples(draws, out_dir) if draws else None}
    write_report(records, cfg, out_dir, env, sets, figures)
    return records


def _panels(n_rows):
    """A figure of ``n_rows`` rows of panels: the data, then each estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_columns = 1 + len(ESTIMATORS)
    return plt.subplots(n_rows, n_columns, figsize=(2.2 * n_columns, 2.2 * n_rows),
                        squeeze=False)


def plot_gallery(gallery, out_dir):
    names = list(gallery)
    fig, axs = _panels(len(names))
    for i, ds in enumerate(names):
        g = gallery[ds]
        x, y = g["axes"]
        extent = (x[0], x[-1], y[0], y[-1])
        axs[i, 0].scatter(*g["data"].T, s=1, c="k", alpha=0.4)
        axs[i, 0].set_xlim(x[0], x[-1])
        axs[i, 0].set_ylim(y[0], y[-1])
        axs[i, 0].set_ylabel(ds)
        for j, name in enumerate(ESTIMATORS, start=1):
            density = np.exp(g[name].reshape(len(y), len(x)))
            axs[i, j].imshow(density, origin="lower", extent=extent, aspect="auto",
                             cmap="viridis")
    return _save_panels(fig, axs, os.path.join(out_dir, "zoo_gallery.png"))


def plot_samples(draws, out_dir):
    """The training rows of each set next to rows drawn from each estimator:
    histograms with one feature (the true density as a line where known),
    else the first two principal components of the training rows."""
    from sklearn.decomposition import PCA

    names = list(draws)
    columns = ["data"] + ESTIMATORS
    fig, axs = _panels(len(names))
    for i, ds in enumerate(names):
        g = draws[ds]
        data = g["data"]
        if data.shape[1] == 1:
            low, high = np.percentile(data, [0.5, 99.5])
            pad = 0.15 * (high - low)
            bins = np.linspace(low - pad, high + pad, 60)
            line = np.linspace(bins[0], bins[-1], 400)[:, None]
            truth = None if g["log_density"] is None else np.exp(g["log_density"](line))
            for j, name in enumerate(columns):
                axs[i, j].hist(g[name].ravel(), bins=bins, density=True,
                               color="k" if j == 0 else "C0", alpha=0.6)
                if truth is not None:
                    axs[i, j].plot(line, truth, c="C3", lw=1)
                axs[i, j].set_xlim(bins[0], bins[-1])
            label = ds
        else:
            pca = PCA(2).fit(data)
            shown = pca.transform(data)
            low, high = np.percentile(shown, [0.5, 99.5], axis=0)
            pad = 0.25 * (high - low)
            for j, name in enumerate(columns):
                axs[i, j].scatter(*pca.transform(g[name]).T, s=1, alpha=0.4,
                                  c="k" if j == 0 else "C0")
                axs[i, j].set_xlim(low[0] - pad[0], high[0] + pad[0])
                axs[i, j].set_ylim(low[1] - pad[1], high[1] + pad[1])
            label = f"{ds} (PCA)"
        axs[i, 0].set_ylabel(label, fontsize=8)
    return _save_panels(fig, axs, os.path.join(out_dir, "zoo_samples.png"))


def _save_panels(fig, axs, path):
    """Title the columns (data, then the estimators), drop the ticks, save
    ``path``; its file name, for the report."""
    import matplotlib.pyplot as plt

    for j, title in enumerate(["data"] + ESTIMATORS):
        axs[0, j].set_title(title, fontsize=9)
    for ax in axs.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return os.path.basename(path)


def _med(records, ds, name, key):
    return median(values_of(records, ds, name, key))


def _gaps(records, ds, seeds):
    """Per seed, MAPA's held-out log-likelihood minus the better of the
    VAE's and the IWAE's (a paired difference: same split, same seed)."""
    def ll(name, seed):
        return next(r["heldout_ll"] for r in records if r["dataset"] == ds
                    and r["estimator"] == name and r["seed"] == seed)
    return np.array([ll("MAPA", s) - max(ll("VAE", s), ll("IWAE", s)) for s in seeds])


def _mean_se(values):
    """``mean ± standard error`` of ``values`` (the mean alone for one)."""
    if len(values) < 2:
        return fmt(float(np.mean(values)))
    se = float(np.std(values, ddof=1)) / len(values) ** 0.5
    return f"{fmt(float(np.mean(values)))} ± {fmt(se)}"


def write_report(records, cfg, out_dir, env, sets, figures):
    seeds = cfg["seeds"]
    agg = "median over seeds" if len(seeds) > 1 else "one seed"
    parts = [
        "# Benchmark `zoo`: held-out log-likelihood on every kind of data set",
        "",
        f"Generators: {cfg['n_train']} training and {cfg['n_test']} test rows from one call "
        f"(seeds {seeds}); iris and digits: a {1 - cfg['test_fraction']:.0%}/"
        f"{cfg['test_fraction']:.0%} split. scikit-learn and real sets are standardized by "
        "a StandardScaler fitted on the training rows (log-likelihoods per standardized row); "
        "the skmapa sets (the five curves and the manifolds of `make_manifold`, "
        "`embedding_seed=0`, noise 0.1) are used as they are. MAPA, VAE, IWAE: package "
        "defaults except `n_components` (column n: the intrinsic dimension where known, "
        "2 else)"
        + (f" and {cfg['deep_params']}" if cfg["deep_params"] else "")
        + "; IWAE with k=10. KDE (CV): bandwidth on standardized data from "
        f"{len(cfg['kde_bandwidths'])} log-spaced values in [{cfg['kde_bandwidths'][0]:g}, "
        f"{cfg['kde_bandwidths'][-1]:g}]; GMM (CV): full covariances, n_components in "
        f"{cfg['gmm_components']}; both by {cfg['cv_folds']}-fold CV of the mean "
        f"`score_samples`. Every figure is the {agg}."
        + (f" The (set, seed) tasks ran on {cfg['jobs']} workers at once, one torch thread "
           "each, so every fit time includes the load of the others."
           if cfg["jobs"] > 1 else ""),
        "",
        *environment_section(env),
        f"## Held-out mean log-likelihood (nats per row; higher is better), {agg}",
        "",
        "MAPA - best deep: MAPA minus the better of VAE and IWAE (medians); paired: the "
        "same difference taken in each seed, mean ± standard error over the seeds (a gap "
        "within about two standard errors of 0 is seed noise); seeds ahead: in how "
        "many seeds MAPA is at least the better of VAE and IWAE; MAPA - best baseline: "
        "MAPA minus the better of KDE (CV) and GMM (CV). truth: the mean exact log "
        "density of the test rows (skmapa sets).",
        "",
    ]
    rows = []
    for ds in sets:
        ll = {n: _med(records, ds, n, "heldout_ll") for n in ESTIMATORS}
        best = max(ll, key=lambda n: ll[n])
        cells = [f"**{fmt(ll[n])}**" if n == best else fmt(ll[n]) for n in ESTIMATORS]
        truth = _med(records, ds, "truth", "heldout_ll")
        gaps = _gaps(records, ds, seeds)
        rows.append([ds, SETS[ds][1], values_of(records, ds, "MAPA", "n_features")[0], *cells,
                     fmt(truth),
                     fmt(ll["MAPA"] - max(ll["VAE"], ll["IWAE"])),
                     _mean_se(gaps),
                     f"{int(np.sum(gaps >= 0))}/{len(seeds)}",
                     fmt(ll["MAPA"] - max(ll["KDE (CV)"], ll["GMM (CV)"]))])
    parts += [md_table(["data set", "n", "D"] + ESTIMATORS
                       + ["truth", "MAPA - best deep", "paired", "seeds ahead",
                          "MAPA - best baseline"],
                       rows), ""]

    known = [ds for ds in sets if SETS[ds][2] == "skmapa"]
    if known:
        rows = []
        for ds in known:
            kl = {n: _med(records, ds, n, "kl") for n in ESTIMATORS}
            best = min(kl, key=lambda n: kl[n])
            baseline = min(kl["KDE (CV)"], kl["GMM (CV)"])
            rows.append([ds] + [f"**{fmt(kl[n])}**" if n == best else fmt(kl[n])
                                for n in ESTIMATORS]
                        + [fmt(kl["MAPA"] / kl["IWAE"]) if kl["IWAE"] > 0 else "-",
                           fmt(kl["MAPA"] / baseline) if baseline > 0 else "-"])
        parts += [f"## Held-out KL to the true density (nats; lower is better), {agg}", "",
                  md_table(["data set"] + ESTIMATORS + ["MAPA / IWAE", "MAPA / best baseline"],
                           rows), ""]

    rows = []
    for ds in sets:
        flops = {n: _med(records, ds, n, "flops") for n in DEEP}
        rows.append([ds] + [fmt(flops[n] / 1e9) for n in DEEP]
                    + [fmt(flops["MAPA"] / flops["IWAE"])]
                    + [fmt(_med(records, ds, n, "fit_wall_s")) for n in ESTIMATORS]
                    + [fmt(_med(records, ds, n, "n_iter")) for n in DEEP])
    parts += [
        f"## Training cost, {agg}",
        "",
        "GFLOP: forward FLOPs of the deep estimators' training (`n_flops_`); fit wall "
        "time in seconds (KDE and GMM: the whole CV model selection and the refit); "
        "epochs: `n_iter_`.",
        "",
        md_table(["data set"] + [f"{n} GFLOP" for n in DEEP] + ["MAPA / IWAE FLOPs"]
                 + [f"{n} fit (s)" for n in ESTIMATORS] + [f"{n} epochs" for n in DEEP],
                 rows),
        "",
    ]
    rows = [[ds] + [fmt(_med(records, ds, n, "noise_scale")) for n in DEEP]
            + [fmt(_med(records, ds, "KDE (CV)", "bandwidth (std. units)")),
               fmt(_med(records, ds, "GMM (CV)", "gmm components"))] for ds in sets]
    parts += [
        "## Diagnostics",
        "",
        "Mean fitted noise scale (`noise_scale_`, in the estimators' standardized units), "
        "KDE bandwidth and GMM size chosen by CV.",
        "",
        md_table(["data set"] + [f"{n} noise scale" for n in DEEP]
                 + ["KDE bandwidth", "GMM components"], rows),
        "",
    ]
    if figures["density"]:
        parts += [
            "## Gallery",
            "",
            "The training rows of the 2-D sets next to each estimator's density "
            "(`exp(score_samples)` on a grid; first seed).",
            "",
            f"![zoo gallery]({figures['density']})",
            "",
        ]
    if figures["samples"]:
        parts += [
            "## Samples",
            "",
            "The training rows of every other set next to as many rows drawn from each "
            "estimator (`sample`; first seed). One feature: histograms, the true density "
            "in red; more: the first two principal components of the training rows.",
            "",
            f"![zoo samples]({figures['samples']})",
            "",
        ]
    parts += ["Per-seed values: `zoo_raw.csv`.", ""]
    with open(os.path.join(out_dir, "zoo.md"), "w") as fh:
        fh.write("\n".join(parts))
