"""skmapa: scikit-learn density estimators with deep latent-variable models.

Three estimators share one PyTorch core: :class:`MAPADensity` (model-agnostic
posterior approximation), :class:`VAEDensity` and :class:`IWAEDensity`.
"""

from .iwae import IWAEDensity
from .vae import VAEDensity

__version__ = "0.1.0"

__all__ = ["IWAEDensity", "VAEDensity", "__version__"]
