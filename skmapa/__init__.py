"""skmapa: scikit-learn density estimators with deep latent-variable models.

Three estimators share one PyTorch core: :class:`MAPADensity` (model-agnostic
posterior approximation), :class:`VAEDensity` and :class:`IWAEDensity`.
"""

import numpy as _np
import torch as _torch

# torch.func (functional_call, jvp) is new in PyTorch 2.0, the oldest release
# the test suite passes with; older ones would fail later, deep inside fit.
if not hasattr(_torch, "func"):
    raise ImportError(
        f"skmapa needs PyTorch 2.0 or later (it uses torch.func); found torch "
        f"{_torch.__version__}. Install a newer torch first (the installation "
        "page says how to get a CPU-only build), then skmapa."
    )
# torch releases before 2.3 were built against NumPy 1 and cannot convert
# arrays beside NumPy 2 ("Numpy is not available", in every fit and score).
try:
    _torch.zeros(1).numpy()
except RuntimeError as _err:
    raise ImportError(
        f"torch {_torch.__version__} cannot convert arrays of numpy {_np.__version__} "
        f"({_err}). torch releases before 2.3 need numpy < 2: install "
        "'numpy<2', or a newer torch."
    ) from _err
del _np, _torch

from ._persistence import load, save
from .iwae import IWAEDensity
from .mapa import MAPADensity
from .vae import VAEDensity

__version__ = "0.1.0"

__all__ = ["IWAEDensity", "MAPADensity", "VAEDensity", "__version__", "load", "save"]
