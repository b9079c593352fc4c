"""
Samples of handwritten digits
=============================

Fit :class:`~skmapa.MAPADensity` and :class:`~skmapa.VAEDensity` with an
8-dimensional latent space to scikit-learn's 8x8 digits
(:func:`sklearn.datasets.load_digits`, 1797 images, 64 pixels) and show
samples from each as images.

The pixels are integers from 0 to 16. A continuous density on integer data
can grow without bound by putting spikes on the integers, so the pixels are
*dequantised*: uniform noise on ``[0, 1)`` is added to each (and the result
divided by 17 to lie in ``[0, 1)``). A continuous density of the dequantised
data gives a lower bound on the log-probability of the integer data.

This is a small, fast run (few epochs): the samples show what the models
learned quickly, not what they can learn.
"""

# %%
# Dequantised digits
# ------------------
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from skmapa import MAPADensity, VAEDensity

warnings.filterwarnings("ignore", category=ConvergenceWarning)

rng = np.random.RandomState(0)
pixels = load_digits().data
X = (pixels + rng.uniform(size=pixels.shape)) / 17.0
X_train, X_test = train_test_split(X, test_size=300, random_state=0)

# %%
# Fit
# ---
# ``score`` is the mean held-out log-likelihood per image, estimated by
# importance sampling (``n_components > 1``). Pixels are in ``[0, 1)``,
# so ``-score / 64`` nats per pixel is comparable across models.
models = {
    "MAPA": MAPADensity(n_components=8, max_iter=40, refine_iter=5, random_state=0),
    "VAE": VAEDensity(n_components=8, max_iter=40, random_state=0),
}
for name, est in models.items():
    est.fit(X_train)
    print(
        f"{name}: held-out log-likelihood {est.score(X_test):.1f} nats per image, "
        f"{sum(est.n_row_passes_.values()):,} row-passes"
    )

# %%
# Samples
# -------
# ``sample`` draws ``z ~ N(0, I)`` and ``x ~ N(f(z), diag(sigma^2))``; the
# decoder mean ``f(z)`` (``inverse_transform`` of prior draws) shows the
# images without the pixel noise.
n_show = 10
z = np.random.RandomState(1).standard_normal((n_show, 8))
rows = {"training images": X_train[:n_show]}
for name, est in models.items():
    rows[f"{name}: f(z)"] = est.inverse_transform(z)
    rows[f"{name}: samples"] = est.sample(n_show, random_state=2)

fig, axes = plt.subplots(len(rows), n_show, figsize=(n_show * 0.9, len(rows) * 0.95))
for r, (title, images) in enumerate(rows.items()):
    for c in range(n_show):
        ax = axes[r, c]
        ax.imshow(np.clip(images[c], 0, 1).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
fig.tight_layout(h_pad=0.3)
plt.show()
