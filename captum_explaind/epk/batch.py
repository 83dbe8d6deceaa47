"""The batch contract: what a model is called with, and how its examples are taken apart.

Every view, the engine and the training-set replay describe a forward call by one
:class:`Batch`: positional arguments, keyword arguments and the number of examples ``n``.

* ``inputs`` may be a tensor, a tuple of inputs (each passed positionally, as Captum does), a
  ``Mapping`` (``dict``, ``transformers.BatchEncoding``: passed to ``forward`` **by keyword**,
  never positionally), or any nested pytree (lists, tuples, dicts) of tensors. Captum's
  ``additional_forward_args`` follow the inputs positionally.
* A tensor leaf whose first axis has length ``n`` is *batched* (one row per example); every
  other leaf (scalars, a shared tensor, ``None``, a flag) is held fixed for all examples.
* Floating tensors take the compute dtype; integer and boolean tensors (token ids, attention
  masks) are never cast. Everything moves to the compute device.

Taking rows, slicing into chunks, concatenating two batches, ``vmap`` in-dims and the lift of
one ``vmap``-ed row back to a batch of one are derived here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["Batch", "to_pytree", "batched_dims", "take_rows", "lift_rows", "count_examples"]


def to_pytree(x: Any, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Any:
    """``x`` with every Mapping turned into a ``dict`` (``BatchEncoding`` is no pytree node) and
    tensors moved to ``device``; floating tensors take ``dtype``, integer/bool tensors keep theirs."""
    if isinstance(x, torch.Tensor):
        if device is not None:
            x = x.to(device)
        return x.to(dtype) if (dtype is not None and x.is_floating_point()) else x
    if isinstance(x, Mapping):
        return {k: to_pytree(v, device, dtype) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple: keep its type
        return type(x)(*(to_pytree(v, device, dtype) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(to_pytree(v, device, dtype) for v in x)
    return x


def _is_batched(v: Any, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n


def count_examples(tree: Any) -> Optional[int]:
    """Length of the first axis of the first tensor leaf with at least one axis, else ``None``."""
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def batched_dims(tree: Any, n: int) -> Any:
    """``vmap`` in-dims of ``tree``: 0 for batched tensor leaves, ``None`` for held-fixed ones."""
    return tree_map(lambda v: 0 if _is_batched(v, n) else None, tree)


def take_rows(tree: Any, rows: torch.Tensor, n: int) -> Any:
    """Rows ``rows`` of every batched leaf of ``tree`` (fixed leaves are shared)."""
    return tree_map(lambda v: v.index_select(0, rows.to(v.device)) if _is_batched(v, n) else v, tree)


def lift_rows(tree: Any, dims: Any) -> Any:
    """Inside ``vmap`` (or a loop over rows): give every batched leaf its example axis back."""
    return tree_map(lambda v, d: v.unsqueeze(0) if d == 0 else v, tree, dims,
                    is_leaf=lambda v: v is None)


@dataclass(frozen=True)
class Batch:
    """One forward call's arguments and the number of examples they hold.

    Attributes:
        args (tuple): positional arguments (the inputs of a tensor/tuple, then Captum's
            ``additional_forward_args``).
        kwargs (dict): keyword arguments (the entries of a Mapping input).
        n (int): number of examples (length of the first axis of batched leaves).
    """

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    n: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_inputs(
        cls,
        inputs: Any,
        additional_forward_args: Any = None,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        what: str = "inputs",
    ) -> "Batch":
        """Normalize Captum-style ``inputs`` (+ ``additional_forward_args``) into a batch.

        Args:
            inputs: a tensor, a tuple of inputs, a Mapping (passed by keyword) or a pytree.
            additional_forward_args (optional): positional arguments after the inputs; a
                non-tuple value is one argument.
            device, dtype: where and in which floating precision the batch is used.
            what (str): how errors name the argument.

        Returns:
            *Batch*

        Raises:
            ValueError: no tensor holds an example axis, or batched leaves disagree on ``n``.
        """
        if inputs is None or (isinstance(inputs, (tuple, list, Mapping)) and len(inputs) == 0):
            raise ValueError(f"{what} must hold at least one example: got {inputs!r}")
        x = to_pytree(inputs, device, dtype)
        extra = to_pytree(_as_args(additional_forward_args), device, dtype)
        if isinstance(x, dict):
            args, kwargs = tuple(extra), x
        elif isinstance(x, tuple) and not hasattr(x, "_fields"):
            args, kwargs = tuple(x) + tuple(extra), {}
        else:
            args, kwargs = (x,) + tuple(extra), {}
        n = count_examples((x,))
        if n == 0:
            raise ValueError(f"{what} must hold at least one example: its example axis (dim 0) has length 0")
        if n is None:
            raise ValueError(
                f"{what} must hold at least one example: no tensor in {type(inputs).__name__} has an example "
                "axis (dim 0 = examples); pass a torch.Tensor (or a tuple/Mapping of them) with examples first"
            )
        batch = cls(args, kwargs, n)
        if not isinstance(x, dict):
            batch._check_consistent(x, what)
        return batch

    def _check_consistent(self, x: Any, what: str) -> None:
        """Positional inputs must agree on ``n`` (a Mapping's other entries are held fixed, e.g. a
        broadcast ``position_ids [1, L]``; extra arguments may hold shared tensors)."""
        for path_leaf in _named_leaves(x):
            name, v = path_leaf
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] != self.n:
                raise ValueError(
                    f"all tensors of {what} must have the same number of examples ({self.n}), but {name} has "
                    f"shape {tuple(v.shape)}"
                )

    # ------------------------------------------------------------------ calling
    def call(self, module: torch.nn.Module, params: Dict[str, torch.Tensor]) -> Any:
        """``module(*args, **kwargs)`` with ``params`` (``torch.func.functional_call``)."""
        from torch.func import functional_call

        return functional_call(module, params, self.args, self.kwargs)

    @property
    def dims(self) -> Tuple[Any, Any]:
        """``vmap`` in-dims of ``(args, kwargs)``."""
        return batched_dims(self.args, self.n), batched_dims(self.kwargs, self.n)

    def per_row(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap ``fn(batch_of_one, *rest)`` as a function of one ``vmap``-ed row ``(args, kwargs, *rest)``."""
        da, dk = self.dims

        def one(args: Tuple[Any, ...], kwargs: Dict[str, Any], *rest: Any) -> Any:
            return fn(Batch(lift_rows(args, da), lift_rows(kwargs, dk), 1), *rest)

        return one

    # ------------------------------------------------------------------ rows
    def rows(self, rows: torch.Tensor) -> "Batch":
        """The examples at ``rows`` (may repeat)."""
        rows = rows.reshape(-1)
        if rows.numel() == self.n and bool((rows.cpu() == torch.arange(self.n)).all()):
            return self
        return Batch(take_rows(self.args, rows, self.n), take_rows(self.kwargs, rows, self.n), int(rows.numel()))

    def row(self, i: int) -> "Batch":
        """Example ``i`` as a batch of one."""
        return self.rows(torch.tensor([i]))

    def slice(self, start: int, stop: int) -> "Batch":
        return self.rows(torch.arange(start, min(stop, self.n)))

    def chunks(self, size: Optional[int]) -> "list[Tuple[int, Batch]]":
        """``(offset, batch)`` pieces of at most ``size`` examples (``None``: one piece)."""
        size = self.n if size is None else size
        return [(s, self.slice(s, s + size)) for s in range(0, self.n, size)]

    def concat(self, other: "Batch", what: str = "others") -> "Batch":
        """Examples of ``self`` then ``other`` (same structure; fixed leaves must be identical)."""
        la, sa = tree_flatten((self.args, self.kwargs))
        lb, sb = tree_flatten((other.args, other.kwargs))
        if sa != sb:
            raise ValueError(f"{what} must have the same structure as inputs (same keys, same number of tensors)")
        out = []
        for u, v in zip(la, lb):
            bu, bv = _is_batched(u, self.n), _is_batched(v, other.n)
            if bu and bv:
                if u.shape[1:] != v.shape[1:]:
                    raise ValueError(
                        f"{what} and inputs must have the same shape after the example axis, got {tuple(u.shape)} "
                        f"and {tuple(v.shape)} (pad both to the same length)"
                    )
                out.append(torch.cat([u, v]))
            elif not bu and not bv and (u is v or _same(u, v)):
                out.append(u)
            else:
                raise ValueError(
                    f"{what} and inputs differ in an argument that is not per-example; pass arguments that are the "
                    "same for every example, or compare the two sets separately"
                )
        args, kwargs = torch.utils._pytree.tree_unflatten(out, sa)
        return Batch(args, kwargs, self.n + other.n)

    def __repr__(self) -> str:
        keys = list(self.kwargs)
        return f"Batch(n={self.n}, args={len(self.args)}, kwargs={keys})"


def _as_args(extra: Any) -> Tuple[Any, ...]:
    if extra is None:
        return ()
    return tuple(extra) if (isinstance(extra, tuple) and not hasattr(extra, "_fields")) else (extra,)


def _same(u: Any, v: Any) -> bool:
    if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor):
        return u.shape == v.shape and bool((u == v).all())
    try:
        return bool(u == v)
    except Exception:  # objects without a meaningful ==
        return False


def _named_leaves(x: Any, prefix: str = "input") -> "list[Tuple[str, Any]]":
    """Leaves of ``x`` with a readable path (``input['attention_mask']``, ``input[1]``)."""
    if isinstance(x, dict):
        return [leaf for k, v in x.items() for leaf in _named_leaves(v, f"{prefix}[{k!r}]")]
    if isinstance(x, (tuple, list)):
        return [leaf for i, v in enumerate(x) for leaf in _named_leaves(v, f"{prefix}[{i}]")]
    return [(prefix, x)]
