"""Held-out log-likelihood of MAPA's a-priori variants on data beyond one curve.

Not a suite of ``python -m benchmarks``: a script for measuring MAPA's
a-priori part (starts, kernel) against the other estimators on disconnected
data, clusters and 64-D digits::

    python -m benchmarks.apriori --sets moons05 moons10 --seeds 0 1 2 \\
        --estimators MAPA VAE IWAE KDE GMM
    python -m benchmarks.apriori --variant "perplexity" '{"kernel": "perplexity"}'
    python -m benchmarks.apriori --report

Every fit is at the package defaults except ``n_components`` (and the
variant's parameters); each line of ``apriori_raw.jsonl`` (in ``--out``) is one
(set, seed, estimator) with its held-out mean log-likelihood per row (nats,
standardized data, so the sets are comparable; digits in its ``[0, 1)``
dequantised units, per image), and, for sets with a true density, the
held-out KL. Fits already in the file are not refitted; ``--report`` prints
the medians over seeds.
"""

import argparse
import json
import os
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from . import _common

HERE = os.path.dirname(os.path.abspath(__file__))
#: Sets: name -> (n_components, loader(seed) -> (X_train, X_test, log_density or None)).
SETS = {}
N_TRAIN = N_TEST = 1000


def _register(name, n_components):
    def wrap(fn):
        SETS[name] = (n_components, fn)
        return fn
    return wrap


def _standardized(X_train, X_test):
    mu, sd = X_train.mean(0), X_train.std(0)
    return (X_train - mu) / sd, (X_test - mu) / sd


def _moons(noise):
    def load(seed):
        from sklearn.datasets import make_moons

        X, _ = make_moons(N_TRAIN + N_TEST, noise=noise, random_state=seed)
        return (*_standardized(X[:N_TRAIN], X[N_TRAIN:]), None)
    return load


for _d in (1, 2):
    _register(f"moons05-d{_d}", _d)(_moons(0.05))
    _register(f"moons10-d{_d}", _d)(_moons(0.1))


@_register("circles-d1", 1)
def _circles(seed):
    from sklearn.datasets import make_circles

    X, _ = make_circles(N_TRAIN + N_TEST, factor=0.5, noise=0.05, random_state=seed)
    return (*_standardized(X[:N_TRAIN], X[N_TRAIN:]), None)


@_register("blobs-d2", 2)
def _blobs(seed):
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(N_TRAIN + N_TEST, centers=3, cluster_std=[0.3, 1.0, 2.0],
                      random_state=seed)
    return (*_standardized(X[:N_TRAIN], X[N_TRAIN:]), None)


@_register("two_clusters-d1", 1)
def _two_clusters(seed):
    from skmapa.datasets import make_two_clusters

    train = make_two_clusters(N_TRAIN, random_state=seed)
    test = make_two_clusters(N_TEST, random_state=10_000 + seed)
    return train.X, test.X, test.log_density


@_register("digits-d2", 2)
def _digits(seed):
    from .digits import dequantised_digits

    X = dequantised_digits()
    perm = np.random.RandomState(seed).permutation(len(X))
    cut = int(0.7 * len(X))
    return X[perm[:cut]], X[perm[cut:]], None


def _density_set(name):
    """One of the ``density`` suite's sets, as that suite draws it."""
    def load(seed):
        from skmapa.datasets import DATASETS

        from .density import FULL, TEST_SEED_OFFSET

        train = DATASETS[name](FULL["n_train"], random_state=seed)
        test = DATASETS[name](FULL["n_test"], random_state=TEST_SEED_OFFSET + seed)
        return train.X, test.X, test.log_density
    return load


for _name in ("circle", "spiral", "figure1", "absolute_value", "two_clusters"):
    _register(f"density:{_name}", 1)(_density_set(_name))


def fit_score(estimator, X_train, X_test, seed, n_components, params):
    """Fit one estimator and return (held-out log-likelihoods, record)."""
    from . import digits
    from .density import fit_gmm, fit_kde

    cfg = dict(kde_bandwidths=np.logspace(-2, 1, 31), cv_folds=5,
               gmm_components=list(range(1, 21)))
    if X_train.shape[1] > 10:  # digits: the grids of its own suite
        cfg.update(kde_bandwidths=digits.FULL["kde_bandwidths"],
                   gmm_grid=digits.FULL["gmm_grid"])
    rec = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if estimator in ("MAPA", "VAE", "IWAE"):
            est = _common.deep_estimator(estimator, seed, n_components=n_components,
                                         **params)
            est.fit(X_train)
            score = est.score_samples
            rec["noise_scale"] = float(np.mean(est.noise_scale_))
            if estimator == "MAPA":
                rec["init"] = max(est.init_scores_ or {"-": 0},
                                  key=lambda k: -(est.init_scores_ or {"-": 0})[k])
                rec["init_scores"] = json.dumps(
                    {k: round(v, 4) for k, v in (est.init_scores_ or {}).items()})
        elif estimator == "KDE":
            score, _ = fit_kde(X_train, seed, cfg)
        elif estimator == "GMM":
            score, _ = fit_gmm(X_train, seed, cfg)
        else:
            raise ValueError(estimator)
    rec["fit_s"] = round(time.perf_counter() - t0, 1)
    return score(X_test), rec


def _read(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def report(path, sets=None, seeds=None):
    rows = [r for r in _read(path) if seeds is None or int(r["seed"]) in seeds]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    present = list(dict.fromkeys(r["set"] for r in rows))
    sets = [s for s in sets or present if s in present]
    print("median held-out log-likelihood per row over seeds [seeds]; KL where known")
    print("| set | " + " | ".join(labels) + " |")
    print("|---|" + "--:|" * len(labels))
    for s in sets:
        cells = []
        for lab in labels:
            vals = [float(r["loglik"]) for r in rows if r["set"] == s and r["label"] == lab]
            kls = [float(r["kl"]) for r in rows
                   if r["set"] == s and r["label"] == lab and r.get("kl")]
            cell = f"{np.median(vals):.3f} [{len(vals)}]" if vals else "-"
            if kls:
                cell += f" (KL {np.median(kls):.3f})"
            cells.append(cell)
        print(f"| {s} | " + " | ".join(cells) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.apriori")
    p.add_argument("--sets", nargs="+",
                   default=[s for s in SETS if not s.startswith("density:")])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--estimators", nargs="+", default=["MAPA"])
    p.add_argument("--variant", nargs=2, metavar=("LABEL", "JSON"), default=None,
                   help="a label and MAPA parameters (JSON) for the MAPA runs")
    p.add_argument("--out", default=os.path.join(HERE, "results", "apriori"))
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "apriori_raw.jsonl")
    if args.report:
        report(path, args.sets, args.seeds)
        return
    _common.setup_threads()
    label_suffix, mapa_params = ("", {})
    if args.variant:
        label_suffix, mapa_params = " " + args.variant[0], json.loads(args.variant[1])
    done = {(r["set"], str(r["seed"]), r["label"]) for r in _read(path)}
    for s in args.sets:
        n_components, load = SETS[s]
        for seed in args.seeds:
            data = None
            for estimator in args.estimators:
                label = estimator + (label_suffix if estimator == "MAPA" else "")
                if (s, str(seed), label) in done:
                    continue
                if data is None:
                    data = load(seed)
                X_train, X_test, log_density = data
                params = mapa_params if estimator == "MAPA" else {}
                lp, rec = fit_score(estimator, X_train, X_test, seed, n_components, params)
                row = {"set": s, "seed": seed, "label": label,
                       "loglik": f"{np.mean(lp):.5f}",
                       "kl": f"{np.mean(log_density(X_test) - lp):.5f}"
                       if log_density else "", **rec}
                _common.log(f"{s} seed={seed} {label}: {row}")
                # one line per fit, appended: runs in parallel cannot lose rows
                with open(path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
