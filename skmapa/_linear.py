"""The linear special case: probabilistic PCA, the start of every estimator.

With a Gaussian decoder, ``f(z) = mu + W z`` and isotropic noise the model is
probabilistic PCA (Tipping & Bishop, 1999), whose maximum-likelihood solution
is closed-form: ``W = U_d (L_d - sigma^2 I)^{1/2}`` from the top ``d``
eigenpairs of the covariance, ``sigma^2`` the mean of the discarded
eigenvalues. Its posterior is Gaussian with mean ``M^{-1} W^T (x - mu)`` and
covariance ``sigma^2 M^{-1}``, ``M = W^T W + sigma^2 I``. The estimators start
their decoders (and encoders) there, so training begins at the linear model's
log-likelihood instead of at a random network.
"""

from dataclasses import dataclass

import numpy as np

#: Smallest starting noise variance, relative to the mean feature variance:
#: with ``n_components >= n_features`` (or collinear data) PPCA's noise is 0.
MIN_RELATIVE_NOISE_VAR = 1e-4


@dataclass
class LinearStart:
    """A linear-Gaussian model ``x = mean + weight z + noise``."""

    mean: np.ndarray          # (D,)
    weight: np.ndarray        # (D, d)
    noise_var: np.ndarray     # (D,)

    def log_density(self, X):
        """Exact log-density of the rows ``X`` under the model (marginal
        ``N(mean, weight weight^T + diag(noise_var))``)."""
        cov = self.weight @ self.weight.T + np.diag(self.noise_var)
        chol = np.linalg.cholesky(cov)
        z = np.linalg.solve(chol, (np.asarray(X) - self.mean).T)
        return -0.5 * ((z * z).sum(0) + len(self.mean) * np.log(2 * np.pi)) - np.log(
            np.diag(chol)).sum()

    def posterior(self):
        """``(A, offset, log_std)``: posterior mean ``offset + A x``, its log std.

        Exact for the linear-Gaussian model (diagonal noise allowed), used to
        start an encoder at the linear model's true posterior.
        """
        d = self.weight.shape[1]
        Wt_inv = self.weight.T / self.noise_var          # W^T Psi^{-1}, (d, D)
        precision = np.eye(d) + Wt_inv @ self.weight      # I + W^T Psi^{-1} W
        cov = np.linalg.inv(precision)
        A = cov @ Wt_inv
        return A, -A @ self.mean, 0.5 * np.log(np.diag(cov))


def _weighted_mean_cov(X, weights):
    w = weights / weights.sum()
    mean = w @ X
    Xc = X - mean
    return mean, (Xc * w[:, None]).T @ Xc


def probabilistic_pca(X, weights, n_components):
    """The maximum-likelihood probabilistic PCA of weighted rows ``X``."""
    mean, cov = _weighted_mean_cov(X, weights)
    D = X.shape[1]
    d = min(n_components, D)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
    floor = MIN_RELATIVE_NOISE_VAR * max(float(np.mean(np.diag(cov))), 1e-12)
    noise = max(float(np.mean(evals[d:])) if d < D else 0.0, floor)
    weight = np.zeros((D, n_components))
    weight[:, :d] = evecs[:, :d] * np.sqrt(np.clip(evals[:d] - noise, 0.0, None))
    return LinearStart(mean, weight, np.full(D, noise))


def regression_start(codes, X, weights):
    """The least-squares linear map from given codes to ``X``.

    For codes fixed in advance (MAPA's): ``X ~ mean + W codes`` by weighted
    least squares, the noise variance the mean squared residual (isotropic, as
    in probabilistic PCA, floored like it).
    """
    w = weights / weights.sum()
    design = np.hstack([np.ones((codes.shape[0], 1)), codes])
    sw = np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(design * sw, X * sw, rcond=None)
    resid = X - design @ coef
    D = X.shape[1]
    _, cov = _weighted_mean_cov(X, weights)
    floor = MIN_RELATIVE_NOISE_VAR * max(float(np.mean(np.diag(cov))), 1e-12)
    noise = max(float(w @ (resid**2).mean(1)), floor)
    return LinearStart(coef[0], coef[1:].T, np.full(D, noise))
