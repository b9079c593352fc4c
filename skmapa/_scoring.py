"""Estimators of log p(x) for the shared generative model.

``score_samples`` never returns a training bound. Two estimators:

* importance sampling with a mixture-of-Gaussians proposal (the estimator's
  own proposal mixed with the prior), a fixed set of base draws (scrambled
  Sobol points, i.e. randomised quasi-Monte Carlo) and a stratified
  assignment of draws to mixture components, so each row's value is
  deterministic and independent of the other rows;
* quadrature on a latent grid (one decoder pass over the grid serves every
  row), exact up to the grid's resolution for one or two latent dimensions.
"""

import math
import warnings

import numpy as np
import torch
from scipy.stats import norm, qmc

from ._networks import gaussian_log_prob, standard_normal_log_prob

#: Weight of the prior in every importance-sampling proposal.
PRIOR_WEIGHT = 0.1
#: Elements (rows x draws x components x dims) handled at once while scoring.
CHUNK_ELEMENTS = 2**21


def sobol_normal(n_draws, n_latent, generator):
    """Standard normal base draws from a scrambled Sobol sequence (float64 array).

    Randomised QMC keeps importance sampling unbiased (over the scrambling)
    while its error on a smooth one-row integrand falls much faster than
    with independent draws: on a fitted 1-D model, 1024 Sobol draws had a
    mean absolute error of 8e-4 nats against quadrature where 1024 i.i.d.
    draws had 2.5e-2.
    """
    seed = int(torch.randint(2**31 - 1, (), generator=generator))
    sampler = qmc.Sobol(n_latent, scramble=True, seed=np.random.default_rng(seed))
    m = int(math.ceil(math.log2(max(n_draws, 2))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = sampler.random_base2(m)[:n_draws]
    u = np.clip(u, 1e-12, 1 - 1e-12)
    return norm.ppf(u)


def add_prior_component(means, log_stds, log_weights, prior_weight=PRIOR_WEIGHT):
    """Mix a proposal ``(n, C, d)`` with the N(0, I) prior at ``prior_weight``."""
    n, _, d = means.shape
    zeros = means.new_zeros((n, 1, d))
    means = torch.cat([zeros, means], dim=1)
    log_stds = torch.cat([zeros, log_stds], dim=1)
    log_weights = torch.cat(
        [
            log_weights.new_full((n, 1), math.log(prior_weight)),
            log_weights + math.log1p(-prior_weight),
        ],
        dim=1,
    )
    return means, log_stds, log_weights


def mixture_importance_log_px(x, decoder, means, log_stds, log_weights, eps, u0):
    """Importance-sampling estimate of log p(x) with a Gaussian-mixture proposal.

    Parameters
    ----------
    x : tensor (n, D)
    decoder : GaussianDecoder
    means, log_stds : tensors (n, C, d)
        Proposal components for each row.
    log_weights : tensor (n, C)
        Normalised log mixture weights.
    eps : tensor (S, d) or (n, S, d)
        Standard normal base draws, shared by all rows (scoring) or per row.
    u0 : float in [0, 1) or tensor (n, 1)
        Offset of the systematic assignment of draws to components.

    Draw ``s`` of row ``i`` goes to the component whose cumulative weight
    interval holds ``(s + u0) / S``; the weights use the full mixture density
    (balance heuristic), so the estimate of p(x) is unbiased over the base
    draws and the assignment offset.
    """
    n, C, d = means.shape
    S = eps.shape[-2]
    cum = torch.cumsum(torch.exp(log_weights), dim=1)
    cum = cum / cum[:, -1:]
    pos = (torch.arange(S, device=x.device, dtype=x.dtype) + u0) / S
    comp = torch.searchsorted(cum.contiguous(), pos.expand(n, S).contiguous())
    if eps.dim() == 2:
        eps = eps.unsqueeze(0)
    comp = comp.clamp_(max=C - 1)  # (n, S)
    idx = comp.unsqueeze(-1).expand(n, S, d)
    mu = torch.gather(means, 1, idx)
    std = torch.exp(torch.gather(log_stds, 1, idx))
    z = mu + std * eps  # (n, S, d)
    log_q = torch.logsumexp(
        gaussian_log_prob(
            z.unsqueeze(2), means.unsqueeze(1), torch.exp(log_stds).unsqueeze(1)
        )
        + log_weights.unsqueeze(1),
        dim=2,
    )
    log_w = decoder.log_prob(x.unsqueeze(1), z) + standard_normal_log_prob(z) - log_q
    return torch.logsumexp(log_w, dim=1) - math.log(S)


def importance_chunk_rows(n_draws, n_components_mix, n_latent, width=1):
    """Rows per chunk so that one chunk stays under ``CHUNK_ELEMENTS``.

    A row costs ``n_draws`` times the larger of its proposal densities
    (components x latent dimensions) and the widest activation the decoder
    computes for one draw (``width``: its widest layer or its output).
    """
    per_row = n_draws * max(n_components_mix * n_latent, width, 1)
    return max(1, CHUNK_ELEMENTS // per_row)


def latent_grid(n_components, n_per_dim, bound, dtype, device):
    """A uniform grid on [-bound, bound]^d and its log weights (with the prior)."""
    t = torch.linspace(-bound, bound, n_per_dim, dtype=dtype, device=device)
    h = t[1] - t[0]
    axes = [t] * n_components
    z = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(
        -1, n_components
    )
    log_w = standard_normal_log_prob(z) + n_components * torch.log(h)
    return z, log_w


def adaptive_grid_1d(decoder, dtype, device, bound=8.0, start=2049, max_points=2**20,
                     max_step=0.25):
    """A 1-D latent grid fine enough for the fitted decoder.

    The number of points doubles until consecutive decoder means differ by at
    most ``max_step`` noise standard deviations in every feature, so the
    Gaussian peak of p(x|z) along z is resolved by several points wherever
    the decoder is steep. Returns ``(z, log_weights, means)``.
    """
    n = start
    scale = decoder.scale.detach()
    while True:
        z, log_w = latent_grid(1, n, bound, dtype, device)
        with torch.no_grad():
            f = decoder(z)
        step = ((f[1:] - f[:-1]).abs() / scale).max().item()
        if step <= max_step or n >= max_points:
            return z, log_w, f
        n = 2 * n - 1


def quadrature_log_px(x, grid_means, grid_log_weights, scale):
    """log p(x) = logsumexp_g(log w_g + log N(x; f(z_g), scale^2)), chunked."""
    G = grid_means.shape[0]
    rows = max(1, CHUNK_ELEMENTS // (G * x.shape[1]))
    # one preallocated result: see BaseDeepDensity._log_px_importance
    out = x.new_empty(x.shape[0])
    for start in range(0, x.shape[0], rows):
        xb = x[start:start + rows]
        lp = gaussian_log_prob(xb.unsqueeze(1), grid_means.unsqueeze(0), scale)
        out[start:start + rows] = torch.logsumexp(lp + grid_log_weights, dim=1)
    return out
