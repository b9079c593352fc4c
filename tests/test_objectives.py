"""Objectives against closed forms on a linear Gaussian model."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from skmapa._networks import GaussianDecoder, gaussian_log_prob
from skmapa._objectives import elbo, gaussian_kl_to_standard, iwae_bound

torch.set_default_dtype(torch.float64)


def linear_model(seed=0, d=1, D=2, sigma=0.3):
    """A decoder f(z) = W z + b with known marginal N(b, W W^T + sigma^2 I)."""
    g = torch.Generator().manual_seed(seed)
    dec = GaussianDecoder(d, D, (), "identity")
    W = torch.randn(D, d, generator=g)
    b = torch.randn(D, generator=g)
    with torch.no_grad():
        dec.mean_net.net[0].weight.copy_(W)
        dec.mean_net.net[0].bias.copy_(b)
    dec.set_scale(torch.full((D,), sigma))
    return dec, W, b, sigma


def exact_log_px(x, W, b, sigma):
    cov = W @ W.T + sigma**2 * torch.eye(W.shape[0])
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


class ExactPosterior(nn.Module):
    """q(z|x) equal to the true posterior of the linear model."""

    def __init__(self, W, b, sigma, shift=0.0):
        super().__init__()
        d = W.shape[1]
        prec = torch.eye(d) + W.T @ W / sigma**2
        self.cov = torch.linalg.inv(prec)
        self.A = self.cov @ W.T / sigma**2
        self.b = b
        # a learnable shift, so that encoder gradients can be compared
        self.shift = nn.Parameter(torch.full((d,), float(shift)))
        self.log_std = 0.5 * torch.log(torch.diagonal(self.cov))

    def forward(self, x):
        mu = (x - self.b) @ self.A.T + self.shift
        return mu, self.log_std.expand_as(mu)


def test_set_scale_roundtrip():
    dec, *_ = linear_model()
    dec.set_scale(torch.tensor([0.5, 2e-3]))
    assert torch.allclose(dec.scale, torch.tensor([0.5, 2e-3]))


def test_gaussian_kl_closed_form():
    mu = torch.tensor([[0.3, -1.0]])
    log_std = torch.tensor([[0.1, -0.5]])
    q = torch.distributions.Normal(mu, torch.exp(log_std))
    p = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(gaussian_kl_to_standard(mu, log_std), expected)


def test_iwae_with_exact_posterior_is_log_px():
    dec, W, b, sigma = linear_model()
    enc = ExactPosterior(W, b, sigma)
    x = torch.randn(5, 2)
    eps = torch.randn(7, 5, 1)
    for gradient in ("dreg", "iwae"):
        _, bound = iwae_bound(x, enc, dec, eps, gradient)
        assert torch.allclose(bound, exact_log_px(x, W, b, sigma), atol=1e-10)


def test_elbo_expectation_is_log_px_with_exact_posterior():
    dec, W, b, sigma = linear_model(d=2, D=3)
    enc = ExactPosterior(W, b, sigma)
    # the exact posterior of a linear model with diagonal noise is correlated;
    # use a 1-D latent where the diagonal family is exact
    dec, W, b, sigma = linear_model(d=1, D=3)
    enc = ExactPosterior(W, b, sigma)
    x = torch.randn(4, 3)
    eps = torch.randn(20000, 4, 1)
    value, _ = elbo(x.expand(20000, 4, 3), enc, dec, eps)
    assert torch.allclose(value.mean(0), exact_log_px(x, W, b, sigma), atol=0.02)


def test_iwae_bound_increases_with_k_and_stays_below_log_px():
    dec, W, b, sigma = linear_model()
    enc = ExactPosterior(W, b, sigma, shift=1.0)  # a poor proposal
    x = torch.randn(3, 2)
    g = torch.Generator().manual_seed(1)
    means = []
    for k in (1, 10, 100):
        vals = [
            iwae_bound(x, enc, dec, torch.randn(k, 3, 1, generator=g))[1]
            for _ in range(300)
        ]
        means.append(torch.stack(vals).mean(0))
    truth = exact_log_px(x, W, b, sigma)
    assert torch.all(means[0] < means[1]) and torch.all(means[1] < means[2])
    assert torch.all(means[2] < truth + 1e-3)


def _grads(gradient, x, enc, dec, eps):
    for p in list(enc.parameters()) + list(dec.parameters()):
        p.grad = None
    surrogate, _ = iwae_bound(x, enc, dec, eps, gradient)
    surrogate.sum().backward()
    return enc.shift.grad.clone(), dec.mean_net.net[0].weight.grad.clone()


def test_dreg_decoder_gradient_equals_iwae_and_encoder_gradient_unbiased():
    dec, W, b, sigma = linear_model()
    enc = ExactPosterior(W, b, sigma, shift=0.7)
    x = torch.randn(1, 2)
    g = torch.Generator().manual_seed(3)
    enc_dreg, enc_iwae = [], []
    for _ in range(3000):
        eps = torch.randn(5, 1, 1, generator=g)
        e1, d1 = _grads("dreg", x, enc, dec, eps)
        e2, d2 = _grads("iwae", x, enc, dec, eps)
        assert torch.allclose(d1, d2, atol=1e-10)
        enc_dreg.append(e1)
        enc_iwae.append(e2)
    a, c = torch.stack(enc_dreg), torch.stack(enc_iwae)
    se = math.sqrt(a.var().item() / len(a) + c.var().item() / len(c))
    assert abs(a.mean().item() - c.mean().item()) < 4 * se


def test_dreg_encoder_gradient_vanishes_at_exact_posterior():
    """At q = p(z|x) every log-weight is log p(x): DReG's gradient is exactly 0
    for every draw (zero variance), while the plain IWAE gradient is noisy."""
    dec, W, b, sigma = linear_model()
    enc = ExactPosterior(W, b, sigma, shift=0.0)
    x = torch.randn(2, 2)
    g = torch.Generator().manual_seed(4)
    plain = []
    for _ in range(20):
        eps = torch.randn(5, 2, 1, generator=g)
        e1, _ = _grads("dreg", x, enc, dec, eps)
        e2, _ = _grads("iwae", x, enc, dec, eps)
        assert torch.allclose(e1, torch.zeros_like(e1), atol=1e-10)
        plain.append(e2)
    assert torch.stack(plain).std() > 1e-3


def test_unknown_gradient_raises():
    dec, W, b, sigma = linear_model()
    with pytest.raises(ValueError, match="gradient"):
        iwae_bound(torch.zeros(1, 2), ExactPosterior(W, b, sigma), dec,
                   torch.zeros(2, 1, 1), "bogus")


def test_gaussian_log_prob_matches_torch():
    x = torch.randn(4, 3)
    mean = torch.randn(4, 3)
    scale = torch.rand(3) + 0.1
    expected = torch.distributions.Normal(mean, scale).log_prob(x).sum(-1)
    assert torch.allclose(gaussian_log_prob(x, mean, scale), expected)
    assert np.isclose(float(gaussian_log_prob(torch.zeros(1), torch.zeros(1),
                                              torch.ones(1))), -0.5 * math.log(2 * math.pi))
