"""Training objectives as plain functions of tensors.

Each returns ``(surrogate, bound)`` per row: ``surrogate`` is what is
maximised (its gradient is the estimator's gradient), ``bound`` is the value
of the lower bound, reported in ``loss_curve_``. They differ only where a
gradient estimator differs from the bound's plain gradient (DReG).
"""

import math

import torch

from ._networks import gaussian_log_prob, standard_normal_log_prob


def gaussian_kl_to_standard(mu, log_std):
    """KL(N(mu, diag(exp(log_std)^2)) || N(0, I)) per row."""
    return 0.5 * (mu * mu + torch.exp(2 * log_std) - 1.0 - 2 * log_std).sum(-1)


def elbo(x, encoder, decoder, eps):
    """Single-sample reparameterised ELBO with analytic KL (Kingma & Welling).

    ``eps`` has the shape of the codes, ``(n, n_components)``.
    """
    mu, log_std = encoder(x)
    z = mu + torch.exp(log_std) * eps
    value = decoder.log_prob(x, z) - gaussian_kl_to_standard(mu, log_std)
    return value, value


def _log_weights(x, encoder, decoder, eps, stop_q_params):
    mu, log_std = encoder(x)
    std = torch.exp(log_std)
    z = mu + std * eps  # (k, n, d)
    if stop_q_params:
        log_q = gaussian_log_prob(z, mu.detach(), std.detach())
    else:
        log_q = gaussian_log_prob(z, mu, std)
    log_w = decoder.log_prob(x, z) + standard_normal_log_prob(z) - log_q
    return z, log_w


def iwae_bound(x, encoder, decoder, eps, gradient="dreg"):
    """The k-sample importance-weighted bound (Burda, Grosse, Salakhutdinov).

    ``eps`` has shape ``(k, n, n_components)``. With ``gradient="dreg"`` the
    encoder receives the doubly-reparameterised gradient (Tucker et al. 2019),
    ``sum_k w_k^2 d log w_k / dz_k dz_k / dphi``, whose variance does not grow
    with k as the plain IWAE encoder gradient's does; the decoder gradient is
    the usual ``sum_k w_k d log w_k / dtheta`` in both cases.
    """
    k = eps.shape[0]
    if gradient == "dreg":
        z, log_w = _log_weights(x, encoder, decoder, eps, stop_q_params=True)
        w = torch.softmax(log_w.detach(), dim=0)  # (k, n)
        # Negligible weights are zeroed: squared (the hook multiplies the
        # gradient by w once more) they would be subnormal floats, which make
        # the CPU backward pass an order of magnitude slower.
        w = torch.where(w < torch.finfo(w.dtype).tiny ** 0.25, 0.0, w)
        if z.requires_grad:
            z.register_hook(lambda g: g * w.unsqueeze(-1))
        surrogate = (w * log_w).sum(0)
        bound = torch.logsumexp(log_w.detach(), 0) - math.log(k)
        return surrogate, bound
    if gradient == "iwae":
        _, log_w = _log_weights(x, encoder, decoder, eps, stop_q_params=False)
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        return bound, bound
    raise ValueError(f"gradient must be 'dreg' or 'iwae', got {gradient!r}.")
