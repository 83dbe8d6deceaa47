"""The data view's sweep split by steps under ``torchrun``: the reverse-time carry between the
ranks' blocks (see :mod:`captum_explaind.epk.data_view`).

Each rank owns a contiguous block of the steps. Its steps' ``η D φ`` are stored as they are
integrated (some by the other rank of its pair, handed over), because the accumulators of the
block's test side need the carry from every later block; :meth:`StepSplit.finish_shard` then
exchanges the carries (one all-gather) and runs the block's test and training sides with the true
accumulators. :class:`StepSplit` is a mixin of :class:`~captum_explaind.epk.data_view.DataView`,
which owns the state it reads (``_stored``, the accumulators, the windows) and the test side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import distributed
from .segment import Segment

__all__ = ["StepSplit"]

# coefficient vectors that a block split by steps shares between consecutive kept steps when equal
_CONSTANT_COEFFS = ("lr", "active", "beta", "h", "e", "z", "sign", "decay_coupled", "decay_decoupled")


class StepSplit:
    """The carry exchange of a data view split by steps (state and test side: the view's)."""

    # set by DataView (declared for the type checker)
    epk: Any
    n: int
    windows: List[range]
    indexing: str
    windows_of: Dict[int, List[int]]
    grad_scale: Dict[int, float]
    _stored: Optional[List[Tuple[Segment, Optional[torch.Tensor]]]]
    _acc: Dict[int, torch.Tensor]
    _full: Optional[torch.Tensor]
    _beta_next: Optional[torch.Tensor]

    def _test_side(self, seg: Segment, ephi: Optional[torch.Tensor], beta_next: Optional[torch.Tensor],
                   keep_all: bool = False) -> None:
        raise NotImplementedError  # DataView's

    @property
    def stores_steps(self) -> bool:
        """Split by steps: whether this view keeps its steps until the carry arrives."""
        return self._stored is not None

    def keep_received(self, seg: Segment, ephi: torch.Tensor) -> None:
        """Split by steps: store a step of this rank's block that the other rank of its pair
        integrated (its ``path`` and decoupled decay are counted there, once)."""
        assert self._stored is not None  # shard_steps() started the block
        self._stored.append((self._kept_segment(seg), ephi))

    def take_stored(self, steps: List[int]) -> Dict[int, torch.Tensor]:
        """Split by steps: remove the stored steps ``steps`` (integrated here, of the other rank's
        block) and return their ``η D φ`` to hand over."""
        assert self._stored is not None
        wanted = set(steps)
        out = {seg.step: ephi for seg, ephi in self._stored if seg.step in wanted and ephi is not None}
        self._stored = [(seg, ephi) for seg, ephi in self._stored if seg.step not in wanted]
        return out

    def _kept_segment(self, seg: Segment) -> Segment:
        """What a block split by steps keeps of ``seg`` until its carry arrives: no θ_s or Δ_s (the
        test and training sides read θ_{s−1}, the coefficients and the record), and coefficient
        vectors equal to the previous kept step's shared with it (constant hyperparameters). The
        block holds every one of its steps at once, so each P-vector dropped is a P-vector per
        step of new memory (page faults) saved."""
        prev = self._stored[-1][0].coeffs if self._stored else None
        co = seg.coeffs
        if prev is not None:
            shared = {f.name: getattr(prev, f.name) for f in dataclasses.fields(co)
                      if f.name in _CONSTANT_COEFFS and torch.equal(getattr(prev, f.name), getattr(co, f.name))}
            co = dataclasses.replace(co, **shared)
        empty = seg.theta0.new_empty(0)  # a use of the dropped end would fail loudly, not silently
        return dataclasses.replace(seg, theta1=empty, delta=empty, coeffs=co)

    def finish_shard(self) -> None:
        """Split by steps: exchange the reverse-time carries between the ranks' blocks, then run
        this block's test side and training side with the true accumulators.

        The accumulators obey the linear recurrence ``A_i = f_i + β_{i+1} A_{i+1}``: a block run
        from a zero carry gives ``L`` at its first step, and the true value there is
        ``L + (Π β) A_{next block}``; one all-gather of ``(L, Π β, β_first)`` per rank gives
        every rank the accumulator entering its block from above, exactly.
        """
        stored, self._stored = self._stored, None
        assert stored is not None  # shard_steps() started the block
        stored.sort(key=lambda entry: -entry[0].step)  # descending (a pair's steps arrive in any order)
        keys = list(range(len(self.windows))) if self.indexing == "application" else [0]
        P = self.epk.layout.total
        dev, dt = self.epk.device, self.epk.dtype
        local = torch.zeros(len(keys), self.n, P, dtype=dt, device=dev)
        prod = torch.ones(P, dtype=dt, device=dev)  # Π β over the block's steps after its first
        beta_next: Optional[torch.Tensor] = None
        # Only the blocks below read this block's (L, Π β, β_first): the lowest block skips the pass
        # over its stored steps (a pass over [windows, inputs, P] per step) and sends zeros.
        needed = distributed.rank() > 0
        for seg, ephi in stored if needed else []:  # descending steps
            if beta_next is not None:
                local.mul_(beta_next)
                prod.mul_(beta_next)
            if ephi is not None:
                e = seg.coeffs.e
                for k in (self.windows_of.get(seg.step, []) if self.indexing == "application" else [0]):
                    local[k].addcmul_(e, ephi)
            beta_next = seg.coeffs.beta * torch.ones(P, dtype=dt, device=dev)
        first_beta = beta_next if beta_next is not None else torch.ones(P, dtype=dt, device=dev)
        # one tensor all-gather (no pickling of the n × P accumulators): (L, Π β, β_first, has steps)
        flag = torch.ones(1, dtype=dt, device=dev) * float(bool(stored))
        packed = distributed.all_gather_equal(torch.cat([local.reshape(-1), prod, first_beta, flag]))
        size = local.numel()
        parts = [(bool(t[-1] != 0), t[:size].view_as(local), t[size : size + P], t[size + P : size + 2 * P])
                 for t in packed]
        carry, carry_beta = self._carry_in(parts)
        self._beta_next = carry_beta
        if carry is not None:
            if self.indexing == "application":
                self._acc = {k: carry[k].clone() for k in keys if bool((carry[k] != 0).any())}
            else:
                self._full = carry[0].clone()
        stored.reverse()
        while stored:  # descending steps; each step's η D φ freed once used (its memory serves the next)
            seg, ephi = stored.pop()
            beta = self._beta_next
            self._beta_next = seg.coeffs.beta
            self._test_side(seg, ephi, beta, keep_all=True)
            del seg, ephi
        self._merge_replicated()

    def _carry_in(self, parts: List[Any]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The accumulators entering this rank's block from the later blocks, and the β they meet."""
        me = distributed.rank()
        above = [r for r in range(me + 1, len(parts)) if parts[r][0]]
        if not above:
            return None, None
        acc: Optional[torch.Tensor] = None  # the true accumulator at the first step of block r
        nxt_beta: Optional[torch.Tensor] = None  # β at the first step of the block above r
        for r in reversed(above):
            _, local, prod, first_beta = parts[r]
            if acc is None:
                acc = local
            else:
                assert nxt_beta is not None  # set with acc
                acc = local + prod * (nxt_beta * acc)
            nxt_beta = first_beta
        return acc, nxt_beta

    def _merge_replicated(self) -> None:
        """Split by steps, every rank measured its own steps' gradient scales (and replay checks)."""
        merged: Dict[int, float] = {}
        mismatch: Dict[int, float] = {}
        for scales, mm in distributed.all_gather_objects((self.grad_scale, self.__dict__.get("_replay_mismatch", {}))):
            merged.update(scales)
            mismatch.update(mm)
        self.grad_scale = merged
        if mismatch:
            self.__dict__["_replay_mismatch"] = mismatch
