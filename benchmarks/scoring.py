"""Suite ``scoring``: throughput and accuracy of ``score_samples``.

Each estimator (MAPA, VAE, IWAE as ``benchmarks._common.deep_estimator``
makes them: defaults apart from ``n_components``, IWAE with k=10) is fitted once per setting, then ``score_samples`` is
timed on one torch thread (median over repeats) on rows drawn around the
held-out data, and its values on the first ``n_check`` rows are compared
with a reference:

* ``n_components`` 1 and 2 on two moons (``make_moons``, noise 0.1,
  standardized): the plain latent grid summed over every point
  (``est._log_px_quadrature(Xs, n_per_dim)``, 2**16 + 1 points for one
  latent dimension, 1025 x 1025 for two), independent of the scoring grid;
* ``n_components`` 4 and 8 on the diabetes table (10 features,
  standardized): per row, the larger of two estimates that can only fail
  low in expectation: importance sampling from the proposal alone and
  adaptive importance sampling, each with 16 times the draws
  (``REFERENCE_DRAWS``). As a check of the reference's own bias, the mean
  of annealed importance sampling (1000 temperatures, 16 chains,
  ``skmapa.diagnostics``) minus the reference is reported: AIS too can only
  fail low, so a clearly positive value means the reference is low. (Its
  per-row noise, ~0.1-0.25 nats between two AIS seeds, is too large for it
  to be the reference.)

Reported: rows per second, the mean and largest absolute error against the
reference (nats per row), and where the estimator reports one, the median
of its own error estimate (``score_samples(X, return_error=True)``). For
importance sampling also the sampler before adaptive importance sampling
(draws from the proposal alone, the same draws): its rows per second and
error ("plain IS").
"""

import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_diabetes, make_moons
from sklearn.preprocessing import StandardScaler

from ._common import deep_estimator, environment_section, fmt, log, md_table, write_csv

FULL = dict(settings=((1, "moons"), (2, "moons"), (4, "diabetes"), (8, "diabetes")),
            estimators=("MAPA", "VAE", "IWAE"), n_rows=20000, n_rows_importance=5000,
            n_big=10**6, n_check=200, repeats=3)
QUICK = dict(settings=((1, "moons"), (2, "moons"), (4, "diabetes")),
             estimators=("VAE",), n_rows=2000, n_rows_importance=500, n_big=0,
             n_check=50, repeats=1)
REFERENCE_DRAWS = 16
AIS_STEPS = 1000
AIS_CHAINS = 16


def _data(name):
    if name == "moons":
        X, _ = make_moons(4000, noise=0.1, random_state=0)
    else:
        X = load_diabetes().data
    X = StandardScaler().fit_transform(X)
    half = len(X) // 2
    return X[:half], X[half:]


def _rows(X_test, n, seed=1):
    rng = np.random.RandomState(seed)
    return X_test[rng.randint(0, len(X_test), n)] + 0.02 * rng.normal(size=(n, X_test.shape[1]))


def _plain(value):
    """The log p tensor of an internal scorer, whatever it returns with it."""
    return value[0] if isinstance(value, tuple) else value


def _reference(est, X):
    Xs = est._standardize(X)
    d = est.n_components
    if d <= 2:
        n = 2**16 + 1 if d == 1 else 1025
        return _plain(est._log_px_quadrature(Xs, n)).double().numpy() - est._log_det()
    return _many_draws_reference(est, Xs) - est._log_det()


def _many_draws_reference(est, Xs):
    """The larger, per row, of two estimates that can only fail low (in
    expectation): importance sampling from the proposal alone and adaptive
    importance sampling, each with ``REFERENCE_DRAWS`` times the draws."""
    from skmapa._scoring import sobol_normal

    draws = est.eval_draws_
    est.eval_draws_ = sobol_normal(REFERENCE_DRAWS * draws.shape[0], est.n_components,
                                   torch.Generator().manual_seed(0))
    try:
        values = [_plain(est._log_px_importance(Xs, adaptive=a)).double().numpy()
                  for a in (False, True)]
    finally:
        est.eval_draws_ = draws
    return np.max(values, axis=0)


def _ais_offset(est, X, reference):
    """Mean of (annealed importance sampling - reference) over the rows: a
    check of the reference's own bias (AIS too can only fail low)."""
    from skmapa.diagnostics import _ais_log_px

    Xs = est._standardize(X).to(est._torch_dtype)
    with torch.no_grad():
        ais = _ais_log_px(est.decoder_, Xs, est.n_components, AIS_STEPS, AIS_CHAINS, 2,
                          torch.Generator().manual_seed(0))[0].double().numpy()
    return float(np.mean(ais - est._log_det() - reference))


def _time_scoring(est, X, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        lp = est.score_samples(X)
        times.append(time.perf_counter() - t)
    return lp, float(np.median(times))


def measure(cfg):
    """One record per (estimator, n_components)."""
    torch.set_num_threads(1)
    records = []
    for d, data_name in cfg["settings"]:
        X_train, X_test = _data(data_name)
        for name in cfg["estimators"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = deep_estimator(name, 0, n_components=d).fit(X_train)
            grid = getattr(est, "_quadrature", None)
            on_grid = d <= 2 and grid is not None and getattr(grid, "resolved", True)
            n = cfg["n_rows"] if on_grid else cfg["n_rows_importance"]
            X = _rows(X_test, n)
            lp, seconds = _time_scoring(est, X, cfg["repeats"])
            check = X[:cfg["n_check"]]
            reference = _reference(est, check)
            gap = np.abs(lp[:cfg["n_check"]] - reference)
            rec = dict(estimator=name, n_components=d, data=data_name,
                       method="grid" if on_grid else "importance",
                       rows=n, rows_per_s=n / seconds, mae=float(gap.mean()),
                       max_error=float(gap.max()), error_estimate_median=float("nan"),
                       big_rows_per_s=float("nan"), plain_rows_per_s=float("nan"),
                       plain_mae=float("nan"), ais_offset=float("nan"))
            try:
                _, err = est.score_samples(check, return_error=True)
                rec["error_estimate_median"] = float(np.median(err))
            except TypeError:
                pass  # a version without error estimates
            if not on_grid:
                rec["ais_offset"] = _ais_offset(est, check, reference)
                # the sampler before adaptive importance sampling, same draws
                Xs = est._standardize(X)
                with est._eval_threads(n, est.n_eval_samples):
                    t = time.perf_counter()
                    lp_plain = _plain(est._log_px_importance(Xs, adaptive=False))
                    rec["plain_rows_per_s"] = n / (time.perf_counter() - t)
                lp_plain = lp_plain.double().numpy()[:cfg["n_check"]] - est._log_det()
                rec["plain_mae"] = float(np.abs(lp_plain - reference).mean())
            if on_grid and cfg["n_big"]:
                _, seconds = _time_scoring(est, _rows(X_test, cfg["n_big"]), 1)
                rec["big_rows_per_s"] = cfg["n_big"] / seconds
            log(f"scoring {name} d={d}: {rec['rows_per_s']:.0f} rows/s, "
                f"MAE {rec['mae']:.2e}")
            records.append(rec)
    return records


def _cell(value, spec):
    value = float(value) if value not in (None, "") else float("nan")
    return format(value, spec) if np.isfinite(value) else "-"


def report(records, env, title="Scoring"):
    headers = ["estimator", "n_components", "data", "method", "rows/s", "rows/s at 1e6",
               "MAE (nats)", "max error", "own error estimate (median)",
               "plain IS rows/s", "plain IS MAE", "AIS - reference (mean)"]
    rows = [[r["estimator"], r["n_components"], r["data"], r["method"],
             fmt(round(r["rows_per_s"])), _cell(r["big_rows_per_s"], ",.0f"),
             f"{r['mae']:.1e}", f"{r['max_error']:.1e}",
             _cell(r["error_estimate_median"], ".1e"),
             _cell(r.get("plain_rows_per_s"), ",.0f"), _cell(r.get("plain_mae"), ".1e"),
             _cell(r.get("ais_offset"), "+.3f")]
            for r in records]
    return "\n".join([f"# {title}", "", __doc__.split("\n\n", 1)[1].strip(), "",
                      md_table(headers, rows), "", *environment_section(env)])


def run(cfg, out_dir, env, datasets=None):
    import os

    records = measure(cfg)
    write_csv(os.path.join(out_dir, "scoring_raw.csv"), records)
    with open(os.path.join(out_dir, "scoring.md"), "w") as fh:
        fh.write(report(records, env))
