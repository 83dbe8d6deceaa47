"""What a recorder needs to know about a torch optimizer.

The optimizer *family* decides which update model the EPK core applies:

* ``"sgd"``   — :class:`torch.optim.SGD` (momentum, dampening, nesterov, coupled decay)
* ``"adam"``  — :class:`torch.optim.Adam` with coupled (L2) decay, amsgrad
* ``"adamw"`` — :class:`torch.optim.AdamW`, or ``Adam(decoupled_weight_decay=True)``
* ``"other"`` — anything else: the model and training views still work (regularization = 0),
  the data view refuses.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Type

import torch

__all__ = ["unwrap_optimizer", "optimizer_family", "group_hyperparameters", "FAMILIES"]

FAMILIES = ("sgd", "adam", "adamw", "other")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Return the torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or _is_wrapper(optimizer):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 8:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"expected a torch.optim.Optimizer (or a wrapper exposing one as .optimizer), "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


def _is_wrapper(opt: Any) -> bool:
    # accelerate's AcceleratedOptimizer subclasses Optimizer but delegates to .optimizer
    inner = getattr(opt, "optimizer", None)
    return isinstance(inner, torch.optim.Optimizer) and inner is not opt


def _uses_torch_step(opt: torch.optim.Optimizer, base: Type[torch.optim.Optimizer]) -> bool:
    return isinstance(opt, base) and getattr(type(opt), "step", None) is base.step


def optimizer_family(optimizer: torch.optim.Optimizer) -> str:
    """Classify ``optimizer`` into one of :data:`FAMILIES` (exact torch update rules only)."""
    if _uses_torch_step(optimizer, torch.optim.AdamW):
        return "adamw"
    if _uses_torch_step(optimizer, torch.optim.Adam):
        decoupled = any(bool(g.get("decoupled_weight_decay", False)) for g in optimizer.param_groups)
        return "adamw" if decoupled else "adam"
    if _uses_torch_step(optimizer, torch.optim.SGD):
        return "sgd"
    return "other"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return float(value.item())
        return None
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        items = [_jsonable(v) for v in value]
        return None if any(v is None and o is not None for v, o in zip(items, value)) else items
    return None


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Scalar hyperparameters of every parameter group (``lr`` included), JSON-ready.

    Values that cannot be represented (callables, tensors with several elements) are dropped.
    """
    out = []
    for group in optimizer.param_groups:
        hyper: Dict[str, Any] = {}
        for key, value in group.items():
            if key == "params":
                continue
            converted = _jsonable(value)
            if converted is not None or value is None:
                hyper[key] = converted
        out.append(hyper)
    return out
