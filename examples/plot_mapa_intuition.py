"""
The intuition behind MAPA
=========================

Nearby points score highly under each other's posteriors; distant points do
not. MAPA turns this into a posterior approximation that needs no model at
all: for a point ``x``, a softmax over the distances to its ``k`` nearest
training rows,

.. math::

    q(m \\mid x) = \\operatorname{softmax}_m\\left(
    -\\lVert x - x_m \\rVert^2 / (2 \\tau^2) \\right).

It is the posterior over training indices ``m`` of the *empiricalized* model
(the prior replaced by the training codes) once the model fits the data; see
:ref:`mapa_formulation`. This example looks at the weights on a spiral whose
true codes are known.
"""

# %%
# The a-priori part of a fit
# --------------------------
# ``MAPADensity`` computes MAPA once, before training. With ``max_iter=0`` and
# ``refine_iter=0`` a fit stops right there: it standardizes the data, builds
# the neighbour index, picks the bandwidth ``bandwidth_`` and initialises the
# codes, and trains nothing.
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import spearmanr

from skmapa import MAPADensity
from skmapa.datasets import make_spiral
from skmapa.diagnostics import mapa_posterior

data = make_spiral(1000, random_state=0)
est = MAPADensity(n_components=1, max_iter=0, refine_iter=0, random_state=0)
est.fit(data.X)
print(f"k = {est.n_neighbors_}, bandwidth (standardized units) = {est.bandwidth_:.3f}")

# %%
# MAPA weights of a few query points
# ----------------------------------
# :func:`skmapa.diagnostics.mapa_posterior` computes the weights with the
# estimator's own functions. MAPADensity works on standardized rows, so the
# queries are standardized the same way and the estimator's bandwidth is used.
queries = data.f(np.array([0.12, 0.45, 0.8]))
q = mapa_posterior(
    est.X_fit_,
    (queries - est.mean_) / est.scale_,
    n_neighbors=est.n_neighbors_,
    bandwidth=est.bandwidth_,
)
weights = np.exp(q.log_weights)
print("largest weight per query:", weights.max(axis=1).round(3))

# %%
# The MAPA graph
# --------------
# Over the training rows themselves (each left out of its own neighbours),
# the weights form a sparse N x N matrix. Ordered by the *true* codes it is a
# narrow band: rows that are close in data space are close in latent space.
# Its spectral embedding is how ``MAPADensity`` initialises the codes
# (``codes_`` after the a-priori part), before any decoder exists. The codes
# are then matched to the N(0, 1) prior, which keeps their order: against the
# uniform true codes they trace the normal quantile function.
loo = mapa_posterior(
    est.X_fit_, n_neighbors=est.n_neighbors_, bandwidth=est.bandwidth_
)
order = np.argsort(data.codes[:, 0])
rank = np.empty_like(order)
rank[order] = np.arange(order.size)
graph = np.zeros((order.size, order.size))
rows = np.repeat(np.arange(order.size), loo.indices.shape[1])
graph[rank[rows], rank[loo.indices.ravel()]] = np.exp(loo.log_weights).ravel()

init_codes = est.codes_.numpy()[:, 0]
rho = spearmanr(init_codes, data.codes[:, 0]).statistic
print(f"Spearman correlation of the initial codes with the true codes: {rho:+.3f}")

# %%
# Plot
# ----
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
ax = axes[0]
ax.scatter(*data.X.T, s=3, color="0.8")
for i, color in enumerate(["tab:blue", "tab:orange", "tab:green"]):
    nb = data.X[q.indices[i]]
    ax.scatter(*nb.T, s=1500 * weights[i], color=color, alpha=0.6)
    ax.scatter(*queries[i], marker="+", s=60, color="k")
ax.set_title("MAPA weights of three query points (+)")
ax.set_aspect("equal")

ax = axes[1]
ax.imshow(graph > 0, cmap="Greys", interpolation="nearest")
ax.set_title("MAPA graph, rows ordered by true code")
ax.set_xlabel("training row m")
ax.set_ylabel("training row n")

ax = axes[2]
ax.scatter(data.codes[:, 0], init_codes, s=3)
ax.set_xlabel("true code z")
ax.set_ylabel("initial code (spectral, prior-matched)")
ax.set_title(f"a-priori codes (Spearman {rho:+.2f})")
fig.tight_layout()
plt.show()
