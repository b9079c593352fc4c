"""Suite ``related``: LiBI and recursive mixture encoders next to MAPA, VAE and IWAE.

Runs MAPADensity and VAEDensity / IWAEDensity in several configurations
each on every synthetic data set of ``skmapa.datasets`` (1-D latent, exact
log-density) and writes ``related.md`` and ``related_raw.csv``::

    python -m benchmarks --suite related           # the full study
    python -m benchmarks --suite related --quick   # a smoke run (minutes)

Measured per fit (``n_components=1``, so log p(x) is exact quadrature):

* held-out KL: ``mean(log p_true(x) - score_samples(x))`` on test rows, in
  nats: the density error (0 is perfect, smaller is better);
* aggregate-posterior KL: ``KL(q_agg || N(0, 1))`` where ``q_agg(z) =
  (1/N) sum_i q(z | x_i)`` over the training rows, estimated by Monte Carlo
  with draws from q_agg and q_agg's exact mixture density: how far the
  codes the posterior approximation gives are from the prior the decoder is
  sampled from;
* ``mean`` and ``std`` of q_agg (the prior has 0 and 1);
* inference gap: ``mean(log p_model(x) - ELBO_q(x))`` on test rows, the ELBO
  of the estimator's own q with 256 draws per component, and log p_model by
  quadrature; equal to the mean ``KL(q(z|x) || p(z|x))``; for a mixture
  encoder also the gap of its first component alone;
* amortization gap (Cremer, Li & Duvenaud): ``ELBO(q*) - ELBO(q)`` with q*
  the best Gaussian of each row, by ``skmapa.diagnostics.inference_gaps``
  on the first 100 test rows (negative when a mixture q beats q*);
* held-out log-likelihood (mean ``score_samples``), epochs, fit seconds.

"q" is the encoder for VAE and IWAE (a Gaussian, or the recursive mixture)
and, for MAPA, its MAPA mixture over the neighbours' codes with the widened
Laplace widths of its scoring proposal (``skmapa.diagnostics``'s
convention): MAPA has no encoder, so its gaps measure how well that
data-only mixture matches the fitted model's posterior.

"VAE (same epochs)" and "IWAE (same epochs)" are controls: the Gaussian
encoder trained jointly for exactly the number of epochs the recursive
mixture took (all stages) on the same data and seed.
"""

import os
import time
import warnings

import numpy as np
import torch

from skmapa import IWAEDensity, MAPADensity, VAEDensity
from skmapa._objectives import mixture_elbo
from skmapa.datasets import DATASETS
from skmapa.diagnostics import _own_q

from ._common import (
    environment_section,
    log,
    md_table,
    mean_sd,
    total_row_passes,
    write_csv,
)

#: (estimator class, extra parameters) of each configuration
CONFIGS = {
    "MAPA": (MAPADensity, {}),
    "VAE": (VAEDensity, {}),
    "VAE libi": (VAEDensity, {"training": "libi"}),
    "VAE recursive": (VAEDensity, {"encoder": "recursive"}),
    "VAE libi+recursive": (VAEDensity, {"training": "libi", "encoder": "recursive"}),
    "IWAE": (IWAEDensity, {}),
    "IWAE libi": (IWAEDensity, {"training": "libi"}),
    "IWAE recursive": (IWAEDensity, {"encoder": "recursive"}),
}
#: Controls: the Gaussian encoder trained jointly for exactly as many epochs
#: as the recursive mixture took (all its stages) on the same data and seed,
#: without early stopping: separates the effect of the mixture from that of
#: the extra epochs its stages run. Run after the configurations they match.
MATCHED = {
    "VAE (same epochs)": (VAEDensity, "VAE recursive"),
    "IWAE (same epochs)": (IWAEDensity, "IWAE recursive"),
}
#: The columns of the two parts of the report.
LIBI_COLUMNS = ["MAPA", "VAE", "VAE libi", "IWAE", "IWAE libi"]
RECURSIVE_COLUMNS = ["MAPA", "VAE", "VAE (same epochs)", "VAE recursive", "VAE libi",
                     "VAE libi+recursive", "IWAE", "IWAE (same epochs)", "IWAE recursive"]
#: Test rows and settings of skmapa.diagnostics.inference_gaps (the amortization gap).
GAP_ROWS = 100
GAP_SETTINGS = dict(n_samples=1024, n_ais_steps=200, n_ais_chains=16, n_opt_iter=200,
                    n_elbo_samples=256)
COMMON = dict(n_components=1)
AGG_DRAWS = 4000
ELBO_DRAWS = 256

FULL = dict(n_train=1000, n_test=2000, seeds=[0, 1], max_iter=200,
            datasets=list(DATASETS), configs=list(CONFIGS), jobs=2)
QUICK = dict(n_train=500, n_test=500, seeds=[0], max_iter=20,
             datasets=list(DATASETS)[:2], configs=list(CONFIGS), jobs=2)


def encoder_mixture(est, X):
    """The estimator's own q(z | x) of each row as a mixture (means, log_stds, log_w)."""
    with torch.no_grad():
        return _own_q(est, est._standardize(X))


def aggregate_posterior(est, X, seed=0):
    """KL(q_agg || N(0, I)) by Monte Carlo, and q_agg's mean and std (1-D)."""
    means, log_stds, log_w = (t.double() for t in encoder_mixture(est, X))
    n, C, d = means.shape
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(n, (AGG_DRAWS,), generator=g)
    comp = torch.multinomial(torch.exp(log_w[rows]), 1, generator=g).squeeze(1)
    z = means[rows, comp] + torch.exp(log_stds[rows, comp]) * torch.randn(
        (AGG_DRAWS, d), generator=g, dtype=torch.float64
    )
    flat_m, flat_s = means.reshape(n * C, d), torch.exp(log_stds).reshape(n * C, d)
    flat_w = log_w.reshape(n * C) - np.log(n)
    log_q = []
    for zb in z.split(500):
        lp = -0.5 * (((zb[:, None] - flat_m) / flat_s) ** 2).sum(-1) - torch.log(
            flat_s
        ).sum(-1) - 0.5 * d * np.log(2 * np.pi)
        log_q.append(torch.logsumexp(lp + flat_w, dim=1))
    log_q = torch.cat(log_q)
    log_p = -0.5 * (z**2).sum(-1) - 0.5 * d * np.log(2 * np.pi)
    w = torch.exp(log_w)
    mean = float((w[..., None] * means).sum(1).mean())
    second = float((w[..., None] * (means**2 + torch.exp(2 * log_stds))).sum(1).mean())
    return float((log_q - log_p).mean()), mean, float(np.sqrt(max(second - mean**2, 0)))


def inference_gap(est, X, seed=0, first_only=False):
    """mean(log p_model(x) - ELBO_q(x)): quadrature minus a 256-draw ELBO.

    ``first_only``: the ELBO of the first mixture component alone.
    """
    log_px = est._log_px(X, "quadrature") + est._log_det()
    Xs = est._standardize(X)
    mixture = encoder_mixture(est, X)
    if first_only:
        mixture = (mixture[0][:, :1], mixture[1][:, :1], torch.zeros_like(mixture[2][:, :1]))
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, Xs.shape[0], 256):
            part = tuple(t[i:i + 256] for t in mixture)
            eps = torch.randn((ELBO_DRAWS, *part[0].shape), generator=g,
                              dtype=torch.float64).to(Xs.dtype)
            out.append(mixture_elbo(Xs[i:i + 256], est.decoder_, *part, eps)[0])
    elbo = torch.cat(out).double().numpy()
    return float(np.mean(log_px - elbo))


def amortization_gap(est, X, seed=0):
    """Cremer et al.'s amortization gap, mean over rows, by skmapa.diagnostics.

    ``ELBO(q*) - ELBO(q)`` with q* the best diagonal Gaussian of each row;
    NaN where ``inference_gaps`` is unavailable or does not support the
    estimator's encoder.
    """
    try:
        from skmapa.diagnostics import inference_gaps

        gaps = inference_gaps(est, X, random_state=seed, **GAP_SETTINGS)
    except (ImportError, TypeError, ValueError, RuntimeError):
        return float("nan")
    return float(gaps.summary["amortization_gap"])


def run_one(dataset, label, seed, n_train, n_test, max_iter, epochs=None):
    """Fit one configuration; ``epochs``: run exactly that many (a control)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    make = DATASETS[dataset]
    train = make(n_samples=n_train, random_state=1000 + seed)
    test = make(n_samples=n_test, random_state=2000 + seed)
    if epochs is None:
        cls, extra = CONFIGS[label]
        est = cls(**COMMON, **extra, max_iter=max_iter, random_state=seed)
    else:
        cls, extra = MATCHED[label][0], {}
        est = cls(**COMMON, max_iter=epochs, n_iter_no_change=epochs,
                  random_state=seed)
    start = time.perf_counter()
    est.fit(train.X)
    seconds = time.perf_counter() - start
    score = est.score_samples(test.X)
    agg_kl, agg_mean, agg_std = aggregate_posterior(est, train.X, seed)
    row = {
        "dataset": dataset,
        "config": label,
        "seed": seed,
        "heldout_kl": float(np.mean(test.log_density(test.X) - score)),
        "heldout_ll": float(np.mean(score)),
        "agg_kl": agg_kl,
        "agg_mean": agg_mean,
        "agg_std": agg_std,
        "gap": inference_gap(est, test.X, seed),
        "gap_first": (inference_gap(est, test.X, seed, first_only=True)
                      if extra.get("encoder") == "recursive" else float("nan")),
        "amortization_gap": amortization_gap(est, test.X[:GAP_ROWS], seed),
        "epochs": int(est.n_iter_),
        "seconds": seconds,
        "mrow_passes": total_row_passes(est) / 1e6,
    }
    log("related " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()))
    return row


def table(rows, datasets, configs, key, digits=3):
    cells = [
        [ds] + [mean_sd([r[key] for r in rows if r["dataset"] == ds and r["config"] == c],
                     digits) for c in configs]
        for ds in datasets
    ]
    return md_table(["data set", *configs], cells, align=["---"] * (len(configs) + 1))


def write_report(rows, cfg, out_dir, env):
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    configs = [c for c in [*CONFIGS, *MATCHED] if any(r["config"] == c for r in rows)]
    libi = [c for c in LIBI_COLUMNS if c in configs]
    recursive = [c for c in RECURSIVE_COLUMNS if c in configs]
    seeds = sorted({r["seed"] for r in rows})
    parts = [
        "# Benchmark `related`: LiBI and recursive mixture encoders next to MAPA, VAE, IWAE",
        "",
        f"Every data set of `skmapa.datasets` (1-D latent), {cfg['n_train']} training and "
        f"{cfg['n_test']} test rows (fresh draws), `n_components=1`, default networks "
        f"(64, 64), `max_iter={cfg['max_iter']}` per training stage (MAPA: its first "
        "phase; its second phase keeps `refine_iter=60`) with the default convergence "
        f"criterion; seeds {seeds} (mean ± standard deviation over seeds); one torch "
        f"thread per fit, {cfg['jobs']} fit(s) at a time.",
        "",
        *environment_section(env),
        "Definitions (see the module docstring): held-out KL = mean(log p_true - "
        "score_samples) on test rows (nats, lower is better); aggregate-posterior KL = "
        "KL(q_agg || N(0, 1)) with q_agg = (1/N) sum_i q(z | x_i) over the training rows "
        f"(Monte Carlo, {AGG_DRAWS} draws, exact q_agg density); inference gap = "
        "mean(log p_model(x) - ELBO_q(x)) on test rows = mean KL(q(z|x) || p(z|x)) "
        f"(quadrature and a {ELBO_DRAWS}-draw ELBO). q is the encoder for VAE and IWAE, "
        "and for MAPA its MAPA mixture over the neighbours' codes (widened Laplace "
        "widths, as in its scoring proposal). \"(same epochs)\": the Gaussian "
        "encoder trained jointly for exactly as many epochs as the recursive mixture "
        "took on the same data and seed (no early stop), a control for the extra "
        "epochs of the mixture's stages.",
        "",
        "## Likelihood before inference (LiBI)",
        "",
        "### Held-out KL (nats)",
        "",
        table(rows, datasets, libi, "heldout_kl"),
        "",
        "### Aggregate-posterior KL to the prior (nats)",
        "",
        table(rows, datasets, libi, "agg_kl"),
        "",
        "### Aggregate posterior: standard deviation (prior: 1)",
        "",
        table(rows, datasets, libi, "agg_std", 2),
        "",
        "### Aggregate posterior: mean (prior: 0)",
        "",
        table(rows, datasets, libi, "agg_mean", 2),
        "",
        "### Inference gap (nats)",
        "",
        table(rows, datasets, libi, "gap"),
        "",
        "## Recursive mixture encoder",
        "",
        "### Held-out log-likelihood (nats, higher is better)",
        "",
        table(rows, datasets, recursive, "heldout_ll"),
        "",
        "### Held-out KL (nats)",
        "",
        table(rows, datasets, recursive, "heldout_kl"),
        "",
        "### Inference gap log p(x) - ELBO (nats)",
        "",
        table(rows, datasets, recursive, "gap"),
        "",
        "### Inference gap of the first component alone (nats; same fitted model)",
        "",
        table(rows, datasets, [c for c in recursive if "recursive" in c], "gap_first"),
        "",
        "### Amortization gap ELBO(q*) - ELBO(q) (nats; `skmapa.diagnostics.inference_gaps`, "
        f"first {GAP_ROWS} test rows; q* the best Gaussian per row)",
        "",
        table(rows, datasets, recursive, "amortization_gap"),
        "",
        "### Aggregate-posterior KL to the prior (nats)",
        "",
        table(rows, datasets, recursive, "agg_kl"),
        "",
        "## Cost",
        "",
        "### Epochs (all stages)",
        "",
        table(rows, datasets, configs, "epochs", 0),
        "",
        "### Fit seconds",
        "",
        table(rows, datasets, configs, "seconds", 1),
        "",
        "### Network row-passes, all networks, training (millions; exact counts)",
        "",
        table(rows, datasets, configs, "mrow_passes", 2),
        "",
        "Raw values: `related_raw.csv`.",
        "",
    ]
    with open(os.path.join(out_dir, "related.md"), "w") as fh:
        fh.write("\n".join(parts))


def _run(tasks, jobs):
    if jobs > 1 and len(tasks) > 1:
        from joblib import Parallel, delayed

        return Parallel(n_jobs=jobs)(delayed(run_one)(*t) for t in tasks)
    return [run_one(*task) for task in tasks]


def run(cfg, out_dir, env, datasets=None):
    datasets = datasets or cfg["datasets"]
    common = (cfg["n_train"], cfg["n_test"], cfg["max_iter"])
    tasks = [(ds, c, seed, *common) for ds in datasets for seed in cfg["seeds"]
             for c in cfg["configs"]]
    rows = _run(tasks, cfg["jobs"])
    write_csv(os.path.join(out_dir, "related_raw.csv"), rows)
    matched = [
        (r["dataset"], label, r["seed"], *common, r["epochs"])
        for label, (_, source) in MATCHED.items()
        for r in rows
        if r["config"] == source
    ]
    rows += _run(matched, cfg["jobs"])
    write_csv(os.path.join(out_dir, "related_raw.csv"), rows)
    write_report(rows, cfg, out_dir, env)
    return rows
