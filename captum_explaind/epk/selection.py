"""Selecting parameters and grouping them into layers.

Captum's attribution methods take layers as module objects, its influence methods as dotted
names; users also want glob patterns. Every selector resolves to parameter names:

* an ``nn.Module`` that is part of the model → all parameters under it;
* an ``nn.Parameter`` of the model → itself;
* a string that is a parameter name → itself; a module's dotted name → all parameters under it
  (``""`` is the whole model); otherwise a glob pattern (``fnmatch``) matched against parameter
  names *and* module names (``"*.attn.*"``, ``"blocks.?.mlp"``).

A selector that matches nothing is an error that names it.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Any, List, Mapping, Sequence, Tuple, Union

from torch import nn

from ..errors import SelectorError

__all__ = ["resolve_parameters", "resolve_groups", "Selector"]

Selector = Union[str, nn.Module, nn.Parameter]


def _under(prefix: str, names: Sequence[str]) -> List[str]:
    if prefix == "":
        return list(names)
    return [n for n in names if n == prefix or n.startswith(prefix + ".")]


def _describe(sel: Any) -> str:
    if isinstance(sel, nn.Parameter):
        return f"parameter of shape {tuple(sel.shape)}"
    if isinstance(sel, nn.Module):
        return f"module {type(sel).__name__}"
    return repr(sel)


def _resolve_one(model: nn.Module, sel: Any, all_names: Sequence[str]) -> Tuple[str, List[str]]:
    """Return a display name and the parameter names (in model order) selected by ``sel``."""
    if isinstance(sel, nn.Parameter):
        for n, p in model.named_parameters():
            if p is sel:
                return n, [n]
        raise SelectorError(f"{_describe(sel)} is not a parameter of the model")
    if isinstance(sel, nn.Module):
        for n, mod in model.named_modules():
            if mod is sel:
                names = _under(n, all_names)
                if not names:
                    raise SelectorError(f"module {n or type(sel).__name__!r} has no parameters")
                return n or type(sel).__name__, names
        raise SelectorError(f"{_describe(sel)} is not a submodule of the model")
    if isinstance(sel, str):
        if sel in all_names:
            return sel, [sel]
        modules = dict(model.named_modules())
        if sel in modules:
            names = _under(sel, all_names)
            if not names:
                raise SelectorError(f"module {sel!r} has no parameters")
            return sel or "<model>", names
        if any(ch in sel for ch in "*?["):
            chosen = {n for n in all_names if fnmatch.fnmatchcase(n, sel)}
            for mname in modules:
                if mname and fnmatch.fnmatchcase(mname, sel):
                    chosen.update(_under(mname, all_names))
            if chosen:
                return sel, [n for n in all_names if n in chosen]
            raise SelectorError(f"pattern {sel!r} matches no parameter or module of the model")
        raise SelectorError(f"{sel!r} is neither a parameter nor a module of the model")
    raise TypeError(f"cannot select parameters with {type(sel).__name__}; use a name, pattern, module or parameter")


def _check_sequence(selectors: Any, what: str) -> None:
    if isinstance(selectors, (bytes, Mapping)) or not isinstance(selectors, (Sequence, set, frozenset)):
        raise TypeError(
            f"{what} must be a name, glob, module or parameter, or a list of them, got {type(selectors).__name__}"
            f" {selectors!r}"[:300]
        )


def resolve_parameters(model: nn.Module, selectors: Union[Selector, Sequence[Selector], None]) -> List[str]:
    """Parameter names selected by one selector or a list of them (model order, no repeats).

    ``None`` selects every parameter.
    """
    all_names = [n for n, _ in model.named_parameters()]
    if selectors is None:
        return all_names
    if isinstance(selectors, (str, nn.Module)):
        selectors = [selectors]
    _check_sequence(selectors, "parameters")
    chosen = set()
    for sel in selectors:
        chosen.update(_resolve_one(model, sel, all_names)[1])
    return [n for n in all_names if n in chosen]


def resolve_groups(
    model: nn.Module, layers: Union[Selector, Sequence[Selector], Mapping[str, Any]]
) -> "OrderedDict[str, List[str]]":
    """Named groups of parameter names.

    Args:
        layers: a selector, a list of selectors (one group each, named after the selector), or a
            mapping ``group name -> selector or list of selectors``.

    Returns:
        *OrderedDict[str, list[str]]*: group name → parameter names. Groups may overlap.
    """
    all_names = [n for n, _ in model.named_parameters()]
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    if isinstance(layers, Mapping):
        if not layers:
            raise ValueError("layers is an empty mapping: give at least one group name -> selector(s)")
        for gname, sels in layers.items():
            if isinstance(sels, (str, nn.Module)) or not isinstance(sels, Sequence):
                sels = [sels]
            if not sels:
                raise ValueError(f"layers[{gname!r}] is empty: give the group a selector")
            chosen = set()
            for sel in sels:
                chosen.update(_resolve_one(model, sel, all_names)[1])
            groups[str(gname)] = [n for n in all_names if n in chosen]
        return groups
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    _check_sequence(layers, "layers")
    for sel in layers:
        name, names = _resolve_one(model, sel, all_names)
        base, k = name, 2
        while name in groups:
            name, k = f"{base}#{k}", k + 1
        groups[name] = names
    if not groups:
        raise ValueError("layers is empty")
    return groups
