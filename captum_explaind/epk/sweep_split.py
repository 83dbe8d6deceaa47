"""Sweeps split over the ranks of a ``torch.distributed`` process group, and summed back.

:class:`~captum_explaind.epk.engine.ExactPathKernel` asks :func:`shardable` whether a sweep is
split; a forward sweep then runs in contiguous blocks of steps (:func:`shard_steps`) or, where the
steps may be taken in any order, as pairs of ranks meeting where their work balances
(:func:`pair_forward`, on :func:`~captum_explaind.epk.pair_sweep.pair_sweep`); a reverse sweep of a
view that splits by steps (the data view) balances its integrations the same way and hands the
steps' ``η D φ`` to the ranks whose blocks hold them (:func:`pair_reverse`); any other reverse sweep
splits the inputs (:func:`rank_chunks`). :func:`reduce_view` sums the view's accumulators and the
:class:`SweepLog` over the ranks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from .. import distributed
from ..recording.format import StepRecord
from . import checks
from . import pair_sweep as pair_module
from .batch import Batch
from .integrator import StepStats
from .pair_sweep import pair_sweep
from .results import SweepStats
from .segment import Chunk, Segment
from .updates import UpdateModel
from .views import SweepView

if TYPE_CHECKING:
    from .engine import ExactPathKernel

__all__ = ["SweepLog", "shardable", "shard_steps", "pairs_apply", "pair_forward", "pair_reverse", "rank_chunks",
           "reduce_view", "fingerprint"]


class SweepLog:
    """Collects per-step errors and work counters of a sweep."""

    def __init__(self, steps: List[int], n: int, dtype: torch.dtype) -> None:
        self.steps = steps
        self.errors = {s: torch.zeros(n, dtype=dtype) for s in steps}
        self.evaluations = self.unconverged = self.depth = 0
        self.unconverged_rows: dict = {}  # step -> inputs left above tolerance

    def add(self, step: int, chunk: Chunk, stats: StepStats) -> None:
        self.errors[step][chunk.offset : chunk.offset + chunk.n] = stats.error.detach().cpu()
        self.evaluations += stats.evaluations
        self.unconverged += stats.unconverged
        if stats.unconverged_rows is not None and stats.unconverged_rows.numel():
            rows = (stats.unconverged_rows.cpu() + chunk.offset).tolist()
            self.unconverged_rows.setdefault(step, []).extend(rows)
        self.depth = max(self.depth, stats.depth)

    def reduce(self) -> None:
        """Combine the logs of all ranks (each (step, input) pair was integrated by one rank)."""
        if not distributed.active():
            return
        errs = [self.errors[s] for s in self.steps]
        counts = torch.tensor([self.evaluations, self.unconverged], dtype=torch.int64)
        distributed.all_reduce_sum_(errs + [counts])
        self.evaluations, self.unconverged = int(counts[0]), int(counts[1])
        self.depth = distributed.all_reduce_max(self.depth)

    def finish(self, max_depth: int, max_evaluations: Optional[int] = None) -> SweepStats:
        n = next(iter(self.errors.values())).shape[0] if self.errors else 0
        err = torch.stack([self.errors[s] for s in self.steps]) if self.steps else torch.zeros(0, n)
        if self.unconverged:
            msg, category = checks.unconverged_message(self.unconverged_rows, self.errors, self.unconverged,
                                                       max_depth, max_evaluations)
            checks.warn(msg, category)
        return SweepStats(list(self.steps), err, self.evaluations, self.unconverged, self.depth)


def pairs_apply(epk: "ExactPathKernel", view: SweepView, need_precond: bool) -> bool:
    """Whether a split forward sweep may let pairs of ranks meet where their work balances
    (:mod:`.pair_sweep`): the view accumulates per step in any order, no buffers move between
    steps, and ``R_s`` needs no earlier parameters. Else: contiguous blocks (:func:`shard_steps`)."""
    if getattr(view, "visit_every_step", False) or epk.trajectory.buffer_steps():
        return False
    um = UpdateModel(epk.trajectory, epk.layout, device=epk.device, dtype=epk.dtype, need_precond=need_precond)
    return not um.needs_history


def pair_forward(epk: "ExactPathKernel", batch: Batch, view: SweepView, todo: List[int], need_precond: bool,
                 desc: str, show_progress: Optional[bool]) -> Optional[SweepStats]:
    """This rank's part of a forward sweep split over pairs of ranks (:mod:`.pair_sweep`), summed
    over the ranks; None where the process group's store cannot hold the shared counter."""
    part, pair, front = distributed.pair_segment(todo)
    claims = distributed.StepClaims(len(part), pair)
    if not claims.available:
        return None
    log = SweepLog(todo, batch.n, epk.dtype)
    bar = epk._bar(len(part), view, desc, show_progress)
    try:
        pair_sweep(epk, batch, view, part, front, claims, need_precond, log, bar)
    finally:
        bar.close()
        epk.functional.set_fixed(epk._initial_buffers)
        epk._plan = None
    reduce_view(view, log)  # a collective: both ranks of the pair are done with the counter
    if front:
        claims.close()
    return log.finish(epk.options.max_depth, epk.options.max_evaluations)


def pair_reverse(epk: "ExactPathKernel", batch: Batch, view: SweepView, last: int, todo: List[int],
                 records: List[StepRecord], scalars: List[Any], um: UpdateModel, log: SweepLog, bar: tqdm) -> None:
    """A reverse sweep split by steps (``shard_steps``), its integration balanced in pairs.

    Each rank owns a contiguous block of ``1..last`` (:func:`distributed.shard`) for the carry
    exchange and its test and training sides, but the integrations — uneven where steps refine
    — are taken by the two ranks of a pair from both ends of their blocks (:mod:`.pair_sweep`);
    a step integrated outside its owner's block hands its ``η D φ`` (inputs × P) to the owner.
    """
    me, world = distributed.rank(), distributed.world_size()
    members = [r for r in (me - me % 2, me - me % 2 + 1) if r < world]
    blocks = {r: distributed.shard(range(1, last + 1), r, world) for r in members}
    mine = set(blocks[me])
    part = sorted(s for s in todo if any(s in blocks[r] for r in members))
    claims = distributed.StepClaims(len(part), me // 2)

    def segment_of(s: int, theta0: torch.Tensor, theta1: torch.Tensor) -> Segment:
        rec = records[s - 1]
        coeffs = epk._polyline_regularization(s, um.vectors(scalars[s - 1], rec))
        return Segment(s, theta0, theta1, theta1 - theta0, coeffs, rec)

    try:
        limit = math.ceil(pair_module.PAIR_LIMIT * len(part))  # (read at call time: tests force a side)
        done = pair_sweep(epk, batch, view, part, me == members[0], claims, False, log, bar, segment_of, limit)
        peer = [r for r in members if r != me]
        dones = distributed.all_gather_objects(done)
        # a view that stores its steps until the carry (the exact data view; not the polyline one,
        # whose steps are complete once integrated) hands the other block's steps to their owner
        stores = bool(getattr(view, "stores_steps", False))
        send = getattr(view, "take_stored")([s for s in done if s not in mine]) if stores else {}  # noqa: B009
        receive = [s for s in (dones[peer[0]] if peer else []) if s in mine] if stores else []
        like = torch.empty(batch.n, epk.layout.total, dtype=epk.dtype, device=epk.device)
        got = distributed.exchange(send, receive, peer[0], like) if peer else {}
        del send
        for s in sorted(mine, reverse=True):  # this block's other steps: integrated by the peer, or not at all
            if s in got or s not in todo:
                theta0 = epk.theta(s - 1)
                none = theta0.new_empty(0)  # kept without its far end and Δ_s (DataView._kept_segment)
                seg = Segment(s, theta0, none, none, um.vectors(scalars[s - 1], records[s - 1]), records[s - 1])
                seg.coeffs = epk._polyline_regularization(s, seg.coeffs)
                if s in got:
                    getattr(view, "keep_received")(seg, got.pop(s))  # noqa: B009
                else:
                    view.end_step(seg, False)
    finally:
        bar.close()
        epk._plan = None
    getattr(view, "finish_shard")()  # noqa: B009 — the carries between the blocks, then the sides
    reduce_view(view, log)
    if me == members[0]:
        claims.close()


def shardable(epk: "ExactPathKernel", batch: Batch, view: SweepView, steps: List[int]) -> bool:
    """Whether a sweep of ``view`` is split over the ranks: inside a process group (unless
    ``options.distributed`` is off), for views that name the accumulators to sum
    (``shard_sum``); the others run whole on every rank. The ranks' requests must agree."""
    if not (epk.options.distributed and distributed.active() and bool(getattr(view, "shard_sum", None))):
        return False
    distributed.check_same(fingerprint(batch, view, steps), "inputs, target and steps")
    return True


def rank_chunks(epk: "ExactPathKernel", batch: Batch) -> List[Chunk]:
    """This rank's contiguous block of the inputs, cut into chunks of ``options.batch_size``."""
    rows = distributed.shard(range(batch.n))
    if not rows:
        return []
    lo, hi = rows[0], rows[-1] + 1
    return [Chunk(lo + off, b.n, b) for off, b in batch.slice(lo, hi).chunks(epk.chunk_size)]


def fingerprint(batch: Batch, view: SweepView, steps: List[int]) -> Tuple[Any, ...]:
    """What must be equal on every rank for a split sweep: the inputs, the view and its target, the steps."""
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            t = v.detach().double() if v.is_floating_point() or v.dtype == torch.bool else v.detach().long()
            return (tuple(v.shape), str(v.dtype), float(t.sum()), float(t.abs().sum()))
        return repr(v)[:200]

    target = getattr(getattr(view, "target", None), "index", None)
    leaves = tree_flatten((batch.args, batch.kwargs, target))[0]
    return (type(view).__name__, batch.n, tuple(steps), tuple(leaf(v) for v in leaves))


def shard_steps(view: SweepView, selected: List[int], todo: set) -> Tuple[List[int], set]:
    """This rank's part of a forward sweep: a contiguous block of the integrated steps.

    Only this rank's steps are visited, unless the view does work at every visited step
    (``visit_every_step``: the similarity view's per-sample momentum buffers); the sweep then
    stops at this rank's last step.
    """
    own = set(distributed.shard(sorted(todo)))
    if getattr(view, "visit_every_step", False):
        last = max(own) if own else 0
        return [s for s in selected if s <= last], own
    return [s for s in selected if s in own], own


def reduce_view(view: SweepView, log: SweepLog) -> None:
    """Sum the view's accumulators and the sweep log over the ranks; copy rank 0's replicated state."""
    distributed.all_reduce_sum_([getattr(view, name) for name in getattr(view, "shard_sum", ())])
    for name in getattr(view, "shard_copy", ()):
        setattr(view, name, distributed.broadcast_object(getattr(view, name)))
    log.reduce()
