"""Shared machinery of the estimators with an encoder network (VAE, IWAE)."""

import math

import torch

from ._base import BaseDeepDensity, TrainingStage
from ._networks import GaussianDecoder, GaussianEncoder, build

#: The encoder's standard deviations are widened by this factor in the
#: importance-sampling proposal: amortized posteriors tend to be too narrow,
#: and a proposal narrower than the posterior has unbounded weights.
PROPOSAL_WIDENING = 1.5


class AmortizedDensity(BaseDeepDensity):
    """A decoder and a Gaussian encoder trained jointly on a per-row bound.

    Subclasses implement ``_row_bound(x, generator)`` returning per-row
    ``(surrogate, bound)``.
    """

    def _network_specs(self, n_features):
        sizes = tuple(int(s) for s in self.hidden_layer_sizes)
        return {
            "decoder_": (GaussianDecoder, self.n_components, n_features, sizes,
                         self.activation),
            "encoder_": (GaussianEncoder, n_features, self.n_components, sizes,
                         self.activation),
        }

    def _initialize(self, data, generator):
        for name, (cls, *args) in self._network_specs(data.X.shape[1]).items():
            setattr(self, name, build(cls, generator, *args))

    def _noise(self, shape, generator):
        eps = torch.randn(shape, generator=generator, dtype=torch.float64)
        return eps.to(device=self.device_, dtype=self._torch_dtype)

    def _training_stages(self, data):
        def batch_loss(idx, generator):
            x, w = data.X[idx], data.weights[idx]
            surrogate, bound = self._row_bound(x, generator)
            return -(w * surrogate).mean(), -(w * bound).mean().detach()

        validation = None
        if data.X_val is not None:
            val_generator = torch.Generator().manual_seed(0)

            def validation():
                _, bound = self._row_bound(data.X_val, val_generator.manual_seed(0))
                return -(data.weights_val * bound).mean()

        params = list(self.decoder_.parameters()) + list(self.encoder_.parameters())
        return [
            TrainingStage(
                type(self).__name__.replace("Density", "").lower(),
                data.X.shape[0],
                batch_loss,
                params,
                self.max_iter,
                validation,
            )
        ]

    def _proposal(self, X):
        mu, log_std = self.encoder_(X)
        return (
            mu.unsqueeze(1),
            (log_std + math.log(PROPOSAL_WIDENING)).unsqueeze(1),
            mu.new_zeros((mu.shape[0], 1)),
        )

    def _encode(self, X):
        return self.encoder_(X)[0]
