"""fop: FOP (Fisher-Orthogonal Projection) and K-FAC optimizers for PyTorch.

from fop import FOP
optimizer = FOP(model, lr=0.1)   # the one line that changes in a training loop
"""

from . import functional, nn
from .ddp import dual_gradient_hook
from .distributed import DistributedCommunicator
from .optimizer import FOP, KFAC, PAPER_PRESET, KroneckerOptimizer

__all__ = [
    "FOP",
    "KFAC",
    "PAPER_PRESET",
    "DistributedCommunicator",
    "KroneckerOptimizer",
    "dual_gradient_hook",
    "functional",
    "nn",
]
__version__ = "0.5.0.dev0"
