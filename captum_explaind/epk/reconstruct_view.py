"""The reconstruction view: every step's change split into kernel, regularization and other parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .integrands import JvpIntegrand
from .results import Reconstruction, SweepStats
from .segment import Chunk, Segment
from .views import ViewBase

if TYPE_CHECKING:
    from .engine import ExactPathKernel

__all__ = ["ReconstructView"]

_SLOTS = {"kernel": 0, "regularization": 1, "other": 2}


class ReconstructView(ViewBase):
    """Forward-mode parts of every output: ``[n, 3, C]`` (kernel, regularization, other) and the
    buffer jumps ``[n, C]``.

    Args:
        epk (ExactPathKernel): the core. n (int): inputs. out_shape: output shape after the example axis.
    """

    label = "reconstruct"
    shard_sum = ("parts", "buffers")

    @property
    def per_input_vectors(self) -> int:
        return 0  # forward mode only: no parameter-sized vector per input

    @property
    def gradient_payload(self) -> bool:
        return False

    def __init__(self, epk: "ExactPathKernel", n: int, out_shape: torch.Size) -> None:
        self.epk = epk
        self.out_shape = out_shape
        c = 1
        for d in out_shape:
            c *= d
        self.parts = torch.zeros(n, 3, c, dtype=epk.dtype, device=epk.device)
        self.buffers = torch.zeros(n, c, dtype=epk.dtype, device=epk.device)

    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        return out.reshape(out.shape[0], -1)

    def integrand(self, seg: Segment, chunk: Chunk) -> JvpIntegrand:
        tangents, names = self.epk.tangents(seg)
        slots = torch.tensor([_SLOTS[k] for k in names], device=self.parts.device)

        def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
            block = torch.zeros(payload.shape[0], 3, payload.shape[2], dtype=payload.dtype, device=payload.device)
            block.index_copy_(1, slots, payload)
            self.parts.index_add_(0, rows, block)

        return JvpIntegrand(self.epk.functional, seg, tangents, chunk, sink)

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None:
        self.buffers[chunk.offset : chunk.offset + chunk.n] += jump.reshape(jump.shape[0], -1)

    def result(self, initial: torch.Tensor, final: torch.Tensor, stats: SweepStats) -> Reconstruction:
        """The :class:`Reconstruction` from the accumulated parts and the exact end points."""
        shape = initial.shape
        kernel = self.parts[:, 0].reshape(shape)
        reg = self.parts[:, 1].reshape(shape)
        other = self.parts[:, 2].reshape(shape)
        residual = torch.zeros_like(initial)
        buffers = self.buffers.reshape(shape)
        delta = final - initial - kernel - reg - residual - buffers - other
        return Reconstruction(
            initial=initial, kernel=kernel, regularization=reg, residual=residual, buffers=buffers, other=other,
            final=final, delta=delta, step_error=stats.step_error, evaluations=stats.evaluations,
            unconverged=stats.unconverged, stats=stats, options=self.epk.options.to_dict(),
        )
