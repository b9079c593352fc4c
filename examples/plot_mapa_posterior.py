"""
MAPA follows the true posterior
===============================

On the one-dimensional data set of the MAPA paper's Figure 1
(``z ~ U[0, 1]``, ``x = (0.5 - z)^2 + 0.01 eps``), the true posterior
``p(z | x)`` is known. This example compares, for a few held-out ``x``:

* the posterior density of the original model, ``p(z | x)`` (black);
* the posterior of the *empiricalized* model, whose prior is the empirical
  distribution of the training codes: ``p_hat(m | x) ∝ N(x; f(z_m), sigma^2)``
  over training rows ``m`` (red);
* MAPA, ``q(m | x) ∝ exp(-|x - x_m|^2 / (2 tau^2))``, computed from the data
  alone (blue);

each drawn against the true codes ``z_m`` of the training rows, as in the
paper's Figure 3. The curves are on different scales (a density over ``z``,
probabilities over rows), so each is shifted to a maximum of 0: what matters
is the trend.
"""

# %%
# Data, queries and the three posteriors
# --------------------------------------
# :mod:`skmapa.diagnostics` computes all three from the data set's Bunch
# (its ``f``, ``noise``, codes and quadrature grid ``latent_grid``), over the
# same index set: the ``k`` training rows nearest to each query.
import matplotlib.pyplot as plt
import numpy as np

from skmapa.datasets import make_figure1
from skmapa.diagnostics import (
    empirical_posterior,
    mapa_posterior,
    posterior_agreement,
    true_posterior,
)

data = make_figure1(1000, random_state=0)
queries = np.array([[0.002], [0.03], [0.1], [0.2]])
k = 300
# The distance between x and a noisy training row x_m has twice the noise
# variance of x - f(z_m): the theoretical bandwidth is tau^2 = 2 sigma^2.
# (MAPADensity picks tau from the data, bandwidth='auto', or by grid search.)
tau = np.sqrt(2) * data.noise

true_lp = true_posterior(data, queries, data.latent_grid)
emp = empirical_posterior(data, queries, n_neighbors=k)
mapa = mapa_posterior(data.X, queries, n_neighbors=k, bandwidth=tau)
assert np.array_equal(emp.indices, mapa.indices)  # the same index set

# %%
# Plot
# ----
# For ``x`` away from 0 the true posterior has two modes,
# ``z = 0.5 ± sqrt(x)``: MAPA puts its weight on both, because the training
# rows near ``x`` came from both, and it falls off where the posterior does.
# It never saw ``f``. It is broader than the empiricalized posterior (it sees
# the noise of ``x_m`` as well as that of ``x``), and near its maximum it
# cannot order the rows: that order is set by each row's own noise.
fig, axes = plt.subplots(1, len(queries), figsize=(13, 3.4), sharey=True)
for i, ax in enumerate(axes):
    z_m = data.codes[mapa.indices[i], 0]
    inside = np.isfinite(true_lp[i])
    ax.plot(data.latent_grid[inside], true_lp[i, inside] - true_lp[i, inside].max(),
            color="k", label="true p(z | x)")
    ax.scatter(z_m, emp.log_weights[i] - emp.log_weights[i].max(), s=10,
               color="tab:red", label="empiricalized p(m | x)")
    ax.scatter(z_m, mapa.log_weights[i] - mapa.log_weights[i].max(), s=10,
               marker="x", color="tab:blue", label="MAPA q(m | x)")
    ax.set_title(f"x = {queries[i, 0]:g}")
    ax.set_xlabel("true code z")
    ax.set_xlim(0, 1)
    ax.set_ylim(-12, 0.8)
axes[0].set_ylabel("log posterior - max")
axes[0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
plt.show()

# %%
# How well the order agrees
# -------------------------
# :func:`~skmapa.diagnostics.posterior_agreement` gives, for held-out rows,
# the Spearman rank correlation between MAPA and the empiricalized posterior
# over each row's neighbours. It grows with the share of the posterior the
# neighbourhood spans: inside the bulk of the posterior every neighbour is
# about equally likely, and their order is set by each neighbour's own noise,
# which no method that sees only the data can know. (A rank correlation does
# not depend on the bandwidth.)
held_out = make_figure1(300, random_state=1).X
for n_neighbors in (20, 100, 300):
    res = posterior_agreement(data, held_out, n_neighbors=n_neighbors)
    print(
        f"k = {n_neighbors:3d}: median Spearman {res.median:.2f}, "
        f"median coverage {np.median(res.coverage):.2f}"
    )
