r"""Reverse-time data attribution without per-sample buffers (MATH.md §8–9).

The kernel part of every update is linear in per-sample loss gradients through the optimizer's
momentum (see :mod:`captum_explaind.epk.updates`). Summing the influence of training sample k
over application steps and reversing the order of summation gives

.. math::

    \sum_s Γ_s(x, k) = -\sum_i σ_i c_i a_{i,k} \, ⟨ G_{i,k}, T_i(x) ⟩, \qquad
    A_i = e_i η_i D_i φ_i(x) + β_{i+1} A_{i+1}, \quad T_i = h_i A_i + z_i η_i D_i φ_i(x),

where ``φ_i(x)`` is the integrated gradient of the target output along step i and
``G_{i,k} = ∇_θ L(f(θ_{i−1}; x_k), y_k)`` the per-sample loss gradient at the parameters before
step i. One backward sweep over the steps keeps one accumulator ``A`` per test input
(memory ``n_inputs × P``) and touches, at step i, only the samples of that step's batch.

Windows of *application* steps (the paper's indexing) use one accumulator per window,
``A^W_i = [i ∈ W] e_i η_i D_i φ_i + β_{i+1} A^W_{i+1}`` (MATH.md §9): gradients computed before
a window still receive credit inside it through momentum, so the sweep runs past the window until
the accumulator has decayed below round-off. Such windows may overlap: a step in two windows
feeds both accumulators, and every visited step's per-sample gradients serve all windows at
once (each window's parts are kept apart, so it decomposes its own change). Windows of
*gradient* steps route each step's scores, computed with the full accumulator, to the window
holding that step.

The global gradient scale ``c_i`` (clipping, loss scaling, accumulation) is measured at replay:
the replayed batch gradient ``Σ_k a_{i,k} G_{i,k}`` against the recorded norm of the gradient
the optimizer saw. Weight decay enters through the same accumulators (coupled) or directly
(decoupled). Whatever the recorded update holds beyond the replayed kernel and regularization
parts — the residual ``E_i`` — is reported separately:
``Σ_i φ_i·Δ_i − Σ_k scores − regularization``, which equals ``Σ_i φ_i·E_i`` exactly.

Under ``torchrun`` both sides are split over the ranks, step by step: each rank integrates its
block of the test inputs (φ, the accumulators, T and the regularization of those rows); the rows
of ``T_i`` are all-gathered; each rank projects its share of step i's training samples on all of
them, and the replayed batch gradient behind ``c_i`` is all-reduced. Every (input, sample, step)
score is then computed on exactly one rank, and the engine sums them at the end. (A forward-mode
step, whose cost is per direction, is split by the rows of ``T`` instead, with nothing to gather.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import distributed
from . import checks
from .batch import Batch
from .data_split import StepSplit
from .integrands import VjpIntegrand
from .results import DataDecomposition, SweepStats
from .segment import Chunk, Segment
from .target import Target
from .train_grads import IndependentGrads, TrainGrads, select_train_grads, subnormals_flushed
from .train_jvp import forward_mode
from .training_set import TrainingSet, measured_grad_scale
from .views import ViewBase

if TYPE_CHECKING:
    from .engine import ExactPathKernel

__all__ = ["DataView", "PolylineDataView", "data_view", "STEP_SPLIT_BYTES"]

#: under ``torchrun``, the most a rank may hold of its block's integrated test gradients to split the
#: data view by steps (else it is split by test inputs and training samples)
STEP_SPLIT_BYTES = 2 * 2**30

class DataView(StepSplit, ViewBase):
    """Reverse-sweep accumulator of per-training-sample scores.

    Args:
        epk (ExactPathKernel): the core.
        n (int): number of test inputs.
        target (Target): resolved target.
        train (TrainingSet): the training samples.
        loss_fn (Callable): per-sample loss ``loss_fn(outputs, labels) -> [m]``.
        windows (list[range]): windows of steps (one score slot each).
        indexing (str): ``"application"`` or ``"gradient"``.
        groups (OrderedDict[str, list[str]] or None): parameter groups for a group axis.
        train_batch_size (int or None): training samples per per-sample-gradient call;
            ``None``: as many as fit in ~24 MiB of per-sample gradients.
        grads (TrainGrads, optional): how per-sample training gradients are computed; default
            :func:`~captum_explaind.epk.train_grads.select_train_grads` (independent per sample,
            or coupled through train-mode batch statistics when the recording shows them).
    """

    # Split over blocks of test inputs (the accumulators are per input) and, per step, over the
    # step's training samples (see the module docstring); the measured gradient scales are the
    # same on every rank. A rank without test inputs still takes its share of the samples.
    shard_sum = ("scores", "other", "regularization", "path", "exact", "buffers")
    shard_copy = ("grad_scale",)
    splits_training = True
    replays_training = True  # needs every optimizer step (no keep_every)
    label = "data view"

    def __init__(
        self,
        epk: "ExactPathKernel",
        n: int,
        target: Target,
        train: TrainingSet,
        loss_fn: Callable,
        windows: List[range],
        indexing: str,
        groups: Optional["OrderedDict[str, List[str]]"],
        train_batch_size: Optional[int],
        grads: Optional[TrainGrads] = None,
    ) -> None:
        self.epk, self.n, self.target, self.train, self.loss_fn = epk, n, target, train, loss_fn
        if grads is None:
            # forward mode (.train_jvp) where a step's per-sample gradients do not fit, or by option
            grads = forward_mode(select_train_grads(epk, train, loss_fn), epk)
        self.grads = grads
        self.windows, self.indexing = windows, indexing
        self.train_batch_size = train_batch_size
        dev, dt = epk.device, epk.dtype
        # application indexing: windows may overlap (a step in two windows credits both; one sweep
        # serves them all); gradient indexing: they partition the steps
        self.windows_of: Dict[int, List[int]] = {}
        for w, r in enumerate(windows):
            for s in r:
                if s in self.windows_of and indexing != "application":
                    raise ValueError(f"step windows overlap at step {s} (indexing={indexing!r} needs disjoint windows)")
                self.windows_of.setdefault(s, []).append(w)
        layout = epk.layout
        if groups is None:
            self.group_slices = [[slice(0, layout.total)]]
        else:
            self.group_slices = [[layout.slice(p) for p in names if p in layout] for names in groups.values()]
        self.covered, self.uncovered = _coverage(layout, groups)
        W, G = len(windows), len(self.group_slices)
        self.scores = torch.zeros(n, train.n, W, G, dtype=dt, device=dev)
        # the share of the parameters in no group: exact, from the replayed batch gradient
        self.other = torch.zeros(n, W, dtype=dt, device=dev)
        self._uncovered_cols = None if not self.uncovered else torch.cat(
            [torch.arange(layout.slice(nm).start, layout.slice(nm).stop, device=dev) for nm in self.uncovered])
        # per-sample gradients of the grouped parameters only (backward stops at them) where the
        # samples are independent and forward mode is not asked for; else the full per-sample path
        inner = getattr(grads, "inner", grads)
        self._restricted: Optional[IndependentGrads] = (
            inner if (self.uncovered and type(inner) is IndependentGrads and epk.options.train_jvp is not True)
            else None)
        self.regularization = torch.zeros(n, W, dtype=dt, device=dev)
        # per window (a step counts in each window holding it):
        self.path = torch.zeros(n, W, dtype=dt, device=dev)  # Σ_s φ_s·Δ_s over integrated steps
        self.exact = torch.zeros(n, W, dtype=dt, device=dev)  # Σ_s f(θ_s) − f(θ_{s−1}) over them
        self.buffers = torch.zeros(n, W, dtype=dt, device=dev)  # output jumps of buffers moved after them
        self.grad_scale: Dict[int, float] = {}
        self.first_window_step = min(r.start for r in windows)
        self.last = max(r.stop - 1 for r in windows) if indexing == "application" else epk.num_steps
        self._acc: Dict[int, torch.Tensor] = {}  # window -> accumulator A^W (application indexing)
        self._peak: Dict[int, float] = {}
        self._full: Optional[torch.Tensor] = None  # full accumulator (gradient indexing)
        self._beta_next: Optional[torch.Tensor] = None
        self._phi: Optional[torch.Tensor] = None
        self._tiny = torch.finfo(dt).eps * 1e-3
        self.group_names = None if groups is None else list(groups)
        self.groups_by_name = groups
        # The test side (φ, accumulators, T) holds rows lo..hi only: all of them, or this rank's
        # block when the engine splits the sweep over the ranks (shard_rows).
        self._split = False
        self._lo, self._hi = 0, n
        # Split by steps instead (shard_steps): this rank's steps, stored for the carry exchange
        self._stored: Optional[List[Tuple[Segment, Optional[torch.Tensor]]]] = None
        self._carry_weight: Dict[int, Optional[torch.Tensor]] = {}  # begin_block: the block's carry
        self._local: Optional[torch.Tensor] = None
        self._block_prod: Optional[torch.Tensor] = None
        self._block_beta: Optional[torch.Tensor] = None

    def shard_steps(self, last: int) -> bool:
        """The engine asks whether the split sweep may give each rank a contiguous block of the
        steps ``1..last`` (all inputs) instead of a block of the inputs. Yes when every rank gets a
        step and this rank's stored ``η D φ`` (inputs × P per step) fits :data:`STEP_SPLIT_BYTES`,
        and no ``max_memory`` budget is set (its plan does not count the stored gradients); then
        each step's whole training side runs on one rank, and the per-call overheads of small
        batches are not paid twice."""
        world = distributed.world_size()
        P, size = self.epk.layout.total, torch.finfo(self.epk.dtype).bits // 8
        # η D φ plus a step's parameter-sized vectors, for up to 1.5 blocks (the ranks of a pair
        # integrate up to 1.5 of their blocks before handing the other's steps over: PAIR_LIMIT)
        per_rank = -(-3 * last // (2 * world)) * (self.n + 12) * P * size
        if last < world or per_rank > STEP_SPLIT_BYTES or self.epk.options.max_memory is not None:
            return False
        self._stored = []
        return True

    def shard_rows(self, rows: range) -> None:
        """The engine splits the sweep over the ranks; this rank integrates test inputs ``rows``."""
        self._split = True
        self._lo, self._hi = rows.start, max(rows.start, rows.stop)

    def _zeros_rows(self) -> torch.Tensor:
        return torch.zeros(self._hi - self._lo, self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)

    @property
    def per_input_vectors(self) -> int:
        """Memory model: φ, T and the test directions, plus one accumulator per window."""
        return 3 + 2 * len(self.windows)

    @property
    def integrate_steps(self) -> List[int]:
        if self.indexing == "application":
            return sorted(self.windows_of)
        return list(range(self.first_window_step, self.epk.num_steps + 1))

    # ------------------------------------------------------------------ sweep protocol
    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        return self.target.select(out, chunk.offset + rows).unsqueeze(1)

    def step_change(self, step: int, chunk: Chunk, c0: torch.Tensor, c1: torch.Tensor) -> None:
        self._to_windows(self.exact, step, slice(chunk.offset, chunk.offset + chunk.n), (c1 - c0)[:, 0])

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None:
        rows = torch.arange(chunk.n, device=jump.device)
        self._to_windows(self.buffers, step, slice(chunk.offset, chunk.offset + chunk.n),
                         self.target.select(jump, chunk.offset + rows))

    def _to_windows(self, acc: torch.Tensor, step: int, rows: slice, value: torch.Tensor) -> None:
        """Add ``value`` (per input of ``rows``) to ``acc[rows, w]`` for every window ``w`` holding ``step``
        (every integrated step is in one: application indexing integrates the windows' steps, gradient
        indexing the steps from the first window's on, which the windows partition)."""
        ws = self.windows_of.get(step)
        assert ws, f"step {step} was integrated but lies in no window"
        for w in ws:
            acc[rows, w] += value

    def integrand(self, seg: Segment, chunk: Chunk) -> VjpIntegrand:
        lo = self._lo

        def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
            if self._phi is None:
                if _covers(rows, lo, self._hi) and payload.is_contiguous():
                    # one hand-over of every row (the base rule accepted them all): the payload
                    # is φ itself (the integrator never touches it again), no zeros plus a copy
                    self._phi = payload
                    return
                self._phi = self._zeros_rows()
            self._phi.index_add_(0, rows - lo, payload)

        return VjpIntegrand(self.epk.functional, seg, chunk, self.target, sink)

    def end_step(self, seg: Segment, integrated: bool) -> None:
        co = seg.coeffs
        beta_next = self._beta_next
        self._beta_next = co.beta
        ephi = phi = None
        if integrated:
            phi = self._phi
            if phi is None:  # a rank with no test inputs of its own (the sweep is split): nothing integrated
                assert self._split and self._hi == self._lo
                phi = self._zeros_rows()
            self._phi = None
            self._to_windows(self.path, seg.step, slice(self._lo, self._hi), phi @ seg.delta)
            self._decoupled(seg, phi)
            # η_s D_s φ_s in φ's own memory (φ is not read again): no new [inputs, P] array per step
            ephi = phi.mul_(co.lr if co.precond is None else co.lr * co.precond)
        if self._stored is not None:  # split by steps: the test side needs the carry from later ranks
            self._fold(seg, ephi)
            self._stored.append((self._kept_segment(seg), ephi))
            return
        self._test_side(seg, ephi, beta_next)

    def _test_side(self, seg: Segment, ephi: Optional[torch.Tensor], beta_next: Optional[torch.Tensor],
                   keep_all: bool = False) -> None:
        """Accumulators, T_s, coupled decay and scores of step ``seg`` (``ephi`` = η_s D_s φ_s or None).
        ``keep_all``: never drop a decayed window (a block of a split sweep: no global view of it)."""
        s, co = seg.step, seg.coeffs
        # --- test side: accumulators and σ T_s for every window that can still receive credit.
        # Each is one fused pass over [rows, P] (these arrays are what a step of this side streams
        # through memory): A·β + e η D φ by addcmul, σ T = (σ h)·A (+ (σ z) η D φ in the step's own
        # windows) written straight into the stacked [Wa, rows, P] the projection reads.
        sh = co.h * co.sign  # σ enters every per-sample term: folded into T once (σ = ±1)
        # e = 1 (SGD) and z = 0 (all but Nesterov) are common: each saves a pass over [rows, P]
        unit_e = bool((co.e == 1).all())
        with_z = bool((co.z != 0).any())
        windows: List[int] = []
        accs: List[torch.Tensor] = []
        own: List[int] = []
        zs_ephi: Optional[torch.Tensor] = None  # σ z_s η_s D_s φ_s, in T of the step's own windows only
        if self.indexing == "application":
            own = self.windows_of.get(s, [])  # the windows holding step s (several where they overlap)
            fresh = torch.empty(0)  # e_s η_s D_s φ_s, shared by the step's own windows
            if own:
                assert ephi is not None  # application indexing integrates every step of the windows
                fresh = ephi if unit_e else co.e * ephi  # (never changed in place: may be shared)
                zs_ephi = (co.z * co.sign) * ephi if with_z else None
            for w in list(self._acc):  # out-of-place updates only: the windows may share `fresh`
                assert beta_next is not None  # accumulators exist only after a (later) step set _beta_next
                acc = self._acc[w]
                self._acc[w] = torch.addcmul(fresh, acc, beta_next) if w in own else acc * beta_next
            for w0 in own:
                if w0 not in self._acc:
                    self._acc[w0] = fresh
            # max |A^W| decides only for the windows outside their own steps (below their start):
            # the drop test, and the zero test of a block of a split sweep. Inside its window an
            # accumulator is always used, so no pass reads it for its size there.
            sizes = self._acc_sizes([w for w in self._acc if w not in own])
            for w, acc in list(self._acc.items()):
                if w not in own:
                    # the reference is the largest size since the window was left: never above
                    # the peak inside it, so a window is kept at least as long as against that
                    peak = self._peak[w] = max(self._peak.get(w, 0.0), sizes[w])
                    if keep_all and sizes[w] == 0.0:
                        continue  # nothing carried into this window yet (no momentum): no credit
                    if not keep_all and s < self.windows[w].start and sizes[w] <= self._tiny * peak:
                        del self._acc[w]  # decayed below round-off: nothing earlier can reach it
                        continue
                windows.append(w)
                accs.append(acc)
        else:
            # gradient indexing: the windows partition 1..N, so every visited step is integrated
            assert ephi is not None
            fresh = ephi if unit_e else co.e * ephi  # (never changed in place)
            if self._full is None:
                self._full = fresh
            else:
                assert beta_next is not None  # _full was started by a (later) step, which set _beta_next
                self._full = torch.addcmul(fresh, self._full, beta_next)
            own = self.windows_of.get(s, [])  # one: the windows partition the steps
            zs_ephi = (co.z * co.sign) * ephi if own and with_z else None
            windows, accs = list(own), [self._full] * len(own)
        if not windows:
            return
        Ts = torch.empty(len(windows), *accs[0].shape, dtype=accs[0].dtype, device=accs[0].device)
        for k, (w, acc) in enumerate(zip(windows, accs)):
            if w in own and zs_ephi is not None:
                torch.addcmul(zs_ephi, sh, acc, out=Ts[k])
            else:
                torch.mul(sh, acc, out=Ts[k])
        # --- regularization: coupled decay rides the accumulators (decoupled decay: _decoupled)
        if bool((co.decay_coupled != 0).any()):
            lt = co.sign * co.decay_coupled * seg.theta0  # T·(λ θ) = (σ T)·(σ λ θ), σ = ±1
            for k, w in enumerate(windows):
                self.regularization[self._lo : self._hi, w] -= Ts[k] @ lt
        self._score_batch(seg, windows, Ts)

    def _decoupled(self, seg: Segment, phi: Optional[torch.Tensor]) -> None:
        """Decoupled decay enters directly: ``−η_s φ_s·(λ θ_{s−1})`` in the step's own window(s)."""
        co = seg.coeffs
        if phi is not None and seg.step in self.windows_of and bool((co.decay_decoupled != 0).any()):
            # (η λ θ) as one vector: no scaled copy of φ
            self._to_windows(self.regularization, seg.step, slice(self._lo, self._hi),
                             -(phi @ (co.lr * co.decay_decoupled * seg.theta0)))

    def _acc_sizes(self, keys: List[int]) -> Dict[int, float]:
        """``max |A^W|`` over all test inputs for the windows ``keys`` (over every rank's rows
        when split, so that all ranks drop a decayed window, and stop, at the same step; ``keys``
        depends on the step and the windows alone, so every rank calls the reduction or none)."""
        if not keys:
            return {}
        # max |A| by a reduction (no |A| array): one read of each accumulator
        accs = [self._acc[w] for w in keys]
        sizes = torch.stack([torch.linalg.vector_norm(acc, float("inf")) if acc.numel() else acc.new_zeros(())
                             for acc in accs])
        if self._split:
            distributed.all_reduce_max_(sizes)
        return dict(zip(keys, sizes.tolist()))

    def run(self, batch: Batch, show_progress: Optional[bool] = None) -> SweepStats:
        """The reverse sweep over the steps that can contribute to the windows (subnormal numbers
        flushed: :func:`~.train_grads.subnormals_flushed`)."""
        with subnormals_flushed():
            return self.epk.sweep_reverse(batch, self, last=self.last, integrate=self.integrate_steps,
                                          need_precond=True, desc="training data", show_progress=show_progress)

    def result(self, stats: SweepStats, multi: bool) -> DataDecomposition:
        """Scores (window axis kept for a window list, group axis for ``layers``) and the parts beside them."""
        scores, other = self.scores, self.other
        # every part per window ([n, W]; a step in two overlapping windows counts in both), the
        # totals their sums over the windows
        parts = {"regularization": self.regularization,
                 "residual": self.path - scores.sum(dim=(1, 3)) - other - self.regularization,
                 "change": self.exact + self.buffers, "delta": self.exact - self.path, "buffers": self.buffers}
        # per window only where a window's scores decompose its own change: application indexing
        # (gradient indexing credits a window's gradients for updates applied in later windows)
        per_window = parts if multi and self.indexing == "application" else None
        if not multi:
            scores, other = scores[:, :, 0], other[:, 0]
        if self.group_names is None:
            scores = scores[..., 0]
        totals = {k: v.sum(dim=1) for k, v in parts.items()}
        out = DataDecomposition(
            scores=scores, other=other, regularization=totals["regularization"], residual=totals["residual"],
            change=totals["change"], delta=totals["delta"], buffers=totals["buffers"], per_window=per_window,
            train_grads=self.grads.name,
            grad_scale=dict(sorted(self.grad_scale.items())), windows=list(self.windows), indexing=self.indexing,
            groups=self.group_names, train_indices=torch.arange(self.train.n), stats=stats,
            options=self.epk.options.to_dict(),
        )
        checks.check_data_result(self, out)  # non-finite scores: error; residual ≫ round-off: warning
        return out

    def done(self, step: int) -> bool:
        return self.indexing == "application" and step <= self.first_window_step and not self._acc

    # ------------------------------------------------------------------ training side
    def _score_batch(self, seg: Segment, windows: List[int], Ts: torch.Tensor) -> None:
        """Step ``seg``'s training side: ``Ts`` ``[Wa, rows lo..hi, P]`` holds σ T_s of ``windows``."""
        rec, s = seg.record, seg.step
        idx, dots, rows, g_rep = self._project(rec, seg.theta0, Ts)  # at θ_{s−1}
        c = measured_grad_scale(rec, g_rep, seg.coeffs.active)
        checks.note_replay(self, rec, g_rep * seg.coeffs.active, c)
        self.grad_scale[s] = c
        contrib = -c * dots  # [Wa, rows, m, G]
        target_idx = idx.to(self.scores.device)
        for k, w in enumerate(windows):
            self.scores[rows, :, w, :].index_add_(1, target_idx, contrib[k])
        if self._uncovered_cols is not None:
            # Σ_k a_k ⟨G_k, T⟩ over the ungrouped parameters = ⟨g_rep, T⟩ there (this rank's rows of T;
            # g_rep is the whole step's, all-reduced when the samples are split)
            cols = self._uncovered_cols
            oth = -c * (Ts[:, :, cols] @ g_rep[cols])  # [Wa, rows lo..hi]
            for k, w in enumerate(windows):
                self.other[self._lo : self._hi, w] += oth[k]

    def _project(self, rec: Any, theta: torch.Tensor, Ts: torch.Tensor, group_slices: Optional[List[List[slice]]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, slice, torch.Tensor]:
        """Step ``rec``'s training side against ``Ts`` ``[Wa, rows lo..hi, P]``: ``(indices [m],
        dots [Wa, r, m, G], the test rows r they score, replayed gradient)``; split over the ranks
        when the sweep is (see the module docstring)."""
        Wa, _, P = Ts.shape
        groups = self.group_slices if group_slices is None else group_slices
        restricted = self._restricted if group_slices is None else None
        project: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = self.grads.project
        if restricted is not None:
            def project(rec: Any, theta: torch.Tensor, D: torch.Tensor, groups: Any, part: Any = None) -> Any:
                assert restricted is not None
                return restricted.project_restricted(rec, theta, D, groups, self.covered, part=part)
        if self._split and (restricted is not None or self.grads.splits_samples(rec)):
            # every rank needs every row of T against its share of the samples
            full = distributed.all_gather_shards(Ts, self.n, dim=1)
            part = (distributed.rank(), distributed.world_size())
            idx, dots, g_rep = project(rec, theta, full.reshape(Wa * self.n, P), groups, part=part)
            distributed.all_reduce_sum_([g_rep])
            return idx, dots.reshape(Wa, self.n, *dots.shape[1:]), slice(0, self.n), g_rep
        # one process, or a forward-mode step (its work is per direction): this rank's rows, all samples
        r = self._hi - self._lo
        idx, dots, g_rep = project(rec, theta, Ts.reshape(Wa * r, P), groups)
        return idx, dots.reshape(Wa, r, *dots.shape[1:]), slice(self._lo, self._hi), g_rep


class PolylineDataView(DataView):
    r"""The data view on a ``keep_every=k`` recording, by explicit option (``polyline=True``): an
    approximation, whose error is reported in the residual — never folded into the scores.

    Only every k-th checkpoint is stored, so the parameters at which the k optimizer steps of a
    stored macro-step ``j`` computed their gradients are unknown. The path integral along the
    polyline through the kept checkpoints stays exact,
    ``f(θ_N) − f(θ_0) = Σ_j φ_j·Δ_j`` (φ_j integrated along segment j, error-controlled), and so does
    its split ``Δ_j = R_j + K_j`` into the recorded regularization sum ``R_j`` and the kernel part
    ``K_j``. ``K_j`` is attributed to the macro-step's training samples by their gradients at
    the segment's start ``θ_{j−1}``: per parameter tensor p,
    ``K_j|_p ≈ −a_{j,p} Σ_k w_{j,k} ∇ℓ_k(θ_{j−1})|_p`` with ``a_{j,p}`` the least-squares scale
    (the learning rate, for plain SGD at k = 1), and sample k's score is
    ``−Σ_p a_{j,p} w_{j,k} ∇ℓ_k(θ_{j−1})|_p · φ_j|_p``. The scores of a macro-step add up to
    ``φ_j`` times that fit; what it misses (gradients moving within the macro-step, momentum
    carried between steps, Adam's preconditioner varying within a tensor) is
    ``residual = Σ_j φ_j·(K_j − fit_j)``, so ``scores + regularization + residual + delta``
    is still the exact change. The residual shrinks as k → 1; on a recording of every step this
    view is not used (the exact :class:`DataView` runs). Windows and groups are as in
    :class:`DataView` (both indexings coincide: nothing is carried between macro-steps).
    """

    label = "data view (polyline)"
    replays_training = False  # runs on the kept checkpoints
    polyline = True  # checks.check_data_result names the approximation as the residual's cause

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        layout, groups_by_name = self.epk.layout, self.groups_by_name
        self._tensor_slices = [[layout.slice(name)] for name in layout.names]
        # tensor → group membership [n_tensors, G]: the fit is per tensor, the scores per group
        if self.group_names is None:
            self._member = torch.ones(len(layout.names), 1, dtype=self.epk.dtype, device=self.epk.device)
        else:
            assert groups_by_name is not None  # group_names is set from it
            self._member = torch.tensor([[1.0 if name in names else 0.0 for names in groups_by_name.values()]
                                         for name in layout.names], dtype=self.epk.dtype, device=self.epk.device)
        self.fit_scale: Dict[int, torch.Tensor] = {}  # step -> a_{j,p} per parameter tensor

    @property
    def per_input_vectors(self) -> int:
        return 3  # φ, its copy for the training side, the test direction

    def run(self, batch: Batch, show_progress: Optional[bool] = None) -> SweepStats:
        return self.epk.sweep_reverse(batch, self, last=self.last, integrate=sorted(self.windows_of),
                                      need_precond=False, desc="training data (polyline)",
                                      show_progress=show_progress)

    def done(self, step: int) -> bool:
        return step <= self.first_window_step

    def shard_steps(self, last: int) -> bool:
        """Split by steps whenever every rank gets one: nothing is carried between macro-steps."""
        return last >= distributed.world_size()

    def finish_shard(self) -> None:
        return None

    def end_step(self, seg: Segment, integrated: bool) -> None:
        if not integrated or seg.step not in self.windows_of:
            return
        phi = self._phi if self._phi is not None else self._zeros_rows()  # a rank without test inputs: zeros
        self._phi = None
        rows = slice(self._lo, self._hi)
        self._to_windows(self.path, seg.step, rows, phi @ seg.delta)
        reg = seg.coeffs.reg  # the recorded regularization sum of the macro-step (or None: no decay)
        kernel = seg.delta if reg is None else seg.delta - reg
        if reg is not None:
            self._to_windows(self.regularization, seg.step, rows, phi @ reg)
        idx, dots, drows, g_rep = self._project(seg.record, seg.theta0, phi.unsqueeze(0), self._tensor_slices)
        if not bool(torch.isfinite(g_rep).all()):
            checks.note_replay(self, seg.record, g_rep, 1.0)  # NaN/inf training gradients: the named error
        a = self._fit(kernel, g_rep)
        self.fit_scale[seg.step] = a
        contrib = -(dots[0] * a) @ self._member  # [rows, m, G]
        # the tensors in no group: their share of the fit, summed over the samples
        rest = (-(dots[0] * a) @ (1.0 - self._member.amax(dim=1))).sum(dim=1) if self.uncovered else None
        for w in self.windows_of[seg.step]:  # a step in overlapping windows credits each
            self.scores[drows, :, w, :].index_add_(1, idx.to(self.scores.device), contrib)
            if rest is not None:
                self.other[drows, w] += rest

    def _fit(self, kernel: torch.Tensor, g_rep: torch.Tensor) -> torch.Tensor:
        """``a_p = −K|_p·g|_p / |g|_p|²`` per parameter tensor (0 where the replayed gradient is 0)."""
        a = torch.zeros(len(self._tensor_slices), dtype=kernel.dtype, device=kernel.device)
        for t, (sl,) in enumerate(self._tensor_slices):
            gg = g_rep[sl] @ g_rep[sl]
            if float(gg) > 0:
                a[t] = -(kernel[sl] @ g_rep[sl]) / gg
        return a


def _covers(rows: torch.Tensor, lo: int, hi: int) -> bool:
    """Whether ``rows`` are exactly ``lo, lo + 1, …, hi − 1``, in order."""
    return rows.numel() == hi - lo and bool((rows == torch.arange(lo, hi, device=rows.device)).all())


def _coverage(layout: Any, groups: Optional["OrderedDict[str, List[str]]"]) -> Tuple[List[str], List[str]]:
    """``(covered, uncovered)``: the parameter tensors (of nonzero size, in layout order) in some
    group and in none; all covered without groups.

    Raises:
        ValueError: a parameter in several groups (its share would count once per group, and the
            parts would no longer add up to the change).
    """
    names = [nm for nm, k in zip(layout.names, layout.numels) if k]
    if groups is None:
        return names, []
    seen: Dict[str, str] = {}
    for gname, members in groups.items():
        for nm in members:
            if nm in seen and seen[nm] != gname:
                raise ValueError(
                    f"layers: parameter {nm!r} is in groups {seen[nm]!r} and {gname!r}; the data view's groups must "
                    "be disjoint (each parameter's share is counted once; parameters in no group are reported in "
                    "DataDecomposition.other)")
            seen[nm] = gname
    return [nm for nm in names if nm in seen], [nm for nm in names if nm not in seen]


def data_view(epk: "ExactPathKernel", *args: Any, **kwargs: Any) -> DataView:
    """The data view for ``epk``'s recording: :class:`PolylineDataView` on a ``keep_every > 1``
    recording with ``EPKOptions(polyline=True)``, else the exact :class:`DataView` (which refuses a
    ``keep_every`` recording with a named error). Arguments: as :class:`DataView`."""
    if epk.options.polyline and epk.trajectory.keep_every > 1:
        return PolylineDataView(epk, *args, **kwargs)
    return DataView(epk, *args, **kwargs)
