"""The recursive mixture encoder of Kim & Pavlovic (NeurIPS 2020).

q(z | x) is a mixture of Gaussians grown one component at a time::

    Q_1 = q_1,    Q_m = (1 - eps_m(x)) Q_{m-1} + eps_m(x) q_m,

so the weight of component j among the first n is
``eps_j(x) prod_{i=j+1..n} (1 - eps_i(x))`` with ``eps_1 = 1``: the weights
sum to one by construction. Every component q_m(z | x) = N(mu_m(x),
diag(std_m(x)^2)) has its own encoder network and every weight ``eps_m(x) =
sigmoid(g_m(x))`` its own gate network, so training component m (a stage of
its own, see ``AmortizedDensity``) leaves the earlier ones exactly as they
were. Inference at test time is one forward pass through all of them.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from ._networks import MLP, GaussianEncoder, mixture_log_prob


class MixtureEncoder(nn.Module):
    """q(z | x) = sum_m w_m(x) N(z; mu_m(x), diag(std_m(x)^2)), grown recursively.

    Parameters
    ----------
    n_features, n_components : int
        Input and latent dimensions.
    n_mixture : int
        Number of mixture components.
    hidden_layer_sizes, activation
        Of every component's encoder and every gate.
    """

    def __init__(self, n_features, n_components, n_mixture, hidden_layer_sizes,
                 activation):
        super().__init__()
        self.n_components = n_components
        self.n_mixture = n_mixture
        self.heads = nn.ModuleList(
            GaussianEncoder(n_features, n_components, hidden_layer_sizes, activation)
            for _ in range(n_mixture)
        )
        self.gates = nn.ModuleList(
            MLP(n_features, 1, hidden_layer_sizes, activation)
            for _ in range(n_mixture - 1)
        )

    def reset_gates(self, weight):
        """Start every gate at the constant eps_m(x) = ``weight``."""
        with torch.no_grad():
            for gate in self.gates:
                last = gate.net[-1]
                last.weight.zero_()
                last.bias.fill_(math.log(weight) - math.log1p(-weight))

    def component(self, x, m):
        """``(mu, log_std)`` of component ``m`` (0-based), each (n, d)."""
        return self.heads[m](x)

    def gate_logits(self, x, n_active=None):
        """Logits of eps_2(x), ..., eps_n(x): shape (n, n_active - 1)."""
        n_active = self.n_mixture if n_active is None else n_active
        if n_active == 1:
            return x.new_zeros((x.shape[0], 0))
        return torch.cat([self.gates[m](x) for m in range(n_active - 1)], dim=-1)

    @staticmethod
    def weights_from_logits(g):
        """Normalised log weights (n, C) of a mixture from its C - 1 gate logits."""
        zero = g.new_zeros((g.shape[0], 1))
        log_eps = torch.cat([zero, F.logsigmoid(g)], dim=-1)
        log_keep = F.logsigmoid(-g)  # log(1 - eps_m), m = 2..C
        # sum over the components added after j: a reversed cumulative sum
        later = torch.flip(torch.cumsum(torch.flip(log_keep, [-1]), -1), [-1])
        return log_eps + torch.cat([later, zero], dim=-1)

    def log_weights(self, x, n_active=None):
        """Normalised log weights (n, n_active) of the first ``n_active`` components."""
        return self.weights_from_logits(self.gate_logits(x, n_active))

    def forward(self, x, n_active=None):
        """``(means, log_stds, log_weights)`` of shapes (n, C, d), (n, C, d), (n, C)."""
        n_active = self.n_mixture if n_active is None else n_active
        parts = [self.heads[m](x) for m in range(n_active)]
        means = torch.stack([p[0] for p in parts], dim=1)
        log_stds = torch.stack([p[1] for p in parts], dim=1)
        return means, log_stds, self.log_weights(x, n_active)

    def log_prob(self, z, x, n_active=None):
        """log q(z | x) for ``z`` of shape (..., n, d)."""
        return mixture_log_prob(z, *self(x, n_active))

    def mean(self, x, n_active=None):
        """The mixture mean ``sum_m w_m(x) mu_m(x)``, (n, d)."""
        means, _, log_w = self(x, n_active)
        return (torch.exp(log_w).unsqueeze(-1) * means).sum(1)
