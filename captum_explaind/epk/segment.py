"""A training step as a straight segment, and a chunk of inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..recording.format import StepRecord
from .batch import Batch
from .updates import StepCoefficients

__all__ = ["Segment", "Chunk"]


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
    """A slice of the test inputs: ``batch`` holds examples ``offset .. offset + n − 1``."""

    offset: int
    n: int
    batch: Batch

    def take(self, rows: torch.Tensor) -> Batch:
        """The chunk's examples at ``rows`` (local indices; may repeat)."""
        return self.batch.rows(rows)
