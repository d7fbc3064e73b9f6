"""Optimizer classes: argument checks, torch-format state, and dispatch to an engine."""

from torchsgd.optim.lars import LARS
from torchsgd.optim.schedule_free import ScheduleFreeSGD
from torchsgd.optim.sgd import SGD, SGDW

__all__ = ["SGD", "SGDW", "LARS", "ScheduleFreeSGD"]
