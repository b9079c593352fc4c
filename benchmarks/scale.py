"""Suite ``scale``: fit time and peak memory against N, and scoring throughput.

Every configuration runs in a fresh subprocess (``benchmarks._worker``), so
that peak memories (``ru_maxrss`` high-water marks) do not contaminate one
another; the parent reads each child's own peak through ``os.wait4``.
"""

import json
import os
import subprocess
import sys
import tempfile

from ._common import (
    FULL_BUDGET,
    environment_section,
    fmt,
    log,
    md_table,
    write_csv,
)

#: MAPA settings per N: about 2000 phase-1 and 800 phase-2 gradient steps at
#: every N (at N=2000 the defaults stop after ~2000 + ~800 steps), the batch
#: growing with N; FULL_BUDGET so every run does its whole budget.
MAPA_SETTINGS = {
    1_000: dict(batch_size=128, max_iter=250, refine_iter=100),
    10_000: dict(batch_size=1024, max_iter=200, refine_iter=80),
    100_000: dict(batch_size=1024, max_iter=20, refine_iter=8),
    1_000_000: dict(batch_size=4096, max_iter=8, refine_iter=3),
}

FULL = dict(
    mapa_n=[1_000, 10_000, 100_000],
    mapa_n_10d=[100_000],
    big_n=[1_000_000],
    epoch_n={1_000: (20, 3), 10_000: (4, 3), 100_000: (2, 1)},  # N: (E, repeats)
    big_epoch_n={1_000_000: (1, 1)},
    epoch_batch_size=128,
    score_fit_n=2000,
    score_fit_params={},
    score_rows=100_000,
    accuracy_rows=1000,
    resolution_rows=200,
)
QUICK = dict(
    mapa_n=[1_000, 10_000],
    mapa_n_10d=[10_000],
    mapa_params=dict(max_iter=10, refine_iter=2),  # overrides MAPA_SETTINGS
    big_n=[1_000_000],
    epoch_n={1_000: (3, 1), 10_000: (1, 1)},
    epoch_batch_size=128,
    score_fit_n=500,
    score_fit_params={"MAPA": dict(max_iter=10, refine_iter=2),
                      "VAE": dict(max_iter=10), "IWAE": dict(max_iter=10)},
    score_rows=10_000,
    accuracy_rows=100,
    resolution_rows=5,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(task, timeout=None):
    """Run one task in a fresh process: (result dict, peak RSS in MiB of the child)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._worker", json.dumps(task)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out = proc.stdout.read()
    finally:
        proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}) on {task}:\n{out[-2000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    peak = usage.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else usage.ru_maxrss / 1024
    return json.loads(line[len("RESULT "):]), peak


def run(cfg, out_dir, env, big=False):
    records = {"mapa_fit": [], "epochs": [], "score": []}

    def save_raw():
        flat = []
        for kind, recs in records.items():
            flat += [{"part": kind, **r} for r in recs]
        write_csv(os.path.join(out_dir, "scale_raw.csv"), flat)

    # 1. MAPA fit time and peak memory against N
    sizes = [(n, 2) for n in cfg["mapa_n"] + (cfg["big_n"] if big else [])]
    for n, d in sizes + [(n, 10) for n in cfg["mapa_n_10d"]]:
        params = dict(MAPA_SETTINGS[n], **FULL_BUDGET, **cfg.get("mapa_params", {}))
        for label, p in (("a-priori part only", dict(params, max_iter=0, refine_iter=0)),
                         ("full fit", params)):
            res, peak = run_worker({"task": "mapa_fit", "n": n, "n_features": d,
                                    "params": p})
            rec = {"n": n, "n_features": d, "what": label,
                   **{k: v for k, v in p.items() if k not in FULL_BUDGET},
                   **res, "peak_rss_mib": peak}
            records["mapa_fit"].append(rec)
            log(f"scale mapa_fit N={n:,} D={d} {label}: {res['fit_wall_s']:.1f}s "
                f"(cpu {res['fit_cpu_s']:.1f}s) peak {peak:.0f} MiB KL={res['kl']:.4f}")
            save_raw()

    # 2. time per epoch against N at a fixed batch size
    epoch_n = {**cfg["epoch_n"], **(cfg.get("big_epoch_n", {}) if big else {})}
    for n, (epochs, repeats) in epoch_n.items():
        res, _ = run_worker({"task": "epoch_times", "n": n, "epochs": epochs,
                             "repeats": repeats, "batch_size": cfg["epoch_batch_size"]})
        for est, r in res.items():
            records["epochs"].append({"n": n, "epochs": epochs, "estimator": est, **r})
            log(f"scale epochs N={n:,} {est}: {r['wall_per_epoch_s']:.3f} s/epoch "
                f"(cpu {r['cpu_per_epoch_s']:.3f})")
        save_raw()

    # 3. score_samples throughput, memory and accuracy, n_components=2
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("MAPA", "VAE", "IWAE"):
            path = os.path.join(tmp, f"{name}.pkl")
            fit_res, fit_peak = run_worker({
                "task": "fit_pickle", "estimator": name, "n": cfg["score_fit_n"],
                "params": cfg["score_fit_params"].get(name, {}), "path": path,
            })
            res, peak = run_worker({
                "task": "score", "path": path, "n_rows": cfg["score_rows"],
                "n_accuracy": cfg["accuracy_rows"],
                "n_resolution_check": cfg["resolution_rows"],
            })
            rec = {"estimator": name, "n_rows": cfg["score_rows"],
                   **{f"fit_{k}" if not k.startswith("fit") else k: v
                      for k, v in fit_res.items()},
                   **res, "peak_rss_mib": peak}
            records["score"].append(rec)
            log(f"scale score {name}: {res['rows_per_s']:.0f} rows/s, peak {peak:.0f} MiB, "
                f"IS-quad MAE {res['is_minus_quad_mae']:.4f}")
            save_raw()

    write_report(records, cfg, out_dir, env, big)
    return records


def write_report(records, cfg, out_dir, env, big):
    parts = [
        "# Benchmark `scale`: time and memory against N",
        "",
        "Spiral data (`make_spiral`, noise 0.05): 2-D, and for D = 10 rotated into 10 "
        "dimensions with the same noise in the 8 extra ones (exact density; "
        "`benchmarks._common.spiral_data`). Each row is one fresh "
        "subprocess: peak RSS is that process's high-water mark (`ru_maxrss` of "
        "the child, via `os.wait4`), which includes the Python interpreter, "
        "numpy, scikit-learn and torch; 'before' is the resident memory just "
        "before the measured call, after the data were made and a few tiny warm-up "
        "fits were run (so the one-off lazy imports and first-use costs of a first "
        "`fit` are excluded from the timings); 'peak - before' is what the measured "
        "call added at its peak.",
        "",
        *environment_section(env),
        "## MAPADensity.fit against N (`n_components=1`, whole budget run)",
        "",
        "Settings keep about 2000 phase-1 and 800 phase-2 gradient steps at every N "
        "(the batch grows with N). 'a-priori part only' is the same fit with "
        "`max_iter=0, refine_iter=0`: neighbour search, MAPA weights, statistics, "
        "spectral codes, and the fitted state for scoring. KL: held-out, 5000 test rows.",
        "",
    ]
    rows = []
    for r in records["mapa_fit"]:
        rows.append([
            f"{r['n']:,}", r.get("n_features", 2), r["what"], r["batch_size"], r["max_iter"], r["refine_iter"],
            fmt(r["fit_wall_s"]), fmt(r["fit_cpu_s"]), fmt(r["row_passes"] / 1e6),
            fmt(r["rss_before_fit_mib"]), fmt(r["peak_rss_mib"]),
            fmt(r["peak_rss_mib"] - r["rss_before_fit_mib"]), fmt(r["kl"]),
        ])
    parts += [
        md_table(["N", "D", "run", "batch", "max_iter", "refine_iter", "fit wall (s)",
                  "fit CPU (s)", "Mrow-passes", "RSS before (MiB)", "peak RSS (MiB)",
                  "peak - before (MiB)", "KL"], rows,
                 align=["--:", "--:", "---"] + ["--:"] * 10),
        "",
    ]
    if not big:
        parts += ["N = 1,000,000 is run only with `--big`.", ""]

    parts += [
        f"## Time per epoch against N (batch_size={cfg['epoch_batch_size']}, "
        "`n_components=1`)",
        "",
        "(fit(`max_iter=E`) - fit(`max_iter=0`)) / (epochs run), so the fixed per-fit "
        "cost (MAPA's a-priori part, building the scoring state) is excluded; median "
        "over the repeats (R) of that pair of fits, in one fresh process per N. With "
        "`n_components=1` MAPA's `max_iter=E` also runs two short phase-1 trials "
        "(`min(E, 15)` epochs each) to choose the code initialisation, so its "
        "phase-1 'epochs run' (decoder row-passes / N) exceed E. Linear scaling shows as a constant microseconds per "
        "row. MAPA phase 1 is an epoch over atoms (one decoder pass per atom), "
        "phase 2 an epoch over rows with `refine_samples=4` draws.",
        "",
    ]
    rows = []
    for r in records["epochs"]:
        rows.append([
            f"{r['n']:,}", r["estimator"], r["epochs"], fmt(r["epochs_run"]), r["repeats"],
            fmt(r["wall_per_epoch_s"]),
            fmt(r["cpu_per_epoch_s"]), fmt(1e6 * r["cpu_per_epoch_s"] / r["n"]),
            fmt(r["fixed_wall_s"]),
        ])
    parts += [
        md_table(["N", "estimator", "E", "epochs run", "R", "wall s/epoch", "CPU s/epoch",
                  "CPU us/row/epoch", "fixed cost: fit(0) wall (s)"], rows,
                 align=["--:", "---"] + ["--:"] * 7),
        "",
    ]

    fit_desc = cfg["score_fit_params"] or "package defaults"
    parts += [
        "## score_samples: throughput, memory and accuracy (`n_components=2`)",
        "",
        f"Each estimator is fitted on {cfg['score_fit_n']:,} spiral rows "
        f"(`n_components=2`, {fit_desc}) in one subprocess and pickled; a second "
        f"subprocess loads it and scores {cfg['score_rows']:,} new rows with "
        "`score_samples` (importance sampling, `n_eval_samples=1024`). Accuracy: "
        f"on {cfg['accuracy_rows']:,} rows, `est._log_px(X, 'importance')` against "
        "`est._log_px(X, 'quadrature')` (513 x 513 latent grid); the grid itself "
        f"is checked against a 1025 x 1025 grid on {cfg['resolution_rows']} rows. "
        "KL columns: held-out KL on the accuracy rows with each estimate of log p(x).",
        "",
    ]
    rows = []
    for r in records["score"]:
        rows.append([
            r["estimator"], fmt(r["fit_wall_s"]), f"{r['n_rows']:,}", fmt(r["score_wall_s"]),
            fmt(r["rows_per_s"]), fmt(r["peak_rss_mib"]),
            fmt(r["rss_peak_after_score_mib"] - r["rss_before_score_mib"]),
            fmt(r["is_minus_quad_mae"]), fmt(r["is_minus_quad_mean"]),
            fmt(r["quad_resolution_mae"]), fmt(r["kl_quadrature"]), fmt(r["kl_importance"]),
            fmt(r["quad_rows_per_s"]),
        ])
    parts += [
        md_table(["estimator", "fit wall (s)", "rows scored", "score wall (s)", "rows/s",
                  "peak RSS (MiB)", "scoring peak - before (MiB)", "mean abs(IS - quad)",
                  "IS - quad mean", "mean abs(quad513 - quad1025)", "KL (quad)",
                  "KL (IS)", "quadrature rows/s"], rows),
        "",
        "Raw values: `scale_raw.csv`.",
        "",
    ]
    with open(os.path.join(out_dir, "scale.md"), "w") as fh:
        fh.write("\n".join(parts))
