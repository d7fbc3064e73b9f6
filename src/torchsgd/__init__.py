"""torchsgd: SGD for PyTorch — an exact drop-in for torch.optim.SGD, fast by default, lean and capable."""

from torchsgd.groups import param_groups
from torchsgd.optim import LARS, SGD, SGDW, ScheduleFreeSGD
from torchsgd.optim.ddp import OverlappedStep, overlap_with_ddp

__all__ = [
    "SGD",
    "SGDW",
    "LARS",
    "ScheduleFreeSGD",
    "param_groups",
    "overlap_with_ddp",
    "OverlappedStep",
    "__version__",
]
__version__ = "0.1.0"
