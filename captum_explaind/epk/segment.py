"""A training step as a straight segment, and a chunk of inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch

from ..recording.format import StepRecord
from .updates import StepCoefficients

__all__ = ["Segment", "Chunk", "take_rows"]


@dataclass
class Segment:
    """One training step as a straight segment θ_{s−1} → θ_s, with its update model."""

    step: int
    theta0: torch.Tensor
    theta1: torch.Tensor
    delta: torch.Tensor
    coeffs: StepCoefficients
    record: StepRecord

    def point(self, t: float) -> torch.Tensor:
        return self.theta0 + t * self.delta if t != 0.0 else self.theta0

    def points(self, t: torch.Tensor) -> torch.Tensor:
        """One parameter point per entry of ``t``: [len(t), P]."""
        return self.theta0.unsqueeze(0) + t.to(self.delta.dtype).unsqueeze(1) * self.delta.unsqueeze(0)


@dataclass
class Chunk:
    """A slice of the inputs (Captum's ``inputs`` and ``additional_forward_args``)."""

    offset: int
    n: int
    inputs: Tuple[Any, ...]
    args: Tuple[Any, ...]

    def take(self, rows: torch.Tensor) -> Tuple[Tuple[Any, ...], Tuple[Any, ...]]:
        if rows.numel() == self.n and bool((rows == torch.arange(self.n, device=rows.device)).all()):
            return self.inputs, self.args
        return take_rows(self.inputs, rows, self.n), take_rows(self.args, rows, self.n)


def take_rows(values: Tuple[Any, ...], rows: torch.Tensor, n: int) -> Tuple[Any, ...]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out.append(v.index_select(0, rows.to(v.device)))
        else:
            out.append(v)
    return tuple(out)
