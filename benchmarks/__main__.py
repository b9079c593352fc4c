"""Command line of the benchmarks: ``python -m benchmarks --help``."""

import argparse
import os
import time

from . import _common

SUITES = ("density", "curves", "scale", "related", "digits", "parallel", "refine", "real",
          "threads", "overfit", "zoo", "scoring", "sizes", "clusters", "structureless")
#: Suites that take ``--big`` (MAPADensity on 10^6 rows too).
BIG_SUITES = ("scale", "sizes")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run skmapa's benchmarks and write markdown tables and PNG "
        "plots under benchmarks/results/.",
    )
    p.add_argument("--suite", action="append", choices=SUITES + ("all",),
                   help="suite to run (repeatable; default: all)")
    p.add_argument("--quick", action="store_true",
                   help="small N, one seed, few epochs (a smoke test of a few minutes); results go "
                   "to benchmarks/results/quick/")
    p.add_argument("--big", action="store_true",
                   help="scale and sizes suites: also fit MAPADensity on 1e6 rows")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="restrict density/curves/related/refine/zoo to these data sets "
                   "(real: to these tables)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="override the seeds of density/curves/related/refine")
    p.add_argument("--out", default=None, help="output directory")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _common.setup_threads()
    from . import (clusters, curves, density, digits, overfit, parallel, real, refine,
                   related, scale, scoring, sizes, structureless, threads, zoo)

    suites = args.suite or ["all"]
    suites = list(SUITES) if "all" in suites else list(dict.fromkeys(suites))
    out = args.out or os.path.join(HERE, "results", "quick" if args.quick else "")
    os.makedirs(out, exist_ok=True)
    env = _common.environment()
    if args.quick:
        env["mode"] = "--quick (small N, one seed, few epochs: a smoke test, not results)"
    _common.log(f"environment: {env}")
    _common.warm_up()
    t_all = time.perf_counter()
    modules = {"density": density, "curves": curves, "scale": scale, "related": related,
               "digits": digits, "parallel": parallel, "refine": refine, "real": real,
               "threads": threads, "overfit": overfit, "zoo": zoo,
               "scoring": scoring, "sizes": sizes, "clusters": clusters,
               "structureless": structureless}
    for name in suites:
        mod = modules[name]
        cfg = dict(mod.QUICK if args.quick else mod.FULL)
        if args.seeds is not None and "seeds" in cfg:
            cfg["seeds"] = args.seeds
        t0 = time.perf_counter()
        _common.log(f"suite {name}: start")
        if name in BIG_SUITES:
            mod.run(cfg, out, env, big=args.big)
        else:
            mod.run(cfg, out, env, datasets=args.datasets)
        minutes = (time.perf_counter() - t0) / 60
        with open(os.path.join(out, f"{name}.md"), "a") as fh:
            fh.write(f"Suite wall time: {minutes:.1f} min "
                     f"(`python -m benchmarks --suite {name}"
                     f"{' --quick' if args.quick else ''}"
                     f"{' --big' if args.big and name in BIG_SUITES else ''}`).\n")
        _common.log(f"suite {name}: done in {minutes:.1f} min")
    _common.log(f"all done in {(time.perf_counter() - t_all) / 60:.1f} min; results in {out}")


if __name__ == "__main__":
    main()
