r"""Memory budgets (``EPKOptions.max_memory``): batch sizes chosen so the peak stays under a limit.

A sweep's memory is a fixed part — the view's accumulators, a few parameter vectors per input
and step (Φ_s, the data view's accumulators and test directions) and the optimizer's vectors —
plus what one chunk of test inputs costs while a step is integrated:

* every evaluated integrand row holds its payload (a gradient, ``P`` numbers, for the
  gradient-based integrands; a few outputs per tangent for forward mode) and the activations of
  one example per node of the rule (measured once: the bytes autograd saves for one example's
  backward pass; a gradient rule's nodes are evaluated at once, ``integrator.RULE_NODES`` at most);
* refinement holds one payload per (input, sub-interval) pair of a level, at most
  ``max_evaluations / 3`` per input (a child costs its 2 nodes and its cut check);
* the data view's training side holds per-sample gradients (``P`` numbers and the activations
  of a sample each) of one chunk of the step's samples.

:func:`plan` splits the budget: the fixed part first (an error naming it when it alone is over),
then a quarter of the rest for the training side, an eighth for one batched refinement call and
the rest for the chunk's held payloads, from which the test inputs per chunk follow. The result
does not depend on the chunking (every input is integrated on its own), so it equals the
unbatched one.

It is a model, not a hard bound: a refinement level is computed whole before the work budget is
checked, and a ReLU network's first level can cut a step at many kinks at once, so an input may
briefly hold more than its share (``benchmarks/scaling.py`` measures the peak against the budget).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .batch import Batch
from .functional import FunctionalModel

__all__ = ["parse_bytes", "MemoryPlan", "plan", "activation_bytes", "view_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[str, int, float, None], name: str = "max_memory") -> Optional[int]:
    """``"2GiB"``, ``"500 MB"``, ``1e9`` → bytes (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size such as '2GiB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a size: use a number of bytes or e.g. '512MiB', '2GiB', '4GB'")
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError(f"{name} must be a size such as '2GiB' or a number of bytes, got {type(value).__name__}")
    out = int(number * _UNITS[unit])
    if out <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


@dataclass(frozen=True)
class MemoryPlan:
    """Batch sizes that keep a sweep under its budget.

    Attributes:
        batch_size (int): test inputs per chunk.
        refine_rows (int): integrand rows per batched refinement call.
        train_bytes (int): bytes the training side's per-sample work may hold at once.
        train_batch_size (int): training samples per per-sample-gradient call.
        fixed (int), per_input (int): the estimated fixed bytes and held bytes per chunk input.
    """

    batch_size: int
    refine_rows: int
    train_bytes: int
    train_batch_size: int
    fixed: int
    per_input: int


def activation_bytes(fm: FunctionalModel, theta: torch.Tensor, example: Batch) -> int:
    """Bytes autograd saves for the backward pass of one example (its activations)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.data_ptr() != theta.data_ptr():
            total[0] += t.numel() * t.element_size()
        return t

    th = theta.detach().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fm.raw(th, example)
    return int(total[0])


def view_bytes(view: Any) -> int:
    """Bytes of the tensors a view holds (its accumulators, allocated at construction)."""
    return sum(v.numel() * v.element_size() for v in vars(view).values() if isinstance(v, torch.Tensor))


def plan(budget: int, *, n: int, n_params: int, dtype: torch.dtype, activations: int, view_fixed: int,
         per_input_vectors: int, gradient_payload: bool, max_evaluations: Optional[int], refine: bool,
         nodes: int = 1) -> MemoryPlan:
    """Split ``budget`` bytes into batch sizes (see the module docstring). ``nodes``: the rule's
    nodes evaluated at once inside each row (their activations held together).

    Raises:
        MemoryError: the fixed part alone (accumulators and parameter vectors for ``n`` inputs)
            exceeds the budget, or not even one input per chunk fits.
    """
    e = torch.finfo(dtype).bits // 8
    vec = n_params * e
    fixed = view_fixed + (12 + per_input_vectors * n) * vec
    if fixed >= budget:
        raise MemoryError(
            f"max_memory={budget / 2**20:.0f} MiB is below the fixed part of this sweep (~{fixed / 2**20:.0f} MiB: "
            f"{per_input_vectors} parameter vectors of {vec / 2**20:.1f} MiB per each of the {n} inputs plus the "
            "accumulators); raise max_memory, explain fewer inputs at a time, or select fewer parameters"
        )
    free = budget - fixed
    row = (2 * vec if gradient_payload else 4 * e) + max(1, nodes) * activations  # one evaluated integrand row
    train_bytes = free // 4
    train_batch_size = max(1, train_bytes // (2 * vec + activations))
    refine_rows = max(1, min(1024, (free // 8) // row))  # rows per batched call: speed, not exactness
    held = vec if gradient_payload else 4 * e
    levels = 1 if not refine else max(1, (max_evaluations or 4096) // 3)
    per_input = levels * held + row
    batch_size = (free - train_bytes - refine_rows * row) // per_input
    if batch_size < 1:
        raise MemoryError(
            f"max_memory={budget / 2**20:.0f} MiB leaves {free / 2**20:.0f} MiB beyond the fixed part, less than one "
            f"test input needs while a step is refined (~{per_input / 2**20:.0f} MiB); raise max_memory or lower "
            "max_evaluations"
        )
    return MemoryPlan(int(min(batch_size, max(n, 1))), int(refine_rows), int(train_bytes), int(train_batch_size),
                      int(fixed), int(per_input))
