"""Update rules: the formulas, written once as pure functions on tensors. Engines run them."""

from torchsgd.rules.gradients import all_finite, clip_coefficient, global_norm
from torchsgd.rules.sgd import LIST, TENSOR, Rounding, SGDHyper, TensorAlgebra, sgd_direction, sgd_update

__all__ = [
    "SGDHyper",
    "Rounding",
    "TensorAlgebra",
    "TENSOR",
    "LIST",
    "sgd_direction",
    "sgd_update",
    "global_norm",
    "clip_coefficient",
    "all_finite",
]
