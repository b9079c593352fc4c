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


# ----------------------------------------------------------------------
# Likelihood before inference (LiBI) and recursive mixture encoders
# ----------------------------------------------------------------------
from ._networks import mixture_log_prob  # noqa: E402


def prior_marginal_bound(x, decoder, z):
    """``log (1/S) sum_s p(x | z_s)`` with prior draws ``z`` shared by the rows.

    ``z`` has shape ``(S, n_components)``, each row distributed as N(0, I);
    one decoder pass over the S draws serves the whole batch. The estimate of
    p(x) is unbiased, so its log is a lower bound on log p(x) in expectation,
    and no encoder is involved (the first stage of LiBI).
    """
    lp = decoder.log_prob(x.unsqueeze(1), z.unsqueeze(0))  # (n, S)
    value = torch.logsumexp(lp, dim=1) - math.log(z.shape[0])
    return value, value


def mixture_log_ratios(x, decoder, means, log_stds, log_weights, eps):
    """``log p(x, z) - log q(z | x)`` at stratified draws of a Gaussian mixture q.

    ``means``, ``log_stds`` (n, C, d) and ``log_weights`` (n, C) describe
    q(z | x); ``eps`` (k, n, C, d) are standard normal base draws: draw
    ``(s, i, c)`` comes from component c of row i. Returns ``(k, n, C)``.
    """
    z = means + torch.exp(log_stds) * eps  # (k, n, C, d)
    k, n, C, d = z.shape
    zf = z.transpose(1, 2)  # (k, C, n, d): rows on the axis mixture_log_prob expects
    log_q = mixture_log_prob(zf, means, log_stds, log_weights).transpose(1, 2)
    return decoder.log_prob(x, z.transpose(1, 2)).transpose(1, 2) + (
        standard_normal_log_prob(z) - log_q
    )


def mixture_elbo(x, decoder, means, log_stds, log_weights, eps):
    """ELBO of a Gaussian-mixture q, stratified over its components.

    ``sum_c w_c E_{q_c}[log p(x, z) - log q(z | x)]``, each expectation
    estimated with the ``k`` draws of ``eps`` (k, n, C, d) from component c;
    the weights enter exactly, so the bound is differentiable in them.
    """
    r = mixture_log_ratios(x, decoder, means, log_stds, log_weights, eps)
    value = (torch.exp(log_weights) * r.mean(0)).sum(-1)
    return value, value


def mixture_iwae_bound(x, decoder, means, log_stds, log_weights, eps):
    """Stratified importance-weighted bound of a Gaussian-mixture proposal.

    ``log sum_c w_c (1/k) sum_s p(x, z_cs) / q(z_cs | x)`` with ``k`` draws
    from every component (Morningstar et al., 2021): an unbiased estimate of
    p(x) inside the log, so a lower bound on log p(x), differentiable in the
    weights.
    """
    r = mixture_log_ratios(x, decoder, means, log_stds, log_weights, eps)
    value = torch.logsumexp(r + log_weights, dim=(0, 2)) - math.log(eps.shape[0])
    return value, value


def recursive_component_criterion(x, decoder, mu, log_std, mixture, eps, kl_weight):
    """Kim & Pavlovic's criterion for a new mixture component q_new(z | x).

    ``ELBO(q_new) + kl_weight * KL(q_new || Q)`` where Q is the current
    mixture ``(means, log_stds, log_weights)``, both terms estimated with the
    reparameterised draws ``z = mu + std * eps`` (eps (k, n, d)): the new
    component must explain the data (the ELBO) while moving away from what Q
    already covers (the KL). Per draw this is ``log p(x, z) - (1 - kl_weight)
    log q_new(z) - kl_weight log Q(z)``; ``kl_weight < 1`` keeps an entropy
    term, without which the optimum is a point mass. Returns per-row
    ``(criterion, elbo)``, both averaged over the k draws.
    """
    std = torch.exp(log_std)
    z = mu + std * eps
    log_q = gaussian_log_prob(z, mu, std)
    log_joint = decoder.log_prob(x, z) + standard_normal_log_prob(z)
    log_mix = mixture_log_prob(z, *mixture)
    criterion = (log_joint - (1 - kl_weight) * log_q - kl_weight * log_mix).mean(0)
    return criterion, (log_joint - log_q).mean(0).detach()
