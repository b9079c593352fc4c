"""
Accuracy against computation
============================

How good a density does each estimator learn for a given amount of network
computation? This example fits :class:`~skmapa.MAPADensity`,
:class:`~skmapa.VAEDensity` and :class:`~skmapa.IWAEDensity` at a few training
budgets on a spiral and plots the held-out KL divergence to the true density
against the number of rows pushed through the networks during ``fit``
(``n_row_passes_``, summed over decoder and encoder). Row-passes are an exact
count, independent of the machine and its load.

Per epoch, MAPA's first phase costs one decoder pass per training row and no
encoder pass; a VAE costs an encoder and a decoder pass per row, an IWAE with
``k`` samples an encoder pass and ``k`` decoder passes. MAPA's refinement
phase (``refine_iter``) costs ``refine_samples`` decoder passes per row, or,
with one latent dimension (``refine_method='grid'``, the default there), 256
decoder passes per step shared by the whole minibatch.

The budgets are small so that the example runs in well under a minute; the
``benchmarks/`` suite of the repository has the full curves.
"""

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from skmapa import IWAEDensity, MAPADensity, VAEDensity
from skmapa.datasets import make_spiral

train = make_spiral(600, random_state=0)
test = make_spiral(2000, random_state=1)
true_ll = train.log_density(test.X).mean()

# ``tol=0`` runs each budget in full (no early convergence).
common = dict(n_components=1, tol=0.0, random_state=0)
budgets = {
    "MAPA": [MAPADensity(max_iter=m, refine_iter=r, **common)
             for m, r in [(10, 0), (30, 10), (90, 30)]],
    "VAE": [VAEDensity(max_iter=m, **common) for m in (10, 30, 90)],
    "IWAE": [IWAEDensity(k=5, max_iter=m, **common) for m in (10, 30, 90)],
}

curves = {}
for name, estimators in budgets.items():
    points = []
    for est in estimators:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(train.X)
        passes = sum(est.n_row_passes_.values())
        kl = true_ll - est.score(test.X)
        points.append((passes, kl))
        print(f"{name:5s} epochs {est.n_iter_:4d}  row-passes {passes:>9,}  KL {kl:.3f}")
    curves[name] = np.array(points)

# %%
# Plot
# ----
fig, ax = plt.subplots(figsize=(6, 4))
for name, pts in curves.items():
    ax.plot(pts[:, 0], pts[:, 1], "o-", label=name)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("network row-passes during fit")
ax.set_ylabel("held-out KL to the true density (nats)")
ax.set_title("spiral, 600 training rows, 1-D latent")
ax.legend()
fig.tight_layout()
plt.show()
