"""skmapa: scikit-learn density estimators with deep latent-variable models.

Three estimators share one PyTorch core: :class:`MAPADensity` (model-agnostic
posterior approximation), :class:`VAEDensity` and :class:`IWAEDensity`.
"""

from ._persistence import load, save
from .iwae import IWAEDensity
from .mapa import MAPADensity
from .vae import VAEDensity

__version__ = "0.1.0"

__all__ = ["IWAEDensity", "MAPADensity", "VAEDensity", "__version__", "load", "save"]
