"""A per-row proposal component that learns each training row's posterior.

MAPA's second phase maximises an importance-weighted bound whose proposal is
the MAPA mixture over the codes of a row's neighbours. With two or more
latent dimensions that mixture spreads over the whole neighbourhood, a region
many times wider than the row's posterior, and a 16-draw bound stays loose
(0.46 nats per row at the end of a fit of a 2-D surface in 10 dimensions);
the looseness biases the decoder (its noise stays above the truth).

``RowProposal`` keeps one diagonal Gaussian per training row, started at the
moments of the row's MAPA mixture and moved, after every step that draws for
the row, towards the self-normalised importance-weighted moments of that
step's draws: an adaptive importance sampler (population Monte Carlo) that
reuses the draws the bound has already decoded, so it costs no decoder pass.
The proposal of a step is this component mixed with the MAPA mixture (itself
mixed with the prior): the MAPA mixture keeps every draw's weight bounded
where the learnt component is off, and the bound stays a valid
importance-weighted bound of log p(x) whatever the component is, since the
component is fixed during the step that draws from it. MAPA itself (the
neighbours, their weights and the first phase) is unchanged and is still
computed from the data alone: the cache only chooses where the bound looks.
"""

import math

import torch

from ._scoring import mixture_covariance

#: Weight of the learnt component in the proposal of a step.
ROW_WEIGHT = 0.5
#: The learnt component's standard deviations are widened by this factor
#: when drawn from (heavier coverage of the posterior's tails).
ROW_WIDENING = 1.2
#: Step of the moving average towards a step's weighted moments.
ROW_RATE = 0.5
#: The weighted variance of a step is shrunk towards the current one as if
#: the current one were this many extra draws, against the draws' effective
#: sample size (a step whose weight sits on one draw moves little).
ROW_PRIOR_COUNT = 2.0


class RowProposal:
    """Per-row diagonal Gaussians ``(mean, log_std)`` of shape (n_rows, d).

    Parameters
    ----------
    means, log_stds : tensors (n_rows, C, d)
        Each row's proposal mixture before the learnt component (the MAPA
        mixture with the prior), and ``log_weights`` (n_rows, C) its
        normalised log weights: the learnt component starts at its moments.
    """

    def __init__(self, means, log_stds, log_weights):
        with torch.no_grad():
            w = torch.exp(log_weights - torch.logsumexp(log_weights, 1, keepdim=True))
            self.mean = (w.unsqueeze(-1) * means).sum(1)
            var = torch.diagonal(mixture_covariance(means, log_stds, log_weights),
                                 dim1=-2, dim2=-1)
            self.log_std = 0.5 * torch.log(var.clamp(min=1e-12))

    def mixed(self, rows, means, log_stds, log_weights):
        """The rows' proposal: their learnt component at ``ROW_WEIGHT`` mixed
        with the given mixture ``(means, log_stds, log_weights)``."""
        means = torch.cat([self.mean[rows].unsqueeze(1), means], dim=1)
        log_stds = torch.cat(
            [(self.log_std[rows] + math.log(ROW_WIDENING)).unsqueeze(1), log_stds], dim=1)
        log_weights = torch.cat(
            [log_weights.new_full((rows.numel(), 1), math.log(ROW_WEIGHT)),
             log_weights + math.log1p(-ROW_WEIGHT)], dim=1)
        return means, log_stds, log_weights

    @torch.no_grad()
    def update(self, rows, z, log_w):
        """Move the rows' components towards the weighted moments of their
        draws ``z`` (n, S, d) with log importance weights ``log_w`` (n, S)."""
        z, log_w = z.detach(), log_w.detach()
        w = torch.softmax(log_w, dim=1).unsqueeze(-1)
        mean = (w * z).sum(1)
        var = (w * (z - mean.unsqueeze(1)) ** 2).sum(1)
        ess = 1.0 / (w * w).sum(1)
        current = torch.exp(2 * self.log_std[rows])
        var = (ess * var + ROW_PRIOR_COUNT * current) / (ess + ROW_PRIOR_COUNT)
        self.mean[rows] += ROW_RATE * (mean - self.mean[rows])
        var = current + ROW_RATE * (var - current)
        self.log_std[rows] = 0.5 * torch.log(var.clamp(min=1e-12))
