"""Optimizer classes: argument checks, torch-format state, and dispatch to an engine."""

from torchsgd.optim.sgd import SGD

__all__ = ["SGD"]
