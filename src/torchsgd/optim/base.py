"""torch.optim.Optimizer, without importing torch._dynamo until something compiles.

torch.optim.Optimizer's ``add_param_group`` (called by every constructor), ``zero_grad``, ``state_dict`` and
``load_state_dict`` carry ``@torch._disable_dynamo``, whose first call imports torch._dynamo, and with it
sympy: about 70 MB of resident memory and a second of wall time, paid by any process that builds a torch
optimizer, only so that torch.compile does not trace these methods.

If torch._dynamo has not been imported, nothing is being compiled, so the methods run as they are; once it
has been (torch.compile imports it), they go through torch's own wrappers and are disabled for dynamo exactly
as torch's are. Same behaviour either way, minus the import for programs that never compile.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

__all__ = ["LazyDynamoOptimizer"]


def _dynamo_disabled_once_imported(torch_method: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``@torch._disable_dynamo`` method, called through its wrapper only once dynamo is loaded."""
    undecorated = getattr(torch_method, "__wrapped__", torch_method)

    @functools.wraps(undecorated)
    def method(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:
            return torch_method(*args, **kwargs)
        return undecorated(*args, **kwargs)

    return method


class LazyDynamoOptimizer(Optimizer):
    """torch.optim.Optimizer whose dynamo-disabled methods import torch._dynamo only if it is in use."""

    add_param_group = _dynamo_disabled_once_imported(Optimizer.add_param_group)
    zero_grad = _dynamo_disabled_once_imported(Optimizer.zero_grad)
    state_dict = _dynamo_disabled_once_imported(Optimizer.state_dict)
    load_state_dict = _dynamo_disabled_once_imported(Optimizer.load_state_dict)
