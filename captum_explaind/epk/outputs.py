"""From a model's raw output to the ``[n, ...]`` tensor being explained (``output_fn``).

Models return tensors, tuples, or objects such as Hugging Face's ``ModelOutput``. The explained
quantity is whatever ``output_fn(raw_output)`` returns — by default the logits — and Captum's
``target`` selects from it. Passing another ``output_fn`` explains anything differentiable the
model computes (next-token logits ``lambda out: out.logits[:, -1]``, a log-probability, a loss:
the paper's Corollary 3.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

__all__ = ["OutputFn", "default_output_fn", "resolve_output_fn", "explained_output"]

OutputFn = Callable[[Any], torch.Tensor]


def default_output_fn(out: Any) -> torch.Tensor:
    """A tensor as is; an object with ``.logits`` (``ModelOutput``) its logits; a tuple or list
    its first element.

    Raises:
        TypeError: the output is none of these.
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model returned {type(out).__name__}, which has no tensor to explain by default (a tensor, "
        "`.logits`, or a tuple whose first element is a tensor); pass output_fn=... to choose one"
    )


def resolve_output_fn(output_fn: Optional[OutputFn]) -> OutputFn:
    """``output_fn`` checked for being callable; ``None`` gives :func:`default_output_fn`."""
    if output_fn is None:
        return default_output_fn
    if not callable(output_fn):
        raise TypeError(f"output_fn must be callable (raw model output -> tensor), got {type(output_fn).__name__}")
    return output_fn


def explained_output(output_fn: OutputFn, raw: Any, n: int) -> torch.Tensor:
    """``output_fn(raw)``, checked to be a tensor with one row per example."""
    out = output_fn(raw)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"output_fn must return a tensor [n_inputs, ...], got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(
            f"output_fn must return one row per example ([{n}, ...]), got shape {tuple(out.shape)}; "
            "keep the example axis first"
        )
    return out
