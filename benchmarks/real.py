"""Suite ``real``: held-out log-likelihood on real tables, outer x inner CV.

Tables (all shipped with the packages, nothing is downloaded):

* ``iris``: ``sklearn.datasets.load_iris``, 150 rows x 4 measurements;
* ``diabetes``: ``sklearn.datasets.load_diabetes`` features, 442 rows x 7:
  the binary ``sex`` column is dropped (a two-valued column has no density:
  a mixture with a near-zero variance along it gains several nats per row
  for nothing), and so are ``s4`` (the cholesterol ratio, 83% of its rows at
  the integers 2 to 6, the same degeneracy) and ``s2`` (LDL, computed from
  the others by the Friedewald formula ``ldl = tc - hdl - tg / 5`` with
  ``tg = exp(s5)``: on the raw table the residual of that formula is 0.1% of
  the column's standard deviation, so the rows lie on a curved 7-D surface
  in 8-D, and a density gains without bound by hugging it);
* ``digits``: ``sklearn.datasets.load_digits``, 1797 rows x 64 pixels,
  uniformly dequantised once with a fixed seed as in the ``digits`` suite
  (``benchmarks.digits.dequantised_digits``);
* ``star98``: ``statsmodels.datasets.star98`` (California school districts,
  1998), 303 rows x 12 continuous columns, the two counts of students
  (``NABOVE``, ``NBELOW``, which scale with the district's size and reach 16
  standard deviations) log-transformed; the two zero-inflated percentages
  (``PCTCHRT``, ``PCTYRRND``) and the eight interaction columns (products of
  the others, so deterministic) are dropped;
* ``macrodata``: ``statsmodels.datasets.macrodata`` (US quarterly
  macroeconomic series, 1959-2009), 202 rows x 10: the quarterly growth
  rates (100 x log-difference) of the seven level series ``realgdp``,
  ``realcons``, ``realinv``, ``realgovt``, ``realdpi``, ``m1`` and ``pop``,
  with the rates ``tbilrate``, ``unemp`` and ``infl`` as they are. The
  levels trend together along a curve in time (not draws from one density:
  a held-out quarter at an end of the curve costs a Gaussian thousands of
  nats); ``cpi`` is dropped (``infl`` is its annualised growth) and so is
  ``realint`` (``tbilrate - infl``).

statsmodels ships no table of 1000 rows or more with several continuous
columns (``randhie``, ``fair`` and ``anes96`` are counts, ordinal scores and
binaries with a few distinct values each); the two above are its largest
continuous ones. They need the optional extra ``benchmarks``
(``pip install -e ".[benchmarks]"``); without statsmodels they are skipped.

Protocol, per table: an outer KFold (shuffled, seed 0) gives held-out rows.
On each outer training fold a StandardScaler is fitted and applied to the
training and held-out rows, so every log-likelihood is in nats per row of
the *standardized* table (the estimators see the same units; to convert to
the original units subtract ``sum(log scale_)`` of the fold's scaler).
Everything chosen by CV is chosen by an inner KFold on the (standardized)
training fold, with the same inner splits for every estimator (shuffled,
seed = outer fold index), scored by mean ``score_samples``:

* MAPADensity, VAEDensity and IWAEDensity (``benchmarks._common.deep_estimator``,
  package defaults apart from ``n_components``): ``n_components`` from a
  small per-table grid by inner CV, then refitted on the whole training fold;
  ``score_samples`` by quadrature for one latent dimension, importance
  sampling (1024 draws) otherwise;
* probabilistic PCA (``sklearn.decomposition.PCA(n).score_samples``): at
  each deep estimator's chosen ``n_components`` of the same fold (the
  reference of the target "deep >= PPCA") and, as a column of its own, with
  ``n`` in ``1 .. n_features - 1`` by inner CV;
* a single full-covariance Gaussian (``GaussianMixture(1, 'full')``);
* KernelDensity with its bandwidth by inner CV and GaussianMixture with its
  number of components and covariance type by inner CV
  (``benchmarks.density.fit_kde`` and ``fit_gmm``).

Reported per table and estimator: held-out and training LL (mean ± sd over
outer folds), the held-out LL minus PPCA's at the same ``n_components``
(paired by fold), the choices made by the inner CV, the inner-CV LL of every
candidate ``n_components``, fit time (model selection included, and the
refit alone) and the training row-passes of the refitted deep estimator
(``n_row_passes_`` summed over networks).
"""

import os
import warnings

import numpy as np
from sklearn.datasets import load_diabetes, load_iris
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.preprocessing import StandardScaler

from ._common import (
    deep_estimator,
    environment_section,
    fmt,
    log,
    md_table,
    mean_loglik,
    mean_sd,
    median,
    setup_threads,
    timed,
    total_row_passes,
    write_csv,
)
from .density import fit_gmm, fit_kde
from .digits import dequantised_digits

DEEP = ["MAPA", "VAE", "IWAE"]
#: Column order of the tables.
ESTIMATORS = DEEP + ["PPCA (CV)", "Gaussian", "KDE (CV)", "GMM (CV)"]
#: The tables that need statsmodels.
STATSMODELS_TABLES = ("star98", "macrodata")
#: The target of issue 11: MAPA within this many nats per row of GMM (CV).
GMM_MARGIN = 0.5

FULL = dict(
    tables=["iris", "diabetes", "digits", "star98", "macrodata"],
    folds={"default": 5, "digits": 3},
    max_rows={},  # table -> rows kept (a fixed random subset); none subsampled
    inner_folds=3,
    n_components={"default": [1, 2, 4], "iris": [1, 2, 3], "digits": [2, 4, 8]},
    deep_params={},  # package defaults
    kde_bandwidths=np.logspace(-2, 1, 31),
    gmm_grid={
        "default": {"n_components": [1, 2, 3, 4, 6, 8, 12, 16],
                    "covariance_type": ["full", "diag"]},
        "digits": {"n_components": [1, 2, 4, 8, 16, 32], "covariance_type": ["full", "diag"]},
    },
    jobs=2,  # (table, outer fold) tasks on the two cores, one torch thread each
)
QUICK = dict(
    tables=["iris", "diabetes", "digits", "star98", "macrodata"],
    folds={"default": 2},
    max_rows={"digits": 400},
    inner_folds=2,
    n_components={"default": [1, 2], "digits": [2, 4]},
    deep_params={"MAPA": dict(max_iter=10, refine_iter=2), "VAE": dict(max_iter=10),
                 "IWAE": dict(max_iter=10)},
    kde_bandwidths=np.logspace(-2, 1, 7),
    gmm_grid={"default": {"n_components": [1, 2, 4], "covariance_type": ["full", "diag"]}},
    jobs=2,
)

# ---------------------------------------------------------------- tables


def _statsmodels_data(name):
    import statsmodels.api as sm

    return getattr(sm.datasets, name).load_pandas().data


def _star98():
    df = _statsmodels_data("star98")
    cols = ["NABOVE", "NBELOW", "LOWINC", "PERASIAN", "PERBLACK", "PERHISP", "PERMINTE",
            "AVYRSEXP", "AVSALK", "PERSPENK", "PTRATIO", "PCTAF"]
    df = df[cols].dropna()
    for c in ("NABOVE", "NBELOW"):
        df[c] = np.log(df[c])
    return df.to_numpy(dtype=float), ["log NABOVE", "log NBELOW"] + cols[2:]


def _macrodata():
    df = _statsmodels_data("macrodata")
    levels = ["realgdp", "realcons", "realinv", "realgovt", "realdpi", "m1", "pop"]
    rates = ["tbilrate", "unemp", "infl"]
    growth = 100 * np.diff(np.log(df[levels].to_numpy(dtype=float)), axis=0)
    X = np.hstack([growth, df[rates].to_numpy(dtype=float)[1:]])
    return X, [f"{c} growth" for c in levels] + rates


def _diabetes():
    data = load_diabetes()
    keep = [i for i, n in enumerate(data.feature_names) if n not in ("sex", "s2", "s4")]
    return data.data[:, keep], [data.feature_names[i] for i in keep]


TABLES = {
    "iris": (lambda: (load_iris().data, load_iris().feature_names), "sklearn `load_iris`"),
    "diabetes": (_diabetes, "sklearn `load_diabetes` features but `sex`, `s4` (discrete), `s2` (derived)"),
    "digits": (lambda: (dequantised_digits(), [f"pixel {i}" for i in range(64)]),
               "sklearn `load_digits`, dequantised (u = (pixel + U[0, 1)) / 17)"),
    "star98": (_star98, "statsmodels `star98`, 12 continuous columns (2 counts logged)"),
    "macrodata": (_macrodata, "statsmodels `macrodata`, growth rates of 7 series + 3 rates"),
}


def load_table(name, max_rows=None):
    """``(X, columns)`` of a table, NaN rows dropped, optionally subsampled."""
    X, columns = TABLES[name][0]()
    X = np.asarray(X, dtype=float)
    X = X[np.all(np.isfinite(X), axis=1)]
    if max_rows is not None and max_rows < X.shape[0]:
        X = X[np.sort(np.random.RandomState(0).choice(X.shape[0], max_rows, replace=False))]
    return X, list(columns)


def _statsmodels_available():
    try:
        import statsmodels.api  # noqa: F401
    except ImportError:
        return False
    return True


def _per_table(cfg, key, table):
    value = cfg[key]
    return value.get(table, value.get("default")) if isinstance(value, dict) else value


# ---------------------------------------------------------------- fits


def finite_loglik(estimator, X, y=None):
    """CV scorer: mean ``score_samples``; -inf rather than NaN for a broken fit."""
    value = mean_loglik(estimator, X)
    return value if np.isfinite(value) else float("-inf")


def _inner_cv(seed, cfg):
    return KFold(cfg["inner_folds"], shuffle=True, random_state=seed)


def fit_deep(name, A, seed, grid, cfg):
    """A deep estimator with ``n_components`` by inner CV; (estimator, record)."""
    params = dict(cfg["deep_params"].get(name, {}))
    search = GridSearchCV(deep_estimator(name, seed, **params), {"n_components": grid},
                          cv=_inner_cv(seed, cfg), scoring=finite_loglik,
                          error_score=float("-inf"))
    with timed() as t:
        search.fit(A)
    est = search.best_estimator_
    rec = {"n_components": int(est.n_components), "fit_wall_s": t["wall"],
           "fit_cpu_s": t["cpu"], "refit_wall_s": float(search.refit_time_),
           "row_passes": total_row_passes(est), "n_iter": int(est.n_iter_),
           "converged": bool(est.converged_)}
    for d, score in zip(search.cv_results_["param_n_components"],
                        search.cv_results_["mean_test_score"]):
        rec[f"inner_ll_d{int(d)}"] = float(score)
    return est, rec


def fit_ppca(A, seed, cfg):
    """PCA's probabilistic model with ``n_components`` by inner CV."""
    grid = list(range(1, A.shape[1]))
    search = GridSearchCV(PCA(), {"n_components": grid}, cv=_inner_cv(seed, cfg),
                          scoring=finite_loglik)
    with timed() as t:
        search.fit(A)
    est = search.best_estimator_
    return est, {"n_components": int(est.n_components_), "fit_wall_s": t["wall"],
                 "fit_cpu_s": t["cpu"]}


def run_fold(table, fold, train, test, X, cfg):
    """Every estimator on one outer fold of one table; a list of records."""
    setup_threads()  # in a worker process too: the serial run's single thread
    scaler = StandardScaler().fit(X[train])
    A, B = scaler.transform(X[train]), scaler.transform(X[test])
    grid = [d for d in _per_table(cfg, "n_components", table) if d < A.shape[1]]
    inner = dict(cfg, cv_folds=cfg["inner_folds"],
                 gmm_grid=_per_table(cfg, "gmm_grid", table))
    records = []

    def record(name, score, rec):
        with timed() as t:
            lp = score(B)
        out = {"table": table, "fold": fold, "estimator": name, "n_train": A.shape[0],
               "n_test": B.shape[0], "n_features": A.shape[1],
               "heldout_ll": float(np.mean(lp)), "train_ll": float(np.mean(score(A))),
               "finite": bool(np.all(np.isfinite(lp))), "score_wall_s": t["wall"], **rec}
        records.append(out)
        log(f"real {table} fold={fold} {name}: held-out LL={out['heldout_ll']:.3f} "
            f"train LL={out['train_ll']:.3f} fit={rec.get('fit_wall_s', 0):.1f}s"
            + (f" n_components={rec['n_components']}" if "n_components" in rec else ""))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*non-finite.*")
        for name in DEEP:
            est, rec = fit_deep(name, A, fold, grid, cfg)
            ppca = PCA(rec["n_components"]).fit(A)
            rec["ppca_same_heldout_ll"] = float(np.mean(ppca.score_samples(B)))
            rec["ppca_same_train_ll"] = float(np.mean(ppca.score_samples(A)))
            out = record(name, est.score_samples, rec)
            out["vs_ppca"] = out["heldout_ll"] - out["ppca_same_heldout_ll"]
        est, rec = fit_ppca(A, fold, cfg)
        record("PPCA (CV)", est.score_samples, rec)
        with timed() as t:
            gauss = GaussianMixture(1, covariance_type="full", random_state=fold).fit(A)
        record("Gaussian", gauss.score_samples, {"fit_wall_s": t["wall"], "fit_cpu_s": t["cpu"]})
        for name, fit in (("KDE (CV)", fit_kde), ("GMM (CV)", fit_gmm)):
            with timed() as t:
                score, chosen = fit(A, fold, inner)
            record(name, score, {**chosen, "fit_wall_s": t["wall"], "fit_cpu_s": t["cpu"]})
    return records


def run(cfg, out_dir, env, datasets=None):
    from joblib import Parallel, delayed

    tables = list(datasets or cfg["tables"])
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown tables {unknown}; choose from {list(TABLES)}")
    skipped = []
    if not _statsmodels_available():
        skipped = [t for t in tables if t in STATSMODELS_TABLES]
        tables = [t for t in tables if t not in STATSMODELS_TABLES]
        if skipped:
            log(f"real: statsmodels is not installed (pip install -e \".[benchmarks]\"): "
                f"skipping {skipped}")
    data, tasks = {}, []
    for table in tables:
        X, columns = load_table(table, _per_table(cfg, "max_rows", table))
        data[table] = dict(shape=X.shape, columns=columns,
                           folds=_per_table(cfg, "folds", table))
        splits = KFold(data[table]["folds"], shuffle=True, random_state=0).split(X)
        tasks += [(X.shape[0] * X.shape[1] ** 0.5, table, fold, train, test, X)
                  for fold, (train, test) in enumerate(splits)]
    tasks.sort(key=lambda task: -task[0])  # the longest first, for the load balance
    records = []
    results = Parallel(n_jobs=cfg["jobs"], return_as="generator_unordered")(
        delayed(run_fold)(table, fold, train, test, X, cfg)
        for _, table, fold, train, test, X in tasks
    )
    for recs in results:
        records += recs
        # partial results survive an interrupted run
        write_csv(os.path.join(out_dir, "real_raw.csv"), records)
    order = {t: i for i, t in enumerate(tables)}
    records.sort(key=lambda r: (order[r["table"]], r["fold"], ESTIMATORS.index(r["estimator"])))
    write_csv(os.path.join(out_dir, "real_raw.csv"), records)
    write_report(records, cfg, out_dir, env, tables, data, skipped)
    return records


# ---------------------------------------------------------------- report


def _get(records, table, name, key):
    return [r.get(key) for r in records if r["table"] == table and r["estimator"] == name]


def _mean(records, table, name, key):
    values = [v for v in _get(records, table, name, key) if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _per_fold(values, digits=None):
    return ", ".join(str(v) if digits is None else f"{v:.{digits}g}" for v in values)


def write_report(records, cfg, out_dir, env, tables, data, skipped):
    parts = [
        "# Benchmark `real`: held-out log-likelihood on real tables",
        "",
        "Outer KFold (shuffled, seed 0) per table; on each outer training fold a "
        "StandardScaler is fitted and applied to the training and held-out rows, so "
        "**every log-likelihood is in nats per row of the standardized table** (higher is "
        "better). Everything chosen by CV is chosen by an inner "
        f"{cfg['inner_folds']}-fold KFold on the standardized training fold (the same inner "
        "splits for every estimator, scored by mean `score_samples`). MAPA, VAE and IWAE: "
        "package defaults apart from `n_components`, chosen from the grid below by inner CV "
        "then refitted on the training fold"
        + (f" (budgets shrunk: {cfg['deep_params']})" if cfg["deep_params"] else "")
        + "; IWAE with k=10. PPCA: `sklearn.decomposition.PCA(n).score_samples`, "
        "n in 1 .. n_features - 1 by inner CV. Gaussian: `GaussianMixture(1, 'full')`. "
        f"KDE (CV): bandwidth from {len(cfg['kde_bandwidths'])} log-spaced values in "
        f"[{cfg['kde_bandwidths'][0]:g}, {cfg['kde_bandwidths'][-1]:g}]. GMM (CV): "
        "n_components and covariance type from the grid below. Mean ± sd over the outer "
        "folds.",
        "",
        md_table(
            ["table", "source", "rows x columns", "outer folds", "deep n_components grid",
             "GMM grid"],
            [[t, TABLES[t][1], f"{data[t]['shape'][0]} x {data[t]['shape'][1]}"
              + (" (subsample)" if _per_table(cfg, "max_rows", t) else ""),
              data[t]["folds"],
              str([d for d in _per_table(cfg, "n_components", t) if d < data[t]["shape"][1]]),
              "{}; {}".format(*_per_table(cfg, "gmm_grid", t).values())]
             for t in tables],
            align=["---", "---", "--:", "--:", "---", "---"],
        ),
        "",
    ]
    if skipped:
        parts += [f"Skipped (statsmodels not installed): {', '.join(skipped)}.", ""]
    parts += environment_section(env)

    # held-out LL
    rows = []
    for t in tables:
        means = {n: _mean(records, t, n, "heldout_ll") for n in ESTIMATORS}
        best = max(means, key=lambda n: means[n])
        cells = []
        for n in ESTIMATORS:
            cell = mean_sd(_get(records, t, n, "heldout_ll"), 2)
            cells.append(f"**{cell}**" if n == best else cell)
        rows.append([t] + cells)
    parts += ["## Held-out log-likelihood (nats per row, standardized units)", "",
              md_table(["table"] + ESTIMATORS, rows), ""]

    # the targets
    rows, failing = [], []
    for t in tables:
        row = [t]
        for n in DEEP:
            diff = _get(records, t, n, "vs_ppca")
            ds = _get(records, t, n, "n_components")
            ppca = mean_sd(_get(records, t, n, "ppca_same_heldout_ll"), 2)
            row.append(f"{mean_sd(diff, 2)} (PPCA {ppca}; n = {_per_fold(ds)})")
            if np.mean(diff) < 0:
                failing.append(f"{n} on {t} ({np.mean(diff):+.2f})")
        gap = np.array(_get(records, t, "MAPA", "heldout_ll")) - np.array(
            _get(records, t, "GMM (CV)", "heldout_ll"))
        row.append(mean_sd(gap, 2))
        rows.append(row)
    n_pairs = len(tables) * len(DEEP)
    mapa_ok = [t for t in tables
               if _mean(records, t, "MAPA", "heldout_ll")
               >= _mean(records, t, "GMM (CV)", "heldout_ll") - GMM_MARGIN]
    parts += [
        "## Targets: deep estimators against PPCA and GMM (CV)",
        "",
        "Held-out LL of each deep estimator minus that of PPCA with the same "
        "`n_components` on the same fold (paired by fold; PPCA's own LL and the "
        "`n_components` the inner CV chose per fold in parentheses), and MAPA's held-out "
        "LL minus that of GMM (CV). Targets: every deep estimator >= PPCA on every table; "
        f"MAPA within {GMM_MARGIN} nats per row of GMM (CV).",
        "",
        md_table(["table"] + [f"{n} - PPCA (same n)" for n in DEEP] + ["MAPA - GMM (CV)"],
                 rows),
        "",
        f"- deep >= PPCA (same n_components), on the mean over folds: "
        f"{n_pairs - len(failing)} of {n_pairs} (table, estimator) pairs"
        + (f"; below: {', '.join(failing)}." if failing else "."),
        f"- MAPA within {GMM_MARGIN} nats per row of GMM (CV): {len(mapa_ok)} of "
        f"{len(tables)} tables" + (f" ({', '.join(mapa_ok)})." if mapa_ok else "."),
        "",
    ]

    # train LL
    rows = []
    for t in tables:
        rows.append([t] + [
            f"{mean_sd(_get(records, t, n, 'train_ll'), 2)} "
            f"({_mean(records, t, n, 'train_ll') - _mean(records, t, n, 'heldout_ll'):+.2f})"
            for n in ESTIMATORS])
    parts += [
        "## Training log-likelihood (nats per row; train minus held-out in parentheses)",
        "",
        "LL of the final model on its own (standardized) training fold: a large gap to "
        "the held-out LL is overfitting.",
        "",
        md_table(["table"] + ESTIMATORS, rows),
        "",
    ]

    # choices by CV
    rows = []
    for t in tables:
        kde = _get(records, t, "KDE (CV)", "bandwidth (std. units)")
        gmm = [f"{c} {cv}" for c, cv in zip(_get(records, t, "GMM (CV)", "gmm components"),
                                             _get(records, t, "GMM (CV)", "gmm covariance"))]
        rows.append([t] + [_per_fold(_get(records, t, n, "n_components"))
                           for n in DEEP + ["PPCA (CV)"]]
                    + [_per_fold(kde, 2), ", ".join(gmm)])
    parts += [
        "## Choices of the inner CV, per outer fold",
        "",
        md_table(["table", "MAPA n", "VAE n", "IWAE n", "PPCA n", "KDE bandwidth",
                  "GMM components, covariance"], rows, align=["---"] * 7),
        "",
    ]

    # inner-CV LL per candidate
    rows = []
    for t in tables:
        grid = [d for d in _per_table(cfg, "n_components", t) if d < data[t]["shape"][1]]
        for n in DEEP:
            rows.append([t, n] + [f"{_mean(records, t, n, f'inner_ll_d{d}'):.2f} (n={d})"
                                  for d in grid]
                        + [""] * (3 - len(grid)))
    width = max(len([d for d in _per_table(cfg, "n_components", t)
                     if d < data[t]["shape"][1]]) for t in tables)
    parts += [
        "## Inner-CV log-likelihood of each candidate n_components",
        "",
        "Mean over outer folds of the inner-CV mean held-out LL, for the grid of the "
        "table (first, second, third value of the grid, as listed in the first table).",
        "",
        md_table(["table", "estimator"] + [f"grid[{i}]" for i in range(max(width, 3))], rows),
        "",
    ]

    # cost
    rows = []
    for t in tables:
        row = [t]
        for n in DEEP:
            row += [fmt(median(_get(records, t, n, "fit_wall_s"))),
                    fmt(median(_get(records, t, n, "refit_wall_s"))),
                    fmt(median(_get(records, t, n, "row_passes")) / 1e6),
                    fmt(median(_get(records, t, n, "n_iter"))),
                    f"{sum(bool(c) for c in _get(records, t, n, 'converged'))}/"
                    f"{len(_get(records, t, n, 'converged'))}"]
        row += [fmt(median(_get(records, t, n, "fit_wall_s")))
                for n in ("PPCA (CV)", "KDE (CV)", "GMM (CV)")]
        rows.append(row)
    headers = ["table"]
    for n in DEEP:
        headers += [f"{n} fit+CV (s)", f"{n} refit (s)", f"{n} Mrows", f"{n} epochs",
                    f"{n} conv."]
    headers += ["PPCA fit+CV (s)", "KDE fit+CV (s)", "GMM fit+CV (s)"]
    parts += [
        "## Cost, median over outer folds",
        "",
        "fit+CV: wall time of the whole model selection (every candidate on every inner "
        "fold, scoring included, then the refit); refit: the final fit alone; Mrows: "
        "rows pushed through every network during the refit (`n_row_passes_`, summed "
        "over networks), in millions; epochs: `n_iter_` of the refit; conv.: refits "
        "stopped by `tol` before `max_iter`.",
        "",
        md_table(headers, rows),
        "",
        "Per-fold values (inner-CV scores included): `real_raw.csv`.",
        "",
    ]
    with open(os.path.join(out_dir, "real.md"), "w") as fh:
        fh.write("\n".join(parts))
