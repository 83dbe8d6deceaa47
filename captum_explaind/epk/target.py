"""Captum's ``target`` argument, re-implemented on its documented rules.

It applies to the explained output, ``output_fn(raw model output)``.

Captum's own ``_select_targets`` lives in a private module; these are the public semantics:

* ``None`` — no selection; here: the sum over all outputs (so a scalar per example).
* ``int`` or a one-element tensor — the same output index for every example (2-D outputs).
* ``tuple`` of ints — the same multi-index into the output dims after the batch dim.
* ``list[int]`` or a 1-D tensor of length ``n`` — one index per example.
* ``list[tuple]`` of length ``n`` — one multi-index per example.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["TargetType", "Target", "resolve_target"]

TargetType = Union[None, int, Tuple[int, ...], torch.Tensor, List[Tuple[int, ...]], List[int]]


@dataclass
class Target:
    """A resolved target: one flat output index per example, or ``None`` (sum of all outputs)."""

    index: Optional[torch.Tensor]  # [n] int64 into the flattened output, or None
    n_outputs: int

    def select(self, out: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Selected scalar per example of ``out`` [m, ...] (rows: which examples they are)."""
        flat = out.reshape(out.shape[0], -1)
        if self.index is None:
            return flat.sum(dim=1)
        idx = self.index if rows is None else self.index[rows.to(self.index.device)]
        return flat.gather(1, idx.to(flat.device).unsqueeze(1)).squeeze(1)

    def scalar(self, out_one: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Selection for one example as a 0-dim tensor (used inside ``vmap`` and loops).

        Args:
            out_one (Tensor): the explained output of one example, ``[1, ...]``.
            idx (Tensor): ``[1]``, its flat target index (ignored for ``index=None``).
        """
        flat = out_one.reshape(1, -1)
        if self.index is None:
            return flat.sum()
        # gather, not flat[idx]: indexing with a (vmapped) tensor would need .item()
        return flat.gather(1, idx.reshape(1, 1)).sum()

    def rows_index(self, rows: torch.Tensor) -> torch.Tensor:
        """The flat target index of the examples ``rows`` (zeros for ``index=None``): ``[len(rows)]``."""
        if self.index is None:
            return torch.zeros(len(rows), dtype=torch.int64, device=rows.device)
        return self.index[rows.to(self.index.device)].to(rows.device)


def _flat_index(multi: Sequence[int], dims: Sequence[int], what: str) -> int:
    if len(multi) != len(dims):
        raise ValueError(
            f"target {what} has {len(multi)} indices but the model output has {len(dims)} dims "
            f"after the batch dim {tuple(dims)}"
        )
    flat = 0
    for i, d in zip(multi, dims):
        i = int(i)
        if not -d <= i < d:
            raise IndexError(f"target {what} is out of range for model output dims {tuple(dims)}")
        flat = flat * d + (i % d)
    return flat


def resolve_target(target: TargetType, n: int, out_shape: Sequence[int]) -> Target:
    """Resolve Captum's ``target`` for ``n`` examples of a model whose output is ``[n, *out_shape]``.

    Raises:
        IndexError: a target index is out of range of the output.
        ValueError: a target has the wrong form or length.
    """
    dims = list(out_shape)
    n_out = 1
    for d in dims:
        n_out *= d
    if target is None:
        return Target(None, n_out)
    if type(target).__module__ == "numpy":  # a numpy array or integer: as a tensor / an int
        target = torch.as_tensor(target)
    if isinstance(target, list):
        target = [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t  # type: ignore[assignment]
                  for t in target]
    if isinstance(target, bool):
        raise TypeError("target must be an int, tuple, tensor or list, not bool")
    if isinstance(target, int):
        if len(dims) != 1:
            raise ValueError(
                f"an int target needs 2-D model outputs [n, n_outputs]; got output dims {tuple(dims)} — use a tuple"
            )
        return Target(torch.full((n,), _flat_index([target], dims, repr(target)), dtype=torch.int64), n_out)
    if isinstance(target, tuple):
        return Target(torch.full((n,), _flat_index(target, dims, repr(target)), dtype=torch.int64), n_out)
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"a target tensor must hold integer indices, got {target.dtype}")
        if target.numel() == 1:
            return resolve_target(int(target.reshape(-1)[0]), n, out_shape)
        if target.dim() == 1:
            target = target.tolist()
        elif target.dim() == 2 and target.shape[0] == n:
            target = [tuple(int(v) for v in row) for row in target.tolist()]
        else:
            raise ValueError(f"target tensor of shape {tuple(target.shape)} does not match {n} examples")
    if isinstance(target, list):
        if len(target) != n:
            raise ValueError(f"a list target needs one entry per example: got {len(target)} for {n} examples")
        flat = []
        for k, t in enumerate(target):
            if isinstance(t, tuple):
                flat.append(_flat_index(t, dims, f"{t!r} (example {k})"))
            elif isinstance(t, int) and not isinstance(t, bool):
                if len(dims) != 1:
                    raise ValueError(f"int targets need 2-D model outputs; got output dims {tuple(dims)}")
                flat.append(_flat_index([t], dims, f"{t!r} (example {k})"))
            else:
                raise TypeError(f"target entry {k} must be an int or tuple, got {type(t).__name__}")
        return Target(torch.tensor(flat, dtype=torch.int64), n_out)
    raise TypeError(
        f"target must be None, an int, a tuple of ints, an integer tensor or a list, got {type(target).__name__}"
    )
