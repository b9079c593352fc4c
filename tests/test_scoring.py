"""log p(x) estimators against the closed form of a linear Gaussian model."""

import math

import torch

from skmapa._scoring import (
    adaptive_grid_1d,
    add_prior_component,
    latent_grid,
    mixture_importance_log_px,
    quadrature_log_px,
)
from test_objectives import exact_log_px, linear_model

torch.set_default_dtype(torch.float64)


def test_quadrature_1d_matches_closed_form():
    dec, W, b, sigma = linear_model(d=1, D=2, sigma=0.05)
    x = torch.randn(50, 2) * 2
    z, log_w, f = adaptive_grid_1d(dec, torch.float64, "cpu")
    lp = quadrature_log_px(x, f, log_w, dec.scale)
    assert torch.allclose(lp, exact_log_px(x, W, b, sigma), atol=1e-6)


def test_adaptive_grid_refines_for_steep_decoders():
    dec, *_ = linear_model(d=1, D=1, sigma=0.3)
    coarse = adaptive_grid_1d(dec, torch.float64, "cpu")[0].shape[0]
    dec.set_scale(torch.tensor([0.003]))
    fine = adaptive_grid_1d(dec, torch.float64, "cpu")[0].shape[0]
    assert fine > 4 * coarse


def test_quadrature_2d_matches_closed_form():
    dec, W, b, sigma = linear_model(d=2, D=3, sigma=0.5)
    z, log_w = latent_grid(2, 201, 8.0, torch.float64, "cpu")
    x = torch.randn(20, 3)
    lp = quadrature_log_px(x, dec(z), log_w, dec.scale)
    assert torch.allclose(lp, exact_log_px(x, W, b, sigma), atol=1e-5)


def test_importance_with_exact_posterior_is_exact():
    """With q = p(z|x) every weight equals p(x): the estimate has no error,
    even mixed with the prior (balance heuristic)."""
    dec, W, b, sigma = linear_model(d=1, D=2)
    x = torch.randn(6, 2)
    cov = torch.linalg.inv(torch.eye(1) + W.T @ W / sigma**2)
    mu = (x - b) @ (cov @ W.T / sigma**2).T
    log_std = 0.5 * torch.log(torch.diagonal(cov)).expand_as(mu)
    means, log_stds, log_w = add_prior_component(
        mu.unsqueeze(1), log_std.unsqueeze(1), torch.zeros(6, 1), prior_weight=0.3
    )
    # an exact posterior mixed with the prior is no longer exact: check unbiasedness
    eps = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    lp = mixture_importance_log_px(x, dec, means, log_stds, log_w, eps, 0.5)
    # the rows share their draws, so their errors are correlated: 2e-2 is ~4 sd
    assert torch.allclose(lp, exact_log_px(x, W, b, sigma), atol=2e-2)
    # and with the exact posterior alone, every draw gives p(x)
    lp = mixture_importance_log_px(
        x, dec, mu.unsqueeze(1), log_std.unsqueeze(1), torch.zeros(6, 1), eps[:8], 0.5
    )
    assert torch.allclose(lp, exact_log_px(x, W, b, sigma), atol=1e-10)


def test_importance_rows_are_independent_and_deterministic():
    dec, W, b, sigma = linear_model(d=1, D=2)
    x = torch.randn(10, 2)
    means = torch.randn(10, 3, 1)
    log_stds = torch.full((10, 3, 1), -1.0)
    log_w = torch.log_softmax(torch.randn(10, 3), dim=1)
    eps = torch.randn(256, 1, generator=torch.Generator().manual_seed(0))
    full = mixture_importance_log_px(x, dec, means, log_stds, log_w, eps, 0.3)
    part = mixture_importance_log_px(
        x[3:5], dec, means[3:5], log_stds[3:5], log_w[3:5], eps, 0.3
    )
    assert torch.equal(full[3:5], part)


def test_systematic_assignment_is_proportional():
    """The draws given to each component are within one of S * weight."""
    dec, *_ = linear_model(d=1, D=2)
    weights = torch.tensor([[0.1, 0.25, 0.65]])
    means = torch.tensor([[[-100.0], [0.0], [100.0]]])
    S = 200
    eps = torch.zeros(S, 1)
    captured = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.ones(2)

        def log_prob(self, x, z):
            captured["z"] = z
            return torch.zeros(z.shape[:-1])

    mixture_importance_log_px(
        torch.zeros(1, 2), Spy(), means, torch.zeros(1, 3, 1), torch.log(weights), eps, 0.5
    )
    z = captured["z"][0, :, 0]
    counts = torch.stack([(z == -100).sum(), (z == 0).sum(), (z == 100).sum()])
    assert torch.all((counts - S * weights[0]).abs() <= 1)
    assert math.isclose(float(weights.sum()), 1.0)
