"""
Model selection with GridSearchCV and cross_validate
====================================================

The estimators are ordinary scikit-learn estimators: ``score`` is the mean
held-out log-likelihood per row, so :class:`~sklearn.model_selection.GridSearchCV`
and :func:`~sklearn.model_selection.cross_validate` choose and compare them
with no scoring argument, and they compose with
:class:`~sklearn.pipeline.Pipeline`. This example tunes MAPA's neighbourhood
(``n_neighbors``) and bandwidth on a noisy parabola, then compares the tuned
MAPA with a VAE by cross-validation.

The estimators standardize internally; the :class:`~sklearn.preprocessing.StandardScaler`
is there to show the composition. A pipeline's ``score`` is the
log-likelihood of the *scaled* rows, which differs from the log-likelihood
in the data's units by the constant ``-sum(log scaler.scale_)`` of the fold:
the same for every candidate, so rankings are unaffected.
"""

# %%
# Data
# ----
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skmapa import MAPADensity, VAEDensity
from skmapa.datasets import make_absolute_value

# Small training budgets keep the example fast; they stop before convergence.
warnings.filterwarnings("ignore", category=ConvergenceWarning)
# n_neighbors=5 below disconnects the MAPA graph, which scikit-learn's
# spectral embedding reports on every fit; the scores show it anyway.
warnings.filterwarnings("ignore", message="Graph is not fully connected")

data = make_absolute_value(450, random_state=0)
X = data.X
cv = KFold(n_splits=3, shuffle=True, random_state=0)

# %%
# Grid search over MAPA's neighbourhood
# -------------------------------------
# Parameters of a pipeline step are addressed as ``<step>__<parameter>``.
# A float bandwidth is in the estimator's standardized units; 'auto' is the
# mean distance to the ``n_neighbors`` nearest rows. With ``n_neighbors=5``
# the MAPA graph falls apart into pieces (scikit-learn's spectral embedding
# warns that it is not connected; silenced above) and the codes cannot be
# initialised well.
mapa = make_pipeline(
    StandardScaler(),
    MAPADensity(n_components=1, max_iter=60, refine_iter=0, random_state=0),
)
param_grid = {
    "mapadensity__n_neighbors": [5, 20, 60],
    "mapadensity__bandwidth": ["auto", 0.05],
}
search = GridSearchCV(mapa, param_grid, cv=cv).fit(X)
print("best parameters:", search.best_params_)
print(f"best mean CV log-likelihood (scaled units): {search.best_score_:.3f}")

# %%
# Compare the tuned MAPA with a VAE
# ---------------------------------
# ``cross_validate`` refits a clone of each pipeline on every fold.
# ``fit_time`` shows the training cost next to the held-out score.
candidates = {
    "MAPA (tuned)": search.best_estimator_,
    "VAE": make_pipeline(
        StandardScaler(), VAEDensity(n_components=1, max_iter=60, random_state=0)
    ),
}
scores = {}
for name, pipe in candidates.items():
    cvres = cross_validate(pipe, X, cv=cv)
    scores[name] = cvres["test_score"]
    print(
        f"{name:13s} CV log-likelihood {cvres['test_score'].mean():7.3f} "
        f"± {cvres['test_score'].std():.3f}, fit {cvres['fit_time'].mean():.1f} s"
    )

# %%
# Plot
# ----
results = search.cv_results_
ks = param_grid["mapadensity__n_neighbors"]
bws = param_grid["mapadensity__bandwidth"]
table = np.empty((len(bws), len(ks)))
for params, score in zip(results["params"], results["mean_test_score"]):
    table[bws.index(params["mapadensity__bandwidth"]),
          ks.index(params["mapadensity__n_neighbors"])] = score

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
ax = axes[0]
ax.imshow(table, cmap="viridis", vmin=np.median(table) - 1)
for (i, j), value in np.ndenumerate(table):
    dark = value < np.median(table) - 0.5
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if dark else "k")
ax.set_xticks(range(len(ks)), ks)
ax.set_yticks(range(len(bws)), bws)
ax.set_xlabel("n_neighbors")
ax.set_ylabel("bandwidth")
ax.set_title("mean CV log-likelihood (scaled units)")

ax = axes[1]
ax.boxplot(list(scores.values()))
ax.set_xticks(range(1, len(scores) + 1), list(scores))
ax.set_ylabel("CV log-likelihood per fold (scaled units)")
ax.set_title("cross_validate")
fig.tight_layout()
plt.show()
