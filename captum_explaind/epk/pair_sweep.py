"""A forward sweep split over pairs of ranks that meet where their work balances.

Refinement makes the cost of a step uneven (one step of 64 may cost as much as ten others), so a
split into contiguous blocks of equal length leaves one rank waiting for the other. Here the two
ranks of a pair (:func:`~captum_explaind.distributed.pair_segment`) take the steps of their part
from both ends — the first rank forward from the earliest, the second backward from the latest —
one step at a time through a shared counter (:class:`~captum_explaind.distributed.StepClaims`),
until every step is taken. Each rank's steps stay contiguous, so consecutive steps share their
end point's parameters and outputs exactly as in one forward sweep: no step costs more than in
one process, and every step is integrated by exactly one rank.

Forward sweeps (:meth:`ExactPathKernel.sweep`) need the step coefficients without a forward
history: the engine uses this only where ``R_s`` depends on ``θ_{s−1}`` alone
(:attr:`UpdateModel.needs_history` is False), no buffers move between steps, and the view
accumulates per step in any order (``visit_every_step`` is False). The data view split by steps
(:meth:`ExactPathKernel.sweep_reverse`) balances its integrations the same way, with the
coefficients precomputed in time order, and then hands each step's ``η D φ`` to the rank whose
block holds it (:func:`~captum_explaind.epk.sweep_split.pair_reverse`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import distributed
from ..recording.format import StepRecord
from .segment import Segment
from .updates import StepScalars, UpdateModel

if TYPE_CHECKING:
    from .batch import Batch
    from .engine import ExactPathKernel
    from .sweep_split import SweepLog
    from .views import SweepView

__all__ = ["pair_sweep", "PAIR_LIMIT"]

#: a reverse sweep split by steps: the most of its pair's part one rank integrates (it holds the
#: steps' ``η D φ`` until it hands the other block's over; ``DataView.shard_steps`` counts 1.5 blocks)
PAIR_LIMIT = 0.75


class _Coefficients:
    """Step records and scalar coefficients, computed in time order as far as asked (they carry
    forward-time state: first momentum step, Adam counts); the vectors of any step on demand."""

    def __init__(self, epk: "ExactPathKernel", need_precond: bool) -> None:
        self.epk = epk
        self.um = UpdateModel(epk.trajectory, epk.layout, device=epk.device, dtype=epk.dtype,
                              need_precond=need_precond)
        self.records: Dict[int, StepRecord] = {}
        self.scalars: Dict[int, StepScalars] = {}

    def upto(self, step: int) -> None:
        for s in range(len(self.scalars) + 1, step + 1):
            self.records[s] = self.epk.trajectory.record(s)
            self.scalars[s] = self.um.scalars(self.records[s])

    def segment(self, s: int, theta0: torch.Tensor, theta1: torch.Tensor) -> Segment:
        self.upto(s)
        rec = self.records[s]
        coeffs = self.um.vectors(self.scalars[s], rec)
        # R_s from θ_{s−1} alone (no history: the engine checked needs_history), as UpdateModel.advance
        coeffs.reg = self.um._regularization(coeffs, theta0)
        coeffs = self.epk._polyline_regularization(s, coeffs)
        return Segment(s, theta0, theta1, theta1 - theta0, coeffs, rec)


class _Ends:
    """The parameters and outputs at one step boundary, reused by the adjacent step."""

    def __init__(self) -> None:
        self.step = -1
        self.theta: Optional[torch.Tensor] = None
        self.outputs: Optional[List[torch.Tensor]] = None

    def get(self, epk: "ExactPathKernel", step: int) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
        if step == self.step and self.theta is not None:
            return self.theta, self.outputs
        return epk.theta(step), None

    def keep(self, step: int, theta: torch.Tensor, outputs: List[torch.Tensor]) -> None:
        self.step, self.theta, self.outputs = step, theta, outputs


def pair_sweep(epk: "ExactPathKernel", batch: "Batch", view: "SweepView", part: List[int], front: bool,
               claims: distributed.StepClaims, need_precond: bool, log: "SweepLog", bar: Any,
               segment_of: Optional[Callable[[int, torch.Tensor, torch.Tensor], Segment]] = None,
               limit: Optional[int] = None) -> List[int]:
    """Integrate this rank's share of its pair's ``part`` of the steps (ascending) for every input,
    taking one step at a time through ``claims``: from the first step forward (``front``) or from
    the last backward, at most ``limit`` steps. Returns the steps integrated here, ascending. The
    caller then sums the view's accumulators and ``log`` over the ranks (a collective) and closes
    ``claims``. ``segment_of(s, θ_{s−1}, θ_s)``: the step's segment (default: the forward model's
    coefficients with ``R_s``, computed here in time order).
    """
    if segment_of is None:
        coeffs = _Coefficients(epk, need_precond)
        if not front and part:
            coeffs.upto(part[-1])  # the back rank's first step needs the scalars of every earlier one
        segment_of = coeffs.segment
    chunks = epk.chunks(batch)
    fm = epk.functional
    ends = _Ends()
    done: List[int] = []
    for s in part if front else part[::-1]:
        if (limit is not None and len(done) >= limit) or not claims.take():
            break  # (at the limit the other rank takes the rest: both limits together exceed the part)
        theta0, f0s = ends.get(epk, s - 1)
        theta1, f1s = ends.get(epk, s)
        seg = segment_of(s, theta0, theta1)
        f0s = f0s if f0s is not None else [fm.forward(theta0, ch.batch) for ch in chunks]
        f1s = f1s if f1s is not None else [fm.forward(theta1, ch.batch) for ch in chunks]
        epk._integrate(seg, chunks, f0s, f1s, view, log)
        view.end_step(seg, True)
        # this rank's next step shares this one's far end: θ_s going forward, θ_{s−1} going backward
        if front:
            ends.keep(s, theta1, f1s)
        else:
            ends.keep(s - 1, theta0, f0s)
        done.append(s)
        bar.update(1)
    return sorted(done)
