"""Suite ``threads``: default fits on a busy machine (``n_threads='auto'``).

A default fit (``MAPADensity`` and ``VAEDensity``, ``n_components=1``) of
spiral rows, timed in three setups and two machine states, interleaved,
median over repeats:

* ``one thread``: torch set to 1 thread, ``n_threads=None`` (the reference);
* ``default``: torch at the machine's thread count (``os.cpu_count()``), the
  estimator's default ``n_threads='auto'`` (which picks the threads);
* ``all threads``: torch at the machine's thread count, ``n_threads=None``
  (what fits did before ``n_threads`` existed).

Machine states: idle (this suite's process only), and busy: one extra
process spinning on one core for the whole measurement. The target of the
training-budget issue: default / one-thread <= 1.5 when busy, and the
default no slower than before when idle.
"""

import os
import subprocess
import sys
import numpy as np
from ._common import environment_section, fmt, log, md_table, timed, write_csv, write_report

FULL = dict(n=2000, repeats=2, estimators=("MAPA", "VAE"), cap_s=30)
QUICK = dict(n=300, repeats=1, estimators=("VAE",), cap_s=30)

SPIN = "while True: pass"


FIT = """
import time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads({threads})
import skmapa
from skmapa.datasets import make_spiral
X = make_spiral({n}, random_state=0).X
est = skmapa.{cls}(n_components=1, random_state=0, n_threads={n_threads!r})
t = time.perf_counter()
est.fit(X)
print(time.perf_counter() - t)
"""


def _fit(name, n, threads, n_threads, cap_s):
    """Wall time of one fit in a fresh process (``cap_s`` and NaN if it runs longer)."""
    cls = {"MAPA": "MAPADensity", "VAE": "VAEDensity"}[name]
    code = FIT.format(threads=threads, n=n, cls=cls, n_threads=n_threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=cap_s, env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return float("nan")


def run(cfg, out_dir, env, datasets=None):
    all_threads = os.cpu_count() or 1
    setups = [("one thread", 1, None), ("default (n_threads='auto')", all_threads, "auto"),
              ("all threads (n_threads=None)", all_threads, None)]
    records = []
    for state in ("idle", "busy"):
        spinner = (subprocess.Popen([sys.executable, "-c", SPIN]) if state == "busy"
                   else None)
        try:
            for rep in range(cfg["repeats"]):
                for name in cfg["estimators"]:
                    for label, threads, n_threads in setups:
                        wall = _fit(name, cfg["n"], threads, n_threads, cfg["cap_s"])
                        records.append({"state": state, "estimator": name, "setup": label,
                                        "repeat": rep, "wall_s": wall})
                        log(f"threads {state} {name} {label} repeat {rep}: {wall:.1f}s")
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    write_csv(os.path.join(out_dir, "threads_raw.csv"), records)

    def med(state, name, label):
        return float(np.median([r["wall_s"] for r in records if (r["state"], r["estimator"],
                                r["setup"]) == (state, name, label)]))

    rows = []
    for state in ("idle", "busy"):
        for name in cfg["estimators"]:
            ref = med(state, name, setups[0][0])
            for label, _, _ in setups:
                m = med(state, name, label)
                if np.isnan(m):  # every repeat ran past the cap
                    rows.append([state, name, label, f"> {cfg['cap_s']}",
                                 f"> {fmt(cfg['cap_s'] / ref)}"])
                else:
                    rows.append([state, name, label, fmt(m), fmt(m / ref)])
    parts = [
        "# Benchmark `threads`: default fits on an idle and a busy machine",
        "",
        f"Default `fit` (`n_components=1`) on {cfg['n']} spiral rows; wall time, median "
        f"over {cfg['repeats']} repeats (setups interleaved). 'busy': one extra process "
        f"spinning on one of the {all_threads} logical cores. Each fit runs in a fresh "
        f"process (torch and OMP_NUM_THREADS set there), stopped after {cfg['cap_s']} s "
        "(nan: it ran longer). Ratios are to the one-thread fit in the same state.",
        "",
        *environment_section(env),
        md_table(["machine", "estimator", "setup", "fit wall (s)", "/ one thread"], rows),
        "",
    ]
    write_report(out_dir, "threads", parts)
    return records
