"""What :class:`~captum_explaind.recording.recorder.TrajectoryRecorder` accepts: its options,
``log_batch``'s indices, weights and RNG states, and ``keep_every`` against the optimizer; each
refused by name (a TypeError or ValueError) when it is not what it must be."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["as_indices", "as_weights", "as_rng_state", "check_options", "check_values", "check_keep_every"]


def as_indices(indices: Any) -> torch.Tensor:
    """``log_batch``'s indices as an int64 vector, or a TypeError/ValueError that names them."""
    try:
        arr = np.asarray(indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices)
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise TypeError(f"got {type(indices).__name__} of {arr.dtype}")
        idx = torch.as_tensor(arr)
    except (TypeError, ValueError, OverflowError, RuntimeError) as err:
        raise TypeError(
            f"batch indices must be a tensor, array or flat sequence of non-negative ints (dataset indices); "
            f"got {indices!r:.80} ({err})"
        ) from None
    idx = idx.reshape(-1)
    if idx.numel() and (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool):
        raise TypeError(f"batch indices must be integers, got dtype {idx.dtype}")
    idx = idx.to(torch.int64)
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("batch indices must be non-negative dataset indices")
    return idx.clone()


def as_weights(weights: Any, n: int) -> torch.Tensor:
    """``log_batch``'s weights as a finite float64 vector of ``n`` entries."""
    try:
        w = torch.as_tensor(np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights,
                                       dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"batch weights must be a sequence of numbers, got {weights!r:.80} ({err})") from None
    if w.numel() != n:
        raise ValueError(f"got {w.numel()} weights for {n} indices")
    if not torch.isfinite(w).all():
        raise ValueError("batch weights must be finite")
    return w.clone()


def as_rng_state(state: Any, name: str) -> torch.Tensor:
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise TypeError(f"{name} must be a 1-D uint8 tensor as returned by torch.get_rng_state(), got {state!r:.80}")
    return state.detach().to("cpu", copy=True)


def check_options(model: Any, path: Any, *, reduction: Any, store_dtype: Any, record_rng: Any, resume: Any,
                   overwrite: Any, background: Any, check_finite: Any, record_optimizer_state: Any,
                   max_pending: Any) -> None:
    """The recorder's arguments, each refused by name when it is not what it must be."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_values(path, reduction=reduction, store_dtype=store_dtype, record_rng=record_rng, resume=resume,
                  overwrite=overwrite, background=background, check_finite=check_finite,
                  record_optimizer_state=record_optimizer_state, max_pending=max_pending)


def check_values(path: Any, *, reduction: Any, store_dtype: Any, record_rng: Any, resume: Any,
                  overwrite: Any, background: Any, check_finite: Any, record_optimizer_state: Any,
                  max_pending: Any) -> None:
    """The checks of :func:`check_options` that need no model (shared with ``check_options``)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if store_dtype is not None and not (isinstance(store_dtype, torch.dtype) and store_dtype.is_floating_point):
        raise ValueError(f"store_dtype must be a floating torch.dtype or None, got {store_dtype!r}")
    if record_rng not in ("auto", True, False):
        raise ValueError(f"record_rng must be 'auto', True or False, got {record_rng!r}")
    for flag, value in (("overwrite", overwrite), ("background", background), ("check_finite", check_finite),
                        ("record_optimizer_state", record_optimizer_state)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise ValueError(f"max_pending must be an int >= 1 (steps held in memory for the background writer), "
                         f"got {max_pending!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (the trajectory directory), got {type(path).__name__}")
    if not isinstance(resume, (bool, int)) or (not isinstance(resume, bool) and resume < 0):
        raise ValueError(f"resume must be True, False or a step number >= 0, got {resume!r}")
    if overwrite and resume is not False:
        raise ValueError("pass overwrite=True (replace the recording) or resume=True (continue it), not both")




def check_keep_every(k: Any, optimizer: Any, family: str) -> int:
    """``keep_every`` validated against what can be summed exactly over a macro-step."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"keep_every must be an int >= 1, got {k!r}")
    if k == 1:
        return k
    for g in optimizer.param_groups:
        wd = float(g.get("weight_decay", 0.0) or 0.0)
        if wd and (family == "adam" or (family == "sgd" and float(g.get("momentum", 0.0) or 0.0))):
            raise ValueError(
                f"keep_every={k} with {type(optimizer).__name__}(weight_decay={wd}"
                + (f", momentum={g.get('momentum')}" if family == "sgd" else "")
                + "): this decay rides the momentum buffer, so its share of a macro-step cannot be summed from the "
                "kept checkpoints; use AdamW-style decoupled decay, no momentum, or keep_every=1"
            )
    return k
