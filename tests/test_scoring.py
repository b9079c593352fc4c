"""log p(x) estimators against the closed form of a linear Gaussian model."""

import math

import torch

import numpy as np
import pytest

from skmapa import _scoring
from skmapa._networks import GaussianDecoder
from skmapa._scoring import (
    TiledGrid,
    add_prior_component,
    latent_grid,
    mixture_importance_log_px,
    quadrature_log_px,
    stratified_prior_log_px,
)
from test_objectives import exact_log_px, linear_model

torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("d, D, sigma", [(1, 2, 0.05), (1, 3, 0.5), (2, 3, 0.5), (2, 2, 0.1)])
def test_tiled_grid_matches_closed_form(d, D, sigma):
    """On a linear decoder the scoring grid gives the exact Gaussian marginal,
    also for rows far out (the pruning keeps the tiles that matter)."""
    dec, W, b, sigma = linear_model(d=d, D=D, sigma=sigma)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, d, generator=g)
    z[:5] *= 3  # far out, but with the posterior inside the grid's box
    x = z @ W.T + b + sigma * torch.randn(200, D, generator=g)
    x[5:10] += 3 * sigma  # off the model's support in data space
    grid = TiledGrid(dec, d, torch.float64, "cpu")
    assert grid.resolved
    lp, err = grid.log_px(x, return_error=True)
    exact = exact_log_px(x, W, b, sigma)
    assert torch.allclose(lp, exact, atol=1e-6)
    assert err.shape == (200,) and bool((err >= 0).all())


def test_tiled_grid_halves_tiles_only_along_the_steep_axis():
    """A linear decoder steep along z1 and flat along z2: every tile is halved
    along z1 until its step there is at most MAX_STEP, and never along z2
    (long, thin tiles), and the sum is still the exact marginal."""
    dec, _, b, sigma = linear_model(d=2, D=2, sigma=0.1)
    W = torch.diag(torch.tensor([4.0, 0.2]))
    with torch.no_grad():
        dec.mean_net.net[0].weight.copy_(W)
    grid = TiledGrid(dec, 2, torch.float64, "cpu")
    side, h = _scoring.TILE_SIDE[2], _scoring.COARSEST_SPACING
    assert 0.2 * h / sigma <= _scoring.MAX_STEP[2]  # z2 needs no halving
    halvings = math.ceil(math.log2(4.0 * h / sigma / _scoring.MAX_STEP[2]))
    n_tiles = math.ceil(16.0 / (side * h)) ** 2
    assert grid.resolved
    assert grid.n_points == n_tiles * side**2 * 2**halvings
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g) @ W.T + b + sigma * torch.randn(200, 2, generator=g)
    assert torch.allclose(grid.log_px(x), exact_log_px(x, W, b, sigma), atol=1e-6)


def test_grid_budget_grows_with_the_training_rows(monkeypatch):
    """Few training rows: the base caps; more rows: more decoded points and
    stored values, up to the upper caps. A grid stopped unresolved at the
    base cap resolves with the larger budget and is the exact marginal."""
    S = _scoring
    assert S.grid_budget(150, 2) == (S.GRID_MAX_POINTS, S.GRID_MAX_ELEMENTS)
    assert S.grid_budget(400_000, 20) == (S.GRID_ROWS_POINTS * 400_000, 8_000_000)
    assert S.grid_budget(10**8, 50) == (S.GRID_MOST_POINTS, S.GRID_MOST_ELEMENTS)
    dec, _, b, sigma = linear_model(d=2, D=2, sigma=0.1)
    W = torch.diag(torch.tensor([4.0, 0.2]))
    with torch.no_grad():
        dec.mean_net.net[0].weight.copy_(W)
    needed = TiledGrid(dec, 2, torch.float64, "cpu").n_points  # z1 halved 4 times
    monkeypatch.setattr(S, "GRID_MAX_POINTS", needed // 2)
    assert not TiledGrid(dec, 2, torch.float64, "cpu").resolved
    small = S.grid_budget(needed // (4 * S.GRID_ROWS_POINTS), 2)
    assert not TiledGrid(dec, 2, torch.float64, "cpu", max_points=small[0],
                         max_elements=small[1]).resolved
    points, values = S.grid_budget(needed, 2)  # 4 points per row: room for every level
    grid = TiledGrid(dec, 2, torch.float64, "cpu", max_points=points, max_elements=values)
    assert grid.resolved and grid.n_points == needed
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 2, generator=g) @ W.T + b + sigma * torch.randn(100, 2, generator=g)
    assert torch.allclose(grid.log_px(x), exact_log_px(x, W, b, sigma), atol=1e-6)


def _mlp_decoder(d, D, sigma, seed=0):
    """A random tanh decoder: curved, steep in places."""
    torch.manual_seed(seed)
    dec = GaussianDecoder(d, D, (32, 32), "tanh")
    with torch.no_grad():
        for p in dec.parameters():
            p.mul_(2.0)
    dec.set_scale(torch.full((D,), sigma))
    return dec


@pytest.mark.parametrize("d, D", [(1, 2), (2, 2), (2, 5)])
def test_tiled_grid_matches_a_fine_plain_grid(d, D):
    """On a curved decoder, the adaptive grid with pruning agrees with the
    plain grid summed over every point: mean error far below 0.01 nats, and
    the error estimate bounds the error on most rows."""
    dec = _mlp_decoder(d, D, sigma=0.1)
    with torch.no_grad():
        z = torch.randn(300, d, generator=torch.Generator().manual_seed(2))
        x = dec(z) + 0.1 * torch.randn(300, D, generator=torch.Generator().manual_seed(3))
    n = 4097 if d == 1 else 801
    z_ref, log_w = latent_grid(d, n, 8.0, torch.float64, "cpu")
    ref = quadrature_log_px(x, dec(z_ref).detach(), log_w, dec.scale.detach())
    grid = TiledGrid(dec, d, torch.float64, "cpu")
    lp, err = grid.log_px(x, return_error=True)
    gap = (lp - ref).abs()
    assert float(gap.mean()) < 2e-3
    assert float(gap.max()) < 0.03
    assert float((gap <= err + 1e-6).double().mean()) > 0.8


def test_tiled_grid_pruning_drops_nothing_that_matters(monkeypatch):
    """Summing every tile for every row gives the same values."""
    dec = _mlp_decoder(2, 3, sigma=0.05, seed=4)
    with torch.no_grad():
        x = dec(torch.randn(100, 2)) + 0.05 * torch.randn(100, 3)
    x[:3] += 5.0
    grid = TiledGrid(dec, 2, torch.float64, "cpu")
    pruned = grid.log_px(x)
    grid.margin = math.inf
    everything = grid.log_px(x)
    assert torch.allclose(pruned, everything, atol=1e-6)


def test_tiled_grid_adapts_to_the_decoder(monkeypatch):
    """Steeper against the noise: more points; unresolved when capped."""
    dec, *_ = linear_model(d=1, D=1, sigma=0.3)
    coarse = TiledGrid(dec, 1, torch.float64, "cpu").n_points
    dec.set_scale(torch.tensor([0.003]))
    fine = TiledGrid(dec, 1, torch.float64, "cpu")
    assert fine.n_points > 4 * coarse and fine.resolved
    monkeypatch.setitem(_scoring.MAX_LEVELS, 1, 3)
    assert not TiledGrid(dec, 1, torch.float64, "cpu").resolved


def test_importance_standard_error_is_calibrated():
    """With independent draws the reported standard error matches the spread
    of the estimates over repeats, and is 0 for the exact posterior."""
    dec, W, b, sigma = linear_model(d=1, D=2, sigma=0.3)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    means = torch.zeros(4, 1, 1)
    log_stds = torch.full((4, 1, 1), 0.5)
    log_w = torch.zeros(4, 1)
    estimates, errors = [], []
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        eps = torch.randn(256, 1, generator=g)
        lp, se = mixture_importance_log_px(x, dec, means, log_stds, log_w, eps, 0.5,
                                           return_error=True)
        estimates.append(lp)
        errors.append(se)
    spread = torch.stack(estimates).std(0)
    typical = torch.stack(errors).median(0).values
    assert torch.all((typical / spread - 1).abs() < 0.35)
    _, se = mixture_importance_log_px(
        x, dec, *_exact_posterior(x, W, b, sigma), torch.randn(16, 1), 0.5, return_error=True
    )
    assert torch.allclose(se, torch.zeros(4), atol=1e-6)


def _exact_posterior(x, W, b, sigma):
    cov = torch.linalg.inv(torch.eye(1) + W.T @ W / sigma**2)
    mu = (x - b) @ (cov @ W.T / sigma**2).T
    log_std = 0.5 * torch.log(torch.diagonal(cov)).expand_as(mu)
    return mu.unsqueeze(1), log_std.unsqueeze(1), torch.zeros(x.shape[0], 1)


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


def test_scoring_chunks_follow_the_device_memory(monkeypatch):
    """The CPU keeps its cache-sized chunks; a CUDA device gets a share of its
    free memory (between the CPU's chunk and the cap)."""
    assert _scoring.chunk_elements("cpu") == _scoring.CHUNK_ELEMENTS
    free = {"bytes": 100 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 0))
    big = _scoring.chunk_elements(torch.device("cuda"))
    assert big == 100 * 2**30 // (8 * _scoring.ACCELERATOR_MEMORY_SHARE)
    assert _scoring.importance_chunk_rows(1024, 3, 2, 64, torch.device("cuda")) == big // (1024 * 64)
    free["bytes"] = 2**20
    assert _scoring.chunk_elements(torch.device("cuda")) == _scoring.CHUNK_ELEMENTS
    free["bytes"] = 2**50
    assert _scoring.chunk_elements(torch.device("cuda")) == _scoring.ACCELERATOR_MAX_ELEMENTS


def test_tiled_grid_does_not_depend_on_the_chunk_size(monkeypatch):
    """Small chunks (many row and pair chunks) give the same values."""
    dec = _mlp_decoder(2, 3, sigma=0.1, seed=5)
    with torch.no_grad():
        x = dec(torch.randn(300, 2)) + 0.1 * torch.randn(300, 3)
    grid = TiledGrid(dec, 2, torch.float64, "cpu")
    whole = grid.log_px(x, return_error=True)
    monkeypatch.setattr(_scoring, "CHUNK_ELEMENTS", 4096)
    parts = grid.log_px(x, return_error=True)
    assert torch.allclose(whole[0], parts[0], atol=1e-12)
    assert torch.allclose(whole[1], parts[1], atol=1e-12)


def test_laplace_gaussian_is_the_exact_posterior_of_a_linear_model():
    """For f(z) = W z + b the posterior is Gaussian: one Gauss-Newton step
    from anywhere reaches its mean, and the Laplace covariance is its
    covariance."""
    dec, W, b, sigma = linear_model(d=4, D=6, sigma=0.2)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    start = 3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    mean, chol = _scoring.laplace_gaussian(dec, x, start, steps=1)
    cov = torch.linalg.inv(torch.eye(4) + W.T @ W / sigma**2)
    exact_mean = (x - b) @ (cov @ W.T / sigma**2).T
    assert torch.allclose(mean, exact_mean, atol=1e-8)
    assert torch.allclose(chol @ chol.transpose(1, 2), cov.expand(5, 4, 4), atol=1e-10)


def _poor_proposal(x, W, b, sigma, seed=0):
    """An encoder-like proposal that misses the posterior of the linear model:
    a diagonal Gaussian half as wide as the posterior's marginals, off its
    mean by two posterior standard deviations in a random direction."""
    d = W.shape[1]
    cov = torch.linalg.inv(torch.eye(d) + W.T @ W / sigma**2)
    mean = (x - b) @ (cov @ W.T / sigma**2).T
    sd = torch.sqrt(torch.diagonal(cov))
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(x.shape[0], d, generator=g), dim=1)
    means = (mean + 2 * sd * direction).unsqueeze(1)
    log_stds = torch.log(0.5 * sd).expand(x.shape[0], 1, d)
    return add_prior_component(means, log_stds, torch.zeros(x.shape[0], 1))


def test_adaptive_importance_sampling_recovers_from_a_poor_proposal():
    """In four latent dimensions with a proposal off the posterior, plain
    importance sampling is far off; the adaptive sampler (moments alone, and
    with the Laplace start) is close to the closed form and reports an error
    estimate that covers its error."""
    dec, W, b, sigma = linear_model(d=4, D=8, sigma=0.3)
    z = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    x = z @ W.T + b + sigma * torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    truth = exact_log_px(x, W, b, sigma)
    proposal = _poor_proposal(x, W, b, sigma)
    eps = torch.as_tensor(_scoring.sobol_normal(1024, 4, torch.Generator().manual_seed(0)))
    plain = mixture_importance_log_px(x, dec, *proposal, eps, 0.5)
    moments, se = _scoring.adaptive_importance_log_px(x, dec, *proposal, eps, 0.5,
                                                      return_error=True)
    start = _scoring.laplace_start(x, dec, proposal[0], width=8)
    laplace = _scoring.adaptive_importance_log_px(x, dec, *proposal, eps, 0.5, start=start)
    plain_error = (plain - truth).abs().mean()
    assert plain_error > 1.0
    assert (moments - truth).abs().mean() < 0.1 * plain_error
    assert torch.all((moments - truth).abs() < 4 * se + 1e-3)
    # the Laplace start is the exact posterior (widened): nearly exact
    assert (laplace - truth).abs().mean() < 2e-3
    assert (laplace - truth).abs().max() < 1e-2


def test_adaptive_importance_rows_are_independent_and_deterministic():
    dec, W, b, sigma = linear_model(d=2, D=3)
    x = torch.randn(10, 3)
    proposal = _poor_proposal(x, W, b, sigma, seed=1)
    eps = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    full = _scoring.adaptive_importance_log_px(x, dec, *proposal, eps, 0.3)
    part = _scoring.adaptive_importance_log_px(
        x[3:5], dec, *(p[3:5] for p in proposal), eps, 0.3)
    assert torch.allclose(full[3:5], part, atol=1e-12)
    assert torch.equal(full, _scoring.adaptive_importance_log_px(x, dec, *proposal, eps, 0.3))


@pytest.mark.parametrize("n_draws", [1, 2, 3, 5])
def test_adaptive_importance_with_very_few_draws(n_draws):
    """Blocks that round to no draws are skipped; the estimate stays finite."""
    dec, W, b, sigma = linear_model(d=2, D=3)
    x = torch.randn(4, 3)
    proposal = _poor_proposal(x, W, b, sigma)
    eps = torch.randn(n_draws, 2, generator=torch.Generator().manual_seed(0))
    start = _scoring.laplace_start(x, dec, proposal[0], width=3)
    for kw in ({}, {"start": start}):
        lp, se = _scoring.adaptive_importance_log_px(x, dec, *proposal, eps, 0.5,
                                                     return_error=True, **kw)
        assert torch.all(torch.isfinite(lp)) and torch.all(se >= 0)


@pytest.mark.parametrize("activation", ["tanh", "logistic", "relu", "identity"])
def test_decoder_jacobian_by_hand_equals_torch_func_jvp(activation):
    # the forward mode written out for the package's MLP decoders against
    # torch's own forward-mode differentiation
    from skmapa._networks import build

    gen = torch.Generator().manual_seed(0)
    decoder = build(GaussianDecoder, gen, 2, 5, (16, 8), activation).double()
    with torch.no_grad():
        decoder.linear_weight.copy_(torch.randn(5, 2, generator=gen, dtype=torch.float64))
    z = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    f, J = _scoring.decoder_jacobian(decoder, z)
    f_ref, J_ref = _scoring._decoder_jacobian_jvp(decoder, z)
    assert J.shape == (50, 5, 2)
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J, J_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, decoder(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("D, sigma", [(2, 0.3), (3, 0.5)])
def test_stratified_prior_grid_is_unbiased_and_converges(D, sigma):
    """The second phase's grid of shifted prior quantiles: its mean of
    p(x | z_g) is unbiased for p(x) over the shift (the mean over 400 evenly
    spread shifts equals the closed form), and with many points any one shift
    gives log p(x) itself."""
    dec, W, b, sigma = linear_model(d=1, D=D, sigma=sigma)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 1, generator=g) @ W.T + b + sigma * torch.randn(50, D, generator=g)
    exact = exact_log_px(x, W, b, sigma)
    shifts = (torch.arange(400, dtype=torch.float64) + 0.5) / 400
    with torch.no_grad():
        p_hat = torch.stack([torch.exp(stratified_prior_log_px(x, dec, 16, [u]))
                             for u in shifts])
    torch.testing.assert_close(torch.log(p_hat.mean(0)), exact, rtol=0, atol=1e-4)
    # 16 points: a single shift is off, but not by much on this smooth model
    assert float((torch.log(p_hat[0]) - exact).abs().max()) > 1e-3
    with torch.no_grad():
        fine = stratified_prior_log_px(x, dec, 4096, [0.37])
    torch.testing.assert_close(fine, exact, rtol=0, atol=1e-4)
    # the first stratum's point stays finite with a shift of exactly 0
    assert bool(torch.isfinite(stratified_prior_log_px(x, dec, 8, [0.0])).all())


def test_stratified_prior_grid_in_float32_keeps_small_noise_accurate():
    """float64 expands ||a - b||^2 into one matrix product; float32 forms the
    differences, which keep their precision when the noise is small."""
    dec, W, b, sigma = linear_model(d=1, D=5, sigma=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, generator=g) @ W.T + b + sigma * torch.randn(200, 5, generator=g)
    with torch.no_grad():
        double = stratified_prior_log_px(x, dec, 256, [0.3])
        single = stratified_prior_log_px(x.float(), dec.float(), 256, [0.3])
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), double, rtol=0, atol=0.2)
    assert float((single.double() - double).abs().mean()) < 0.01
