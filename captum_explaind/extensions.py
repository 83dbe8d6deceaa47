"""Extension points that adapters fill, so the core never imports a model library.

A model library's adapter (``captum_explaind.adapters.huggingface``, …) registers what only it
knows — for example the per-sample form of a model family's own training loss, used when the
data view gets ``loss_fn=None``. The core looks entries up by the model's class, importing the
adapter for the model's top-level package lazily, the first time a model of that package is seen
(so ``import captum_explaind`` imports no model library, and a user never has to import the
adapter for the defaults to apply).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

__all__ = ["register_default_loss", "default_loss_for", "ADAPTER_MODULES"]

#: top-level package of a model class → the adapter module that registers its entries.
ADAPTER_MODULES: Dict[str, str] = {
    "transformers": "captum_explaind.adapters.huggingface",
    "peft": "captum_explaind.adapters.huggingface",
}

#: (predicate on the model, factory model → per-sample loss_fn(outputs, target) → [n])
_DEFAULT_LOSSES: List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module], Callable]]] = []
_LOADED: Dict[str, bool] = {}


def register_default_loss(predicate: Callable[[nn.Module], bool], factory: Callable[[nn.Module], Callable]) -> None:
    """Register the default per-sample training loss for the models ``predicate`` accepts.

    Args:
        predicate (Callable): ``predicate(model) -> bool``.
        factory (Callable): ``factory(model) -> loss_fn`` where ``loss_fn(outputs, target)``
            returns one loss per example, in the form the recorder's batch weights multiply
            (see :mod:`captum_explaind.epk.training_set`).
    """
    _DEFAULT_LOSSES.append((predicate, factory))


def _load_adapter_for(model: nn.Module) -> None:
    root = type(model).__module__.split(".", 1)[0]
    module = ADAPTER_MODULES.get(root)
    if module is None or _LOADED.get(module):
        return
    _LOADED[module] = True
    importlib.import_module(module)


def default_loss_for(model: nn.Module) -> Optional[Callable[..., Any]]:
    """The registered default per-sample loss for ``model``, or ``None`` when no adapter has one.

    Args:
        model (nn.Module): the model being explained.

    Returns:
        *Callable or None*: ``loss_fn(outputs, target) -> [n]``.
    """
    _load_adapter_for(model)
    for predicate, factory in reversed(_DEFAULT_LOSSES):
        if predicate(model):
            return factory(model)
    return None
