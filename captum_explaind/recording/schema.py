"""Validation of a trajectory's JSON: the manifest, and each step's record against it.

Checked before anything is built from them, so that a damaged or edited file is a
:class:`TrajectoryCorruptError` naming the file and the field — never a raw ``KeyError`` or
``TypeError``, and never a silently different number (an optimizer family that contradicts the
recorded hyperparameters, a learning rate for a group that does not exist, ...).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from ..errors import TrajectoryCorruptError
from . import format as fmt
from .optim_spec import FAMILIES

__all__ = ["validate_manifest", "validate_record"]

_MAX_GROUPS = 1 << 16
# Hyperparameters each family's update rule reads (the data/model views depend on them).
_FAMILY_KEYS = {"sgd": ("momentum", "dampening", "nesterov", "weight_decay"),
                "adam": ("betas", "eps", "weight_decay"), "adamw": ("betas", "eps", "weight_decay")}


def _fail(where: str, field: str, problem: str) -> TrajectoryCorruptError:
    return TrajectoryCorruptError(f"{where}: field {field!r} {problem}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(obj: Dict[str, Any], key: str, kind: Any, where: str, field: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise _fail(where, field, "is missing")
    value = obj[key]
    if optional and value is None:
        return None
    if kind == "int":
        ok = _is_int(value)
    elif kind == "num":
        ok = _is_num(value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise _fail(where, field, f"has the wrong type ({type(value).__name__})")
    return value


def _shape(value: Any, where: str, field: str) -> List[int]:
    if not isinstance(value, list) or len(value) > 16 or not all(_is_int(d) and d >= 0 for d in value):
        raise _fail(where, field, f"is not a shape (a list of non-negative ints): {value!r:.80}")
    return value


def _dtype(value: Any, where: str, field: str) -> str:
    try:
        fmt.str_to_dtype(value if isinstance(value, str) else "?")
    except ValueError:
        raise _fail(where, field, f"is not a known dtype: {value!r:.40}") from None
    return value


def _tensors(items: Any, where: str, field: str, param: bool, n_groups: int) -> None:
    if not isinstance(items, list):
        raise _fail(where, field, "is not a list")
    seen = set()
    for i, p in enumerate(items):
        f = f"{field}[{i}]"
        if not isinstance(p, dict):
            raise _fail(where, f, "is not an object")
        name = _get(p, "name", str, where, f + ".name")
        if name in seen:
            raise _fail(where, f + ".name", f"repeats {name!r}")
        seen.add(name)
        _shape(p.get("shape"), where, f + ".shape")
        _dtype(p.get("dtype"), where, f + ".dtype")
        if param:
            if "model_dtype" in p:
                _dtype(p["model_dtype"], where, f + ".model_dtype")
            trainable = _get(p, "trainable", bool, where, f + ".trainable")
            group = _get(p, "group", "int", where, f + ".group", optional=True)
            if trainable and (group is None or not 0 <= group < n_groups):
                raise _fail(where, f + ".group", f"is {group!r}, not a group in 0..{n_groups - 1}")


def validate_manifest(m: Any, where: str) -> None:
    """Check the structure of a parsed manifest (format and version are checked by the caller)."""
    if not isinstance(m, dict):
        raise TrajectoryCorruptError(f"{where} is a JSON {type(m).__name__}, not an object")
    for key in ("model", "optimizer"):
        if not isinstance(m.get(key), dict):
            raise TrajectoryCorruptError(f"{where} lacks the {key!r} section" if key not in m or m[key] is None
                                         else f"{where}: field {key!r} is not an object")
    opt = m["optimizer"]
    family = _get(opt, "family", str, where, "optimizer.family")
    if family not in FAMILIES:
        raise _fail(where, "optimizer.family", f"is {family!r}, not one of {FAMILIES}")
    _get(opt, "class", str, where, "optimizer.class")
    n_groups = _get(opt, "n_groups", "int", where, "optimizer.n_groups")
    if not 1 <= n_groups <= _MAX_GROUPS:
        raise _fail(where, "optimizer.n_groups", f"is {n_groups}")
    keys = _get(opt, "state_keys", list, where, "optimizer.state_keys", optional=True) or []
    if not all(isinstance(k, str) and "/" not in k for k in keys):
        raise _fail(where, "optimizer.state_keys", "is not a list of names")
    groups = _get(opt, "groups", list, where, "optimizer.groups", optional=True)
    if groups is not None and (len(groups) != n_groups or not all(isinstance(g, dict) for g in groups)):
        raise _fail(where, "optimizer.groups", f"does not hold {n_groups} objects")
    _tensors(m["model"].get("params"), where, "model.params", True, n_groups)
    if not any(p["trainable"] for p in m["model"]["params"]):
        raise _fail(where, "model.params", "holds no trainable parameter")
    if "buffers" in m["model"]:
        _tensors(m["model"]["buffers"], where, "model.buffers", False, n_groups)
    status = _get(m, "status", str, where, "status", optional=True)
    n = _get(m, "num_steps", "int", where, "num_steps", optional=True)
    if n is not None and n < 0:
        raise _fail(where, "num_steps", f"is negative ({n})")
    if status == "closed" and "num_steps" in m and n is None:
        raise _fail(where, "num_steps", "is missing in a closed recording")
    for key in ("recording", "training_modes"):
        if key in m and not isinstance(m[key], dict):
            raise _fail(where, key, "is not an object")


def _check_group(g: Any, i: int, family: str, expected_keys: Optional[Sequence[str]], where: str) -> None:
    f = f"groups[{i}]"
    if not isinstance(g, dict):
        raise _fail(where, f, "is not an object")
    if expected_keys is not None and sorted(g) != sorted(expected_keys):
        raise _fail(where, f, f"has hyperparameters {sorted(g)}, the manifest's optimizer has {sorted(expected_keys)}")
    for key in _FAMILY_KEYS.get(family, ()):
        if key not in g:
            raise _fail(where, f"{f}.{key}", f"is missing, which a {family!r} optimizer always has "
                                             "(the optimizer family does not match the recorded hyperparameters)")
    if "betas" in g:
        b = g["betas"]
        if not (isinstance(b, list) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b)):
            raise _fail(where, f"{f}.betas", f"is not two numbers in [0, 1): {b!r:.60}")
    for key in ("eps", "momentum", "dampening", "weight_decay"):
        if key in g and g[key] is not None and not (_is_num(g[key]) and math.isfinite(g[key]) and g[key] >= 0):
            raise _fail(where, f"{f}.{key}", f"is not a finite non-negative number: {g[key]!r:.40}")


def validate_record(obj: Any, *, step: int, manifest: Dict[str, Any], trainable: Sequence[str],
                    n_entries: int, where: str) -> None:
    """Check a step record's fields against the manifest and the step file (``n_entries`` batch
    entries)."""
    if not isinstance(obj, dict):
        raise TrajectoryCorruptError(f"{where}: the step record is a {type(obj).__name__}, not an object")
    opt = manifest["optimizer"]
    n_groups, family = opt["n_groups"], opt["family"]
    s = _get(obj, "step", "int", where, "step")
    if s != step:
        raise TrajectoryCorruptError(f"{where} holds the record of step {s}, not {step}")
    if "family" in obj and obj["family"] != family:
        raise _fail(where, "family", f"is {obj['family']!r} but the manifest says {family!r}")
    lr = _get(obj, "lr", list, where, "lr")
    if len(lr) != n_groups:
        raise TrajectoryCorruptError(f"{where}: {len(lr)} learning rates for {n_groups} parameter groups")
    if not all(_is_num(x) and math.isfinite(x) and x >= 0 for x in lr):
        raise _fail(where, "lr", f"is not a list of finite non-negative numbers: {lr!r:.80}")
    groups = _get(obj, "groups", list, where, "groups")
    if len(groups) != n_groups:
        raise _fail(where, "groups", f"holds {len(groups)} groups, the manifest {n_groups}")
    initial = opt.get("groups")
    for i, g in enumerate(groups):
        keys = None if initial is None else [k for k in initial[i] if k != "lr"]
        _check_group(g, i, family, keys, where)
    names = set(trainable)
    inactive = _get(obj, "inactive", list, where, "inactive", optional=True) or []
    if not all(isinstance(n, str) and n in names for n in inactive):
        raise _fail(where, "inactive", "names parameters that are not trainable parameters of the manifest")
    grad_sq = _get(obj, "grad_sq", dict, where, "grad_sq", optional=True) or {}
    if not all(k in names and _is_num(v) for k, v in grad_sq.items()):
        raise _fail(where, "grad_sq", "is not a map of trainable parameters to numbers")
    if set(grad_sq) & set(inactive):
        raise _fail(where, "grad_sq", "has entries for parameters recorded as inactive (without gradient)")
    state_step = _get(obj, "state_step", dict, where, "state_step", optional=True) or {}
    if not all(k in names and _is_int(v) and v >= 0 for k, v in state_step.items()):
        raise _fail(where, "state_step", "is not a map of trainable parameters to non-negative step counts")
    n_micro = _get(obj, "n_micro", "int", where, "n_micro", optional=True) or 0
    sizes = _get(obj, "micro_sizes", list, where, "micro_sizes", optional=True)
    if sizes is not None:
        if len(sizes) != n_micro or not all(_is_int(x) and x >= 0 for x in sizes) or sum(sizes) != n_entries:
            raise _fail(where, "micro_sizes", f"does not split the file's {n_entries} batch entries into "
                                              f"n_micro={n_micro} micro-batches")
    elif not 0 <= n_micro <= max(n_entries, 1):
        raise _fail(where, "n_micro", f"is {n_micro} for {n_entries} batch entries in the file")
