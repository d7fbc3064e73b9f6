"""torchsgd: SGD for PyTorch — an exact drop-in for torch.optim.SGD, fast by default, lean and capable."""

from torchsgd.groups import param_groups
from torchsgd.optim import LARS, SGD, SGDW, ScheduleFreeSGD

__all__ = ["SGD", "SGDW", "LARS", "ScheduleFreeSGD", "param_groups", "__version__"]
__version__ = "0.1.0"
