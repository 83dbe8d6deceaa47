"""Flat-vector view of a set of named parameters.

The EPK core works on flat vectors θ ∈ R^P (names concatenated in a fixed order) because every
per-step quantity — updates, regularization, preconditioners, masks — is element-wise, and
``torch.func`` transforms take a flat vector as cleanly as a dict. :class:`ParamLayout` converts
between the two without copies (``split`` returns views).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["ParamLayout"]


class ParamLayout:
    """Names, shapes and offsets of parameters packed into one flat vector.

    Args:
        names (sequence of str): parameter names, in packing order.
        shapes (sequence of tuple[int, ...]): their shapes.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Tuple[int, ...]]) -> None:
        if len(names) != len(shapes):
            raise ValueError("names and shapes differ in length")
        self.names: List[str] = list(names)
        self.shapes: List[Tuple[int, ...]] = [tuple(s) for s in shapes]
        self.numels: List[int] = []
        self.offsets: Dict[str, Tuple[int, int]] = {}
        start = 0
        for name, shape in zip(self.names, self.shapes):
            n = 1
            for d in shape:
                n *= d
            self.numels.append(n)
            self.offsets[name] = (start, start + n)
            start += n
        self.total = start
        self._index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def slice(self, name: str) -> slice:
        a, b = self.offsets[name]
        return slice(a, b)

    def split(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Views of ``flat[..., P]`` as a dict of tensors with their parameter shapes."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.numels, dim=-1)
        # a tuple, not *args: a 0-dim parameter (a learned scalar) of an unbatched flat has shape ()
        return {n: p.reshape(tuple(lead) + tuple(s)) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: Mapping[str, torch.Tensor], *, dtype: Optional[torch.dtype] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
        """Concatenate ``tensors`` (a dict with every name of this layout) into one vector."""
        parts = []
        for n in self.names:
            t = tensors[n]
            if dtype is not None:
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
            parts.append(t.reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)

    def expand(self, per_param: Sequence[float], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Broadcast one value per parameter (in layout order) to a flat vector of length P."""
        vals = torch.as_tensor(list(per_param), dtype=dtype, device=device)
        counts = torch.as_tensor(self.numels, device=device)
        return torch.repeat_interleave(vals, counts)

    def mask(self, names: Iterable[str], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """0/1 vector selecting the elements of ``names``."""
        chosen = set(names)
        unknown = chosen - set(self.names)
        if unknown:
            raise KeyError(f"unknown parameter(s) {sorted(unknown)}")
        return self.expand([1.0 if n in chosen else 0.0 for n in self.names], dtype=dtype, device=device)

    def sum_per_param(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum ``flat[..., P]`` within each parameter: returns ``[..., len(self)]``."""
        return torch.stack([p.sum(-1) for p in torch.split(flat, self.numels, dim=-1)], dim=-1)
