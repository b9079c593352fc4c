"""The README's main job: MAPA, VAE and IWAE on a spiral with a known density.

Fits MAPADensity, VAEDensity and IWAEDensity (one latent dimension, default
settings otherwise) to 2000 rows of ``skmapa.datasets.make_spiral``, and
prints for each the held-out log-likelihood, the true held-out
log-likelihood, their difference (the held-out KL divergence to the true
density, in nats per row), the fit time and the network row-passes of
training. Saves the learned densities next to the true one to
``skmapa_quickstart.png`` in the current directory.

Run with ``python examples/quickstart.py``; about a minute or two on a
laptop CPU. Not part of the documentation gallery (see ``plot_*.py`` there).
"""

import time
import warnings

import matplotlib

matplotlib.use("Agg")  # write the figure without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402

from skmapa import IWAEDensity, MAPADensity, VAEDensity  # noqa: E402
from skmapa.datasets import make_spiral  # noqa: E402

OUTPUT = "skmapa_quickstart.png"


def main():
    train = make_spiral(2000, random_state=0)
    test = make_spiral(5000, random_state=1)
    true_ll = float(np.mean(train.log_density(test.X)))

    estimators = {
        "MAPADensity": MAPADensity(n_components=1, random_state=0),
        "VAEDensity": VAEDensity(n_components=1, random_state=0),
        "IWAEDensity": IWAEDensity(n_components=1, random_state=0),
    }
    print(f"data: {train.DESCR}")
    print(f"{len(train.X)} training rows, {len(test.X)} held-out rows\n")
    header = (
        f"{'estimator':12s} {'held-out LL':>11s} {'true LL':>8s} {'KL':>7s} "
        f"{'fit (s)':>8s} {'row-passes':>11s}  converged"
    )
    print(header)
    print("-" * len(header))
    for name, est in estimators.items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            # reported in the 'converged' column instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(train.X)
        seconds = time.perf_counter() - start
        ll = est.score(test.X)
        passes = sum(est.n_row_passes_.values())
        print(
            f"{name:12s} {ll:11.4f} {true_ll:8.4f} {true_ll - ll:7.4f} "
            f"{seconds:8.1f} {passes:11,d}  {est.converged_}"
        )
    print("\nLL: mean log-likelihood per held-out row (nats); KL = true LL - LL.")

    lim = 1.25
    grid = np.linspace(-lim, lim, 150)
    xx, yy = np.meshgrid(grid, grid)
    points = np.column_stack([xx.ravel(), yy.ravel()])
    panels = {"true density": train.log_density(points)}
    for name, est in estimators.items():
        panels[name] = est.score_samples(points)
    vmax = np.exp(panels["true density"]).max()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, log_p) in zip(axes, panels.items()):
        ax.imshow(np.exp(log_p).reshape(xx.shape), origin="lower",
                  extent=(-lim, lim, -lim, lim), cmap="viridis", vmax=vmax)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(OUTPUT, dpi=100, bbox_inches="tight")
    print(f"saved {OUTPUT}")


if __name__ == "__main__":
    main()
