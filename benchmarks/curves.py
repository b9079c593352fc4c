"""Suite ``curves``: held-out KL against training cost for the three deep estimators.

Each point is an independent fit that runs its whole budget (``tol=0`` and
unbounded ``n_iter_no_change``) at one budget: ``max_iter`` epochs for VAE and IWAE, ``(max_iter,
refine_iter)`` for MAPA. Cost is measured as network row-passes during
``fit`` (an exact count, independent of the machine's load) and as wall
time. A cross-validated GaussianMixture gives a reference line.
"""

import os
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from skmapa.datasets import DATASETS

from ._common import (
    FULL_BUDGET,
    deep_estimator,
    environment_section,
    fmt,
    log,
    md_table,
    median,
    timed,
    total_row_passes,
    write_csv,
)
from .density import TEST_SEED_OFFSET, fit_gmm

FULL = dict(
    n_train=2000,
    n_test=5000,
    seeds=[0],
    budgets={
        "MAPA": [(10, 0), (25, 5), (50, 10), (100, 20), (250, 60), (400, 120)],
        "VAE": [10, 25, 50, 100, 200, 400],
        "IWAE": [10, 25, 50, 100, 200, 400],
    },
    gmm_components=list(range(1, 16)),
    cv_folds=5,
)
QUICK = dict(
    n_train=300,
    n_test=500,
    seeds=[0],
    budgets={
        "MAPA": [(3, 0), (10, 2)],
        "VAE": [3, 10],
        "IWAE": [3, 10],
    },
    gmm_components=list(range(1, 5)),
    cv_folds=3,
)

COLORS = {"MAPA": "C0", "VAE": "C1", "IWAE": "C2"}


def _params(name, budget):
    if name == "MAPA":
        return dict(max_iter=budget[0], refine_iter=budget[1], **FULL_BUDGET)
    return dict(max_iter=budget, **FULL_BUDGET)


def _budget_label(budget):
    return f"{budget[0]}+{budget[1]}" if isinstance(budget, tuple) else str(budget)


def run(cfg, out_dir, env, datasets=None):
    datasets = datasets or list(DATASETS)
    records, refs = [], []
    for ds in datasets:
        gen = DATASETS[ds]
        for seed in cfg["seeds"]:
            train = gen(cfg["n_train"], random_state=seed)
            test = gen(cfg["n_test"], random_state=TEST_SEED_OFFSET + seed)
            lp_true = test.log_density(test.X)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                score, extra = fit_gmm(train.X, seed, cfg)
            refs.append({"dataset": ds, "seed": seed,
                         "kl": float(np.mean(lp_true - score(test.X)))})
            for name, budgets in cfg["budgets"].items():
                for budget in budgets:
                    est = deep_estimator(name, seed, n_components=1, **_params(name, budget))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        with timed() as t:
                            est.fit(train.X)
                    kl = float(np.mean(lp_true - est.score_samples(test.X)))
                    rec = {
                        "dataset": ds,
                        "seed": seed,
                        "estimator": name,
                        "budget": _budget_label(budget),
                        "epochs_run": int(est.n_iter_),
                        "kl": kl,
                        "row_passes": total_row_passes(est),
                        "flops": int(est.n_flops_),
                        "fit_wall_s": t["wall"],
                        "fit_cpu_s": t["cpu"],
                    }
                    records.append(rec)
                    log(
                        f"curves {ds} seed={seed} {name} {rec['budget']}: KL={kl:.4f} "
                        f"passes={rec['row_passes']:,} fit={t['wall']:.1f}s"
                    )
                write_csv(os.path.join(out_dir, "curves_raw.csv"), records)
    write_report(records, refs, cfg, out_dir, env, datasets)
    plot(records, refs, cfg, out_dir, datasets)
    return records


def _points(records, ds, name, budgets):
    """(budget label, median KL, median passes, median wall) per budget."""
    out = []
    for b in budgets:
        lab = _budget_label(b)
        sel = [r for r in records if r["dataset"] == ds and r["estimator"] == name
               and r["budget"] == lab]
        if not sel:
            continue
        out.append((
            lab,
            median([r["kl"] for r in sel]),
            median([r["row_passes"] for r in sel]),
            median([r["fit_wall_s"] for r in sel]),
            median([r["fit_cpu_s"] for r in sel]),
        ))
    return out


def write_report(records, refs, cfg, out_dir, env, datasets):
    seeds = cfg["seeds"]
    agg = "median over seeds " + str(seeds) if len(seeds) > 1 else f"seed {seeds[0]}"
    parts = [
        "# Benchmark `curves`: KL against training cost",
        "",
        f"Train N={cfg['n_train']}, test N={cfg['n_test']}, {agg}, `n_components=1`, "
        "`tol=0, n_iter_no_change=10**9` (every budget is run in full: `tol=0` "
        "alone still stops after `n_iter_no_change` epochs without any decrease), other parameters at defaults "
        "(IWAE k=10). Budget: epochs (`max_iter`) for VAE/IWAE; "
        "`max_iter+refine_iter` (phase-1 epochs over atoms + phase-2 epochs over "
        "rows) for MAPA. Each point is an independent fit. GMM: full covariance, "
        "size chosen by CV (reference).",
        "",
        *environment_section(env),
        "Plots: `curves_rowpasses.png` (KL vs row-passes), `curves_time.png` "
        "(KL vs fit wall time).",
        "",
    ]
    for ds in datasets:
        ref = median([r["kl"] for r in refs if r["dataset"] == ds])
        parts += [f"## {ds} (GMM-CV reference KL: {fmt(ref)})", ""]
        rows = []
        for name, budgets in cfg["budgets"].items():
            for lab, kl, passes, wall, cpu in _points(records, ds, name, budgets):
                rows.append([name, lab, fmt(kl), fmt(passes / 1e6), fmt(wall), fmt(cpu)])
        parts += [
            md_table(["estimator", "budget", "KL (nats)", "Mrow-passes", "fit wall (s)",
                      "fit CPU (s)"], rows, align=["---", "--:", "--:", "--:", "--:", "--:"]),
            "",
        ]
    parts += ["Per-fit values: `curves_raw.csv`.", ""]
    with open(os.path.join(out_dir, "curves.md"), "w") as fh:
        fh.write("\n".join(parts))


def plot(records, refs, cfg, out_dir, datasets):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for xkey, fname, xlabel in (
        (2, "curves_rowpasses.png", "network row-passes during fit"),
        (3, "curves_time.png", "fit wall time (s)"),
    ):
        n = len(datasets)
        fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 2.9), squeeze=False)
        for ax, ds in zip(axes[0], datasets):
            for name, budgets in cfg["budgets"].items():
                pts = _points(records, ds, name, budgets)
                if not pts:
                    continue
                x = [p[xkey] for p in pts]
                y = [p[1] for p in pts]
                ax.plot(x, y, "o-", color=COLORS[name], label=name, ms=3)
            ref = median([r["kl"] for r in refs if r["dataset"] == ds])
            ax.axhline(ref, color="k", ls="--", lw=0.8, label="GMM (CV)")
            ax.set_xscale("log")
            kls = [r["kl"] for r in records if r["dataset"] == ds] + [ref]
            if min(kls) > 0:
                ax.set_yscale("log")
            else:  # a near-perfect fit can have a slightly negative estimate
                ax.set_yscale("symlog", linthresh=0.01)
                ax.set_ylim(bottom=1.5 * min(kls))
            ax.set_title(ds, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", lw=0.3, alpha=0.5)
        axes[0][0].set_ylabel("held-out KL (nats)", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=80)
        plt.close(fig)
