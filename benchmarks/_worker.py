"""One measurement of the ``scale`` and ``sizes`` suites, run in a fresh process.

``python -m benchmarks._worker '<json task>'`` prints one line ``RESULT
<json>``. Running each configuration in its own process keeps the peak
memory of one from hiding that of the next (``ru_maxrss`` is a high-water
mark); the parent reads this process's own peak through ``os.wait4``.
"""

import json
import pickle
import resource
import sys
import warnings

import numpy as np


def maxrss_mib():
    """Peak resident memory of this process so far, in MiB (Linux: KiB units)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def current_rss_mib():
    """Resident memory now, in MiB (Linux /proc; else the high-water mark)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return maxrss_mib()


from ._common import warm_up  # noqa: E402


def task_mapa_fit(task):
    from ._common import deep_estimator, spiral_data, timed, total_row_passes

    n = int(task["n"])
    d = int(task.get("n_features", 2))
    seed = int(task.get("seed", 0))
    warm_up()
    X, _ = spiral_data(n, d, random_state=seed)
    before = current_rss_mib()
    est = deep_estimator(task.get("estimator", "MAPA"), seed, n_components=1,
                         **task["params"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with timed() as t:
            est.fit(X)
    after = maxrss_mib()
    X_test, log_density = spiral_data(task.get("n_test", 5000), d,
                                      random_state=10_000 + seed)
    kl = float(np.mean(log_density(X_test) - est.score_samples(X_test)))
    return {
        "fit_wall_s": t["wall"],
        "fit_cpu_s": t["cpu"],
        "rss_before_fit_mib": before,
        "rss_peak_after_fit_mib": after,
        "kl": kl,
        "n_iter": int(est.n_iter_),
        "n_steps": int(est.n_steps_),
        "converged": bool(est.converged_),
        "row_passes": total_row_passes(est),
    }


def task_epoch_times(task):
    """Seconds per epoch of each estimator at one N: (fit(E) - fit(0)) / epochs.

    ``epochs`` is the number of epochs the E-epoch fit ran beyond the 0-epoch
    one, counted from the row-passes: with ``n_components=1`` MAPADensity
    scores two candidate code initialisations by a short phase-1 run each
    (``min(max_iter, 15)`` epochs), so ``max_iter=E`` runs more than E
    phase-1 epochs over the atoms; each of them costs one decoder pass per
    atom, so the phase-1 epochs run are ``decoder row-passes / N``.
    Median over ``repeats`` pairs of fits.
    """
    from skmapa.datasets import make_spiral

    from ._common import FULL_BUDGET, deep_estimator, timed, total_row_passes

    n = int(task["n"])
    E = int(task["epochs"])
    X = make_spiral(n, random_state=0).X
    warm_up()
    out = {}
    bs = int(task["batch_size"])
    runs = {
        "VAE": lambda e: ("VAE", dict(max_iter=e)),
        "IWAE": lambda e: ("IWAE", dict(max_iter=e)),
        "MAPA phase 1": lambda e: ("MAPA", dict(max_iter=e, refine_iter=0)),
        "MAPA phase 2": lambda e: ("MAPA", dict(max_iter=0, refine_iter=e)),
    }
    for label, make in runs.items():
        per = {"wall": [], "cpu": [], "fixed_wall": [], "fixed_cpu": [], "epochs": []}
        for _ in range(int(task["repeats"])):
            times, passes = {}, {}
            for e in (0, E):
                name, params = make(e)
                est = deep_estimator(name, 0, n_components=1, batch_size=bs,
                                     **FULL_BUDGET, **params)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with timed() as t:
                        est.fit(X)
                times[e] = t
                passes[e] = total_row_passes(est)
            epochs = (passes[E] - passes[0]) / n if label == "MAPA phase 1" else E
            for k in ("wall", "cpu"):
                per[k].append((times[E][k] - times[0][k]) / epochs)
                per["fixed_" + k].append(times[0][k])
            per["epochs"].append(epochs)
        out[label] = {
            "wall_per_epoch_s": float(np.median(per["wall"])),
            "cpu_per_epoch_s": float(np.median(per["cpu"])),
            "fixed_wall_s": float(np.median(per["fixed_wall"])),
            "fixed_cpu_s": float(np.median(per["fixed_cpu"])),
            "epochs_run": float(np.median(per["epochs"])),
            "repeats": int(task["repeats"]),
        }
    return out


def task_fit_pickle(task):
    """Fit one estimator with n_components=2 and pickle it for the scoring task."""
    from skmapa.datasets import make_spiral

    from ._common import deep_estimator, timed

    X = make_spiral(int(task["n"]), random_state=0).X
    warm_up()
    est = deep_estimator(task["estimator"], 0, n_components=2, **task.get("params", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with timed() as t:
            est.fit(X)
    with open(task["path"], "wb") as fh:
        pickle.dump(est, fh)
    return {"fit_wall_s": t["wall"], "fit_cpu_s": t["cpu"], "n_iter": int(est.n_iter_),
            "converged": bool(est.converged_)}


def task_score(task):
    """score_samples throughput and memory, then importance sampling vs quadrature."""
    from skmapa._base import QUADRATURE_2D_POINTS
    from skmapa.datasets import make_spiral

    from ._common import timed

    n_rows = int(task["n_rows"])
    n_acc = int(task["n_accuracy"])
    data = make_spiral(n_rows, random_state=20_000)
    X = data.X
    with open(task["path"], "rb") as fh:
        est = pickle.load(fh)
    warm_up()
    est.score_samples(X[:8])
    before = current_rss_mib()
    with timed() as t:
        lp = est.score_samples(X)
    after = maxrss_mib()
    assert np.all(np.isfinite(lp))
    Xa = X[:n_acc]
    lp_true = data.log_density(Xa)
    with timed() as tq:
        quad = est._log_px(Xa, "quadrature")
    with timed() as ti:
        imp = est._log_px(Xa, "importance")
    # the quadrature reference, checked against a grid twice as fine per
    # dimension (nested: every other node is shared) on the first rows
    n_check = int(task["n_resolution_check"])
    fine = 2 * QUADRATURE_2D_POINTS - 1
    quad_fine = est._log_px_quadrature(est._standardize(Xa[:n_check]), n_per_dim=fine)[0]
    quad_fine = quad_fine.double().cpu().numpy() - est._log_det()
    diff = imp - quad
    return {
        "score_wall_s": t["wall"],
        "score_cpu_s": t["cpu"],
        "rows_per_s": n_rows / t["wall"],
        "rss_before_score_mib": before,
        "rss_peak_after_score_mib": after,
        "is_minus_quad_mean": float(np.mean(diff)),
        "is_minus_quad_mae": float(np.mean(np.abs(diff))),
        "is_minus_quad_max": float(np.max(np.abs(diff))),
        "quad_resolution_mae": float(np.mean(np.abs(quad_fine - quad[:n_check]))),
        "kl_quadrature": float(np.mean(lp_true - quad)),
        "kl_importance": float(np.mean(lp_true - imp)),
        "quad_rows_per_s": n_acc / tq["wall"],
        "is_rows_per_s": n_acc / ti["wall"],
    }


TASKS = {
    "mapa_fit": task_mapa_fit,
    "epoch_times": task_epoch_times,
    "fit_pickle": task_fit_pickle,
    "score": task_score,
}


def main():
    from ._common import setup_threads

    setup_threads()
    task = json.loads(sys.argv[1])
    result = TASKS[task["task"]](task)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
