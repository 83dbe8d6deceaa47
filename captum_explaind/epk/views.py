"""The seam between the engine and what a sweep computes: the :class:`SweepView` protocol.

:class:`~captum_explaind.epk.engine.ExactPathKernel` walks the recorded steps (forward or in
reverse time), computes the exact outputs at both ends of every step and refines each step's path
integral until it matches them. What is integrated, and what is done with it, is the view's:

* ``check(out, chunk, rows)`` — the outputs whose exact change drives error control ``[m, C]``;
* ``step_change(step, chunk, c0, c1)`` — those outputs at both ends of an integrated step;
* ``integrand(segment, chunk)`` — the :class:`~captum_explaind.epk.integrator.StepIntegrand`;
* ``buffer_jump(step, chunk, jump)`` — the output change caused by buffers that moved without
  gradients (BatchNorm running statistics) after the step;
* ``end_step(segment, integrated)`` — every visited step, once its integral (if any) is in;
* ``done(step)`` — reverse sweeps only: ``True`` stops early (nothing earlier can contribute).

Views keep all their state explicitly on themselves (accumulators, carries), so a sweep can be
split over step ranges or input blocks: inside a process group the engine gives each rank a part
and sums the accumulators the view names in ``shard_sum``. :class:`ViewBase` gives the optional
hooks their neutral behaviour.
"""

from __future__ import annotations

from typing import Protocol, Tuple, runtime_checkable

import torch

from .integrator import StepIntegrand
from .segment import Chunk, Segment

__all__ = ["SweepView", "ViewBase"]


@runtime_checkable
class SweepView(Protocol):
    """What the engine asks of a view during a sweep (see the module docstring)."""

    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor: ...

    def step_change(self, step: int, chunk: Chunk, c0: torch.Tensor, c1: torch.Tensor) -> None: ...

    def integrand(self, seg: Segment, chunk: Chunk) -> StepIntegrand: ...

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None: ...

    def end_step(self, seg: Segment, integrated: bool) -> None: ...

    def done(self, step: int) -> bool: ...


class ViewBase:
    """Neutral hooks: views override what they use (``check`` and ``integrand`` always)."""

    #: shown in progress bars
    label = "steps"
    #: accumulators (attribute names) that add up over parts of a sweep; a view that names them is
    #: split over the ranks of a process group (:mod:`captum_explaind.distributed`), the others run
    #: whole on every rank
    shard_sum: Tuple[str, ...] = ()
    #: replicated state every rank computes alike, copied from rank 0 after a split sweep
    shard_copy: Tuple[str, ...] = ()
    #: a split forward sweep still visits other ranks' steps (``end_step(seg, False)``)
    visit_every_step = False

    @property
    def per_input_vectors(self) -> int:
        """Memory model (``max_memory``): parameter-sized vectors held per test input."""
        return 2

    @property
    def gradient_payload(self) -> bool:
        """Memory model: whether an integrand row's payload is a gradient (else a few outputs per tangent)."""
        return True

    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def integrand(self, seg: Segment, chunk: Chunk) -> StepIntegrand:
        raise NotImplementedError

    def step_change(self, step: int, chunk: Chunk, c0: torch.Tensor, c1: torch.Tensor) -> None:
        return None

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None:
        return None

    def end_step(self, seg: Segment, integrated: bool) -> None:
        return None

    def done(self, step: int) -> bool:
        return False
