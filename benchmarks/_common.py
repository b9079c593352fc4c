"""Helpers shared by the benchmark suites: threads, environment, timing, tables."""

import csv
import datetime
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager

import numpy as np

#: Threads used by torch and by the BLAS/OpenMP pools (numpy, scikit-learn).
N_THREADS = 1

_LIMITER = None


def setup_threads(n_threads=N_THREADS):
    """Pin torch and the BLAS/OpenMP pools to ``n_threads``.

    The benchmark machine has 2 shared cores: small models run best on one
    thread, and OpenMP threads spin pathologically when the other core is
    busy. KernelDensity and GaussianMixture get the same single thread, so
    every estimator is timed under the same conditions.
    """
    global _LIMITER
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n_threads)
    _LIMITER = threadpool_limits(limits=n_threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="threadpoolctl")


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux, else ``platform``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except (AttributeError, OSError):
        return None


def code_version():
    """The commit of the working tree and the package files changed since (read-only git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("log", "-1", "--format=%h %s").strip()
    if not commit:
        return "unknown (not a git checkout)"
    if len(commit) > 90:
        commit = commit[:87] + "..."
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "skmapa").splitlines()
             if len(ln) > 3]
    return commit + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def environment():
    """Versions, threads and machine of this run, for the result files."""
    import sklearn
    import torch

    import skmapa

    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "code": code_version(),
        "python": platform.python_version(),
        "skmapa": skmapa.__version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "torch threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "logical cpus": os.cpu_count(),
        "load average at start (1, 5, 15 min)": load_average(),
    }


def environment_markdown(env, **extra):
    lines = ["| | |", "|---|---|"]
    for key, value in {**env, **extra}.items():
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines)


NOISE_NOTE = (
    "The machine is shared (2 logical cores, other engineers running tests "
    "at the same time): absolute times are noisy, and the load average at "
    "start and end is recorded above. Compare estimators through ratios "
    "measured in the same run (row-passes and FLOPs are exact counts and do "
    "not depend on load; CPU time is less sensitive to load than wall time)."
)


def environment_section(env):
    """The lines every report starts its body with: environment, load, noise note."""
    return [environment_markdown(env, **{"load average at end": load_average()}), "",
            NOISE_NOTE, ""]


def mean_sd(values, digits=3):
    """``mean ± sd`` (ddof=1) of the non-NaN values; one value alone; 'n/a' if none."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


@contextmanager
def timed():
    """Measure wall time (perf_counter) and this process's CPU time."""
    out = {}
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall"] = time.perf_counter() - w0
        out["cpu"] = time.process_time() - c0


def md_table(headers, rows, align=None):
    """A markdown table; ``rows`` are lists of already formatted cells."""
    align = align or ["---"] + ["--:"] * (len(headers) - 1)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(align) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt(value):
    """Format a number compactly for a table (``-`` for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    v = float(value)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.3g}"
    if a >= 0.1:
        return f"{v:.3f}"
    if a >= 0.001:
        return f"{v:.4f}"
    return f"{v:.1e}"


def median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.median(values)) if values else float("nan")


def values_of(records, dataset, estimator, key):
    """``key`` of every record of ``dataset`` and ``estimator`` (seeds, folds)."""
    return [r.get(key) for r in records
            if r["dataset"] == dataset and r["estimator"] == estimator]


def write_report(out_dir, suite, parts):
    """Write ``<suite>.md`` from its lines ``parts``, ending with where the
    raw values are (``<suite>_raw.csv``, written by ``write_csv``)."""
    lines = [*parts, f"Raw values: `{suite}_raw.csv`.", ""]
    with open(os.path.join(out_dir, f"{suite}.md"), "w") as fh:
        fh.write("\n".join(lines))


def write_csv(path, records):
    """Write a list of flat dicts as CSV (columns: union of keys, in order)."""
    keys = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow({k: _csv_cell(r.get(k)) for k in keys})


def _csv_cell(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def deep_estimator(name, seed, n_components=1, **params):
    """One of the three deep estimators with the benchmark's fixed settings."""
    from skmapa import IWAEDensity, MAPADensity, VAEDensity

    cls = {"MAPA": MAPADensity, "VAE": VAEDensity, "IWAE": IWAEDensity}[name]
    if name == "IWAE":
        params.setdefault("k", 10)
    return cls(n_components=n_components, random_state=seed, device="cpu", **params)


#: Parameters that make a fit run its whole budget of epochs: ``tol=0`` alone
#: does not (an epoch whose smoothed loss does not decrease still counts as no
#: improvement, as in scikit-learn's MLP), so patience is made unbounded too.
FULL_BUDGET = dict(tol=0.0, n_iter_no_change=10**9)


def total_row_passes(est):
    return int(sum(est.n_row_passes_.values()))


def mean_loglik(estimator, X, y=None):
    """CV scorer: mean log-likelihood per row from ``score_samples``.

    ``KernelDensity.score`` is a sum over rows; scoring through
    ``score_samples`` makes every fold comparable whatever its size.
    """
    return float(np.mean(estimator.score_samples(X)))


def python_command():
    return sys.executable


def spiral_data(n_samples, n_features=2, random_state=0):
    """``make_spiral`` data, rotated into ``n_features`` dimensions.

    The extra coordinates carry the spiral's isotropic noise alone and the
    whole is rotated by a fixed random orthogonal matrix, so the data lie
    near a 1-D curve in general position and the exact density factorises:
    ``log p(x) = log p_spiral(y[:2]) + sum_j log N(y[j]; 0, noise^2)`` with
    ``y = Q^T x``. Returns ``(X, log_density)``.
    """
    from scipy.stats import norm

    from skmapa.datasets import make_spiral

    base = make_spiral(n_samples, random_state=random_state)
    if n_features == 2:
        return base.X, base.log_density
    rng = np.random.RandomState(random_state)
    Q, _ = np.linalg.qr(np.random.RandomState(12345).normal(size=(n_features, n_features)))
    extra = base.noise * rng.normal(size=(n_samples, n_features - 2))
    X = np.hstack([base.X, extra]) @ Q.T

    def log_density(X):
        Y = np.asarray(X) @ Q
        return base.log_density(Y[:, :2]) + norm.logpdf(Y[:, 2:], scale=base.noise).sum(1)

    return X, log_density


def warm_up():
    """Pay the one-off costs of a first fit (lazy imports, first use of
    torch.func, spectral embedding) before timing anything.

    Only 2-D latents: with one latent dimension, fitting builds an adaptive
    quadrature grid whose size depends on the decoder, and a barely trained
    warm-up decoder could raise the process's memory high-water mark above
    what the measured call needs.
    """
    from skmapa import IWAEDensity, MAPADensity

    X = np.random.RandomState(0).normal(size=(64, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls, kw in ((IWAEDensity, {}), (MAPADensity, dict(refine_iter=1))):
            for d in (2,):
                est = cls(n_components=d, max_iter=1, n_eval_samples=16, random_state=0,
                          device="cpu", **kw).fit(X)
                est.score_samples(X[:4])
