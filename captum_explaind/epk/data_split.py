"""The data view's sweep split by steps under ``torchrun``: the reverse-time carry between the
ranks' blocks (see :mod:`captum_explaind.epk.data_view`).

Each rank owns a contiguous block of the steps. Its steps' ``η D φ`` are stored as they are
integrated (some by the other rank of its pair, handed over), because the accumulators of the
block's test side need the carry from every later block. Each stored step is also folded, right
away, into the block's own carry ``L`` (the accumulators at its first step from a zero carry: a
fixed weight per step, :meth:`StepSplit.begin_block`), so no pass over the stored steps waits for
the last one; :meth:`StepSplit.finish_shard` then hands the carries down the ranks (point to point,
each rank adding its own) and runs the block's test and training sides with the true accumulators.
:class:`StepSplit` is a mixin of :class:`~captum_explaind.epk.data_view.DataView`, which owns the
state it reads (``_stored``, the accumulators, the windows) and the test side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import distributed
from .segment import Segment

__all__ = ["StepSplit"]

# coefficient vectors that a block split by steps shares between consecutive kept steps when equal
_CONSTANT_COEFFS = ("lr", "active", "beta", "h", "e", "z", "sign", "decay_coupled", "decay_decoupled")

#: first message tag of the carry handed down the ranks, above every step (the hand-over of a pair's
#: steps is tagged by step, and the rank above may be the pair's other rank)
_CARRY_TAG = 2**30


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
    # begin_block: the weight of each step of the block in its carry L (None: 1), L, Π β, β_first
    _carry_weight: Dict[int, Optional[torch.Tensor]]
    _local: Optional[torch.Tensor]
    _block_prod: Optional[torch.Tensor]
    _block_beta: Optional[torch.Tensor]

    def _test_side(self, seg: Segment, ephi: Optional[torch.Tensor], beta_next: Optional[torch.Tensor],
                   keep_all: bool = False) -> None:
        raise NotImplementedError  # DataView's

    def begin_block(self, block: List[int], beta_of: Callable[[int], torch.Tensor]) -> None:
        """Split by steps: this rank's block (ascending, every step of it) and each step's β_s.

        The accumulators obey ``A_i = f_i + β_{i+1} A_{i+1}``, so from a zero carry the block's
        first step f holds ``L = Σ_i w_i f_i`` with ``w_i = Π_{f < j ≤ i} β_j``: each step's
        ``e η D φ`` is added with its weight as soon as it is stored, in any order. The lowest
        block keeps no ``L`` (no block below reads it).
        """
        self._carry_weight, self._local = {}, None
        self._block_prod = self._block_beta = None
        if distributed.rank() == 0 or not block:
            return
        w: Optional[torch.Tensor] = None
        for s in block:
            if s != block[0]:
                w = beta_of(s) if w is None else w * beta_of(s)
            self._carry_weight[s] = w
        self._block_beta = beta_of(block[0])
        self._block_prod = w if w is not None else torch.ones_like(self._block_beta)
        keys = len(self.windows) if self.indexing == "application" else 1
        self._local = torch.zeros(keys, self.n, self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)

    def _fold(self, seg: Segment, ephi: Optional[torch.Tensor]) -> None:
        """Add a stored step's ``e η D φ`` to the block's carry ``L`` (see :meth:`begin_block`);
        a step of the other block of a pair, integrated here and handed over, is its owner's."""
        if self._local is None or ephi is None or seg.step not in self._carry_weight:
            return
        w = self._carry_weight[seg.step]
        e = seg.coeffs.e
        coef = e if w is None else w * e
        for k in (self.windows_of.get(seg.step, []) if self.indexing == "application" else [0]):
            self._local[k].addcmul_(ephi, coef)

    @property
    def stores_steps(self) -> bool:
        """Split by steps: whether this view keeps its steps until the carry arrives."""
        return self._stored is not None

    def keep_received(self, seg: Segment, ephi: torch.Tensor) -> None:
        """Split by steps: store a step of this rank's block that the other rank of its pair
        integrated (its ``path`` and decoupled decay are counted there, once)."""
        assert self._stored is not None  # shard_steps() started the block
        self._fold(seg, ephi)
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
        """Split by steps: hand the reverse-time carries down the ranks' blocks, then run this
        block's test side and training side with the true accumulators.

        The true accumulators at the first step of block r are ``L_r + (Π β)_r β_{first of r+1}
        A_{r+1}`` (:meth:`begin_block`): the top block sends its ``L``; each block below receives
        the accumulators entering it, adds its own, and sends them on — one message between
        neighbours (an all-gather would move every rank's carry to every rank).
        """
        stored, self._stored = self._stored, None
        assert stored is not None  # shard_steps() started the block
        stored.sort(key=lambda entry: -entry[0].step)  # descending (a pair's steps arrive in any order)
        carry, carry_beta = self._carry_down(bool(stored))
        self._beta_next = carry_beta
        if carry is not None:
            if self.indexing == "application":
                self._acc = {k: carry[k] for k in range(len(self.windows)) if bool((carry[k] != 0).any())}
            else:
                self._full = carry[0]
        del carry
        stored.reverse()
        while stored:  # descending steps; each step's η D φ freed once used (its memory serves the next)
            seg, ephi = stored.pop()
            beta = self._beta_next
            self._beta_next = seg.coeffs.beta
            self._test_side(seg, ephi, beta, keep_all=True)
            del seg, ephi
        self._merge_replicated()

    def _carry_down(self, has_steps: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The accumulators entering this rank's block from the later blocks and the β they meet
        (None, None at the top), received from the rank above; this block's own sent below."""
        me, world = distributed.rank(), distributed.world_size()
        keys = len(self.windows) if self.indexing == "application" else 1
        P, dev, dt = self.epk.layout.total, self.epk.device, self.epk.dtype
        carry = carry_beta = None
        if me + 1 < world:
            like = [torch.empty(keys, self.n, P, dtype=dt, device=dev), torch.empty(P, dtype=dt, device=dev),
                    torch.empty(1, dtype=dt, device=dev)]
            acc, beta, flag = distributed.recv_tensors(like, me + 1, _CARRY_TAG)
            if bool(flag[0] != 0):  # (a block above without steps sends nothing to carry)
                carry, carry_beta = acc, beta
        if me > 0:
            local, self._local = self._local, None
            if has_steps and local is not None:
                assert self._block_prod is not None and self._block_beta is not None  # set with local
                if carry is not None:
                    assert carry_beta is not None  # received with carry
                    local.addcmul_(self._block_prod * carry_beta, carry)
                out = [local, self._block_beta, torch.ones(1, dtype=dt, device=dev)]
            elif carry is not None:
                assert carry_beta is not None
                out = [carry, carry_beta, torch.ones(1, dtype=dt, device=dev)]
            else:
                out = [torch.zeros(keys, self.n, P, dtype=dt, device=dev), torch.ones(P, dtype=dt, device=dev),
                       torch.zeros(1, dtype=dt, device=dev)]
            distributed.send_tensors(out, me - 1, _CARRY_TAG)
        return carry, carry_beta

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
