"""Suite ``sizes``: a default fit at every data size, from 150 rows up.

The training-budget issue asks that a default fit reach its plateau at every
size without wasted work, with targets for ``MAPADensity(n_components=1)``:
150 rows in at most 5 s, and 3*10^5 rows of a 2-D curve in at most 3 minutes
on one thread with a held-out KL of at most 0.03. Each fit here is one fresh
subprocess (``benchmarks._worker``, task ``mapa_fit``): the spiral rows of
``benchmarks._common.spiral_data`` (2-D, exact density), package defaults
except ``n_components=1``, one torch thread; the held-out KL is on 5000 test
rows, and peak memory is the child's high-water mark.
"""

import os

import numpy as np

from ._common import environment_section, fmt, log, md_table, write_csv
from .scale import run_worker

FULL = dict(
    sizes={"MAPA": [150, 1_000, 10_000, 100_000, 300_000],
           "VAE": [150, 1_000, 10_000], "IWAE": [150, 1_000, 10_000]},
    big_sizes={"MAPA": [1_000_000]},
    seeds=[0, 1],
)
QUICK = dict(sizes={"MAPA": [150], "VAE": [150], "IWAE": [150]}, big_sizes={}, seeds=[0])

#: Targets of the training-budget issue (``MAPADensity(n_components=1)``).
TARGET_150_S = 5.0
TARGET_3E5_S = 180.0
TARGET_3E5_KL = 0.03


def run(cfg, out_dir, env, big=False):
    records = []
    sizes = {name: list(ns) + (cfg["big_sizes"].get(name, []) if big else [])
             for name, ns in cfg["sizes"].items()}
    for name, ns in sizes.items():
        for n in ns:
            for seed in cfg["seeds"]:
                res, peak = run_worker({"task": "mapa_fit", "estimator": name, "n": n,
                                        "seed": seed, "params": {}})
                records.append({"estimator": name, "n": n, "seed": seed, **res,
                                "peak_rss_mib": peak})
                log(f"sizes {name} N={n:,} seed {seed}: {res['fit_wall_s']:.1f}s "
                    f"({res['n_steps']} steps) KL={res['kl']:.4f} peak {peak:.0f} MiB")
                write_csv(os.path.join(out_dir, "sizes_raw.csv"), records)
    write_report(records, cfg, out_dir, env, big)
    return records


def _median(records, key):
    return float(np.median([r[key] for r in records]))


def write_report(records, cfg, out_dir, env, big):
    parts = [
        "# Benchmark `sizes`: a default fit at every data size",
        "",
        "Spiral rows (`benchmarks._common.spiral_data`, 2-D, exact density), package "
        "defaults except `n_components=1` (IWAE: `k=10`), one torch thread, each fit in "
        "a fresh subprocess after a few tiny warm-up fits; held-out KL on 5000 test "
        f"rows (seed 10000 + seed); seeds {cfg['seeds']}. 'steps': optimizer steps of "
        "every stage (`n_steps_`), 'epochs': `n_iter_`, 'converged': every stage "
        "stopped by the `tol` rule rather than its step cap; peak RSS: the child "
        "process's high-water mark (interpreter and libraries included).",
        "",
        *environment_section(env),
        "## Every fit",
        "",
    ]
    rows = [[r["estimator"], f"{r['n']:,}", r["seed"], fmt(r["fit_wall_s"]),
             fmt(r["fit_cpu_s"]), r["n_steps"], r["n_iter"], "yes" if r["converged"] else "no",
             fmt(r["row_passes"] / 1e6), fmt(r["peak_rss_mib"]), fmt(r["kl"])]
            for r in records]
    parts += [md_table(["estimator", "N", "seed", "fit wall (s)", "fit CPU (s)", "steps",
                        "epochs", "converged", "Mrow-passes", "peak RSS (MiB)", "KL"],
                       rows, align=["---"] + ["--:"] * 10), ""]

    parts += ["## Medians over seeds", ""]
    rows = []
    keys = sorted({(r["estimator"], r["n"]) for r in records},
                  key=lambda k: (["MAPA", "VAE", "IWAE"].index(k[0]), k[1]))
    for name, n in keys:
        group = [r for r in records if r["estimator"] == name and r["n"] == n]
        rows.append([name, f"{n:,}", fmt(_median(group, "fit_wall_s")),
                     fmt(_median(group, "n_steps")), fmt(_median(group, "row_passes") / 1e6),
                     fmt(_median(group, "peak_rss_mib")), fmt(_median(group, "kl"))])
    parts += [md_table(["estimator", "N", "fit wall (s)", "steps", "Mrow-passes",
                        "peak RSS (MiB)", "KL"], rows, align=["---"] + ["--:"] * 6), ""]

    parts += ["## Targets (`MAPADensity(n_components=1)`, defaults)", ""]
    lines = []
    small = [r for r in records if r["estimator"] == "MAPA" and r["n"] == 150]
    if small:
        wall = _median(small, "fit_wall_s")
        lines.append(f"- 150 rows in <= {TARGET_150_S:g} s: {fmt(wall)} s (median), "
                     f"{'met' if wall <= TARGET_150_S else 'missed'}.")
    large = [r for r in records if r["estimator"] == "MAPA" and r["n"] == 300_000]
    if large:
        walls = [r["fit_wall_s"] for r in large]
        kls = [r["kl"] for r in large]
        met = max(walls) <= TARGET_3E5_S and max(kls) <= TARGET_3E5_KL
        lines.append(f"- 300,000 rows in <= {TARGET_3E5_S:g} s with KL <= {TARGET_3E5_KL:g}: "
                     f"fit {', '.join(fmt(w) for w in walls)} s, KL "
                     f"{', '.join(fmt(k) for k in kls)} (seeds {cfg['seeds']}), "
                     f"{'met on every seed' if met else 'missed on at least one seed'}.")
    if not big and cfg["big_sizes"]:
        lines.append("- N = 1,000,000 runs only with `--big`.")
    parts += lines + ["", "Raw values: `sizes_raw.csv`.", ""]
    with open(os.path.join(out_dir, "sizes.md"), "w") as fh:
        fh.write("\n".join(parts))
