"""torchsgd: SGD for PyTorch — an exact drop-in for torch.optim.SGD, fast by default, lean and capable."""

from torchsgd.optim import SGD

__all__ = ["SGD", "__version__"]
__version__ = "0.1.0"
