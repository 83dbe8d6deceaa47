r"""The Exact Path Kernel core: walks a recorded trajectory and integrates every step.

For a trajectory θ_0 → θ_1 → … → θ_N the fundamental theorem of calculus along each straight
segment gives, exactly,

.. math::

    f(θ_N; x) - f(θ_0; x) = \sum_s Φ_s(x)\, Δ_s, \qquad
    Φ_s(x) = \int_0^1 J_f(θ_{s-1} + tΔ_s; x)\, dt .

:class:`ExactPathKernel` evaluates ``Φ_s(x)·v`` by forward-mode AD (one ``jvp`` per quadrature
node, all inputs and outputs at once, never a Jacobian), splits each update into its kernel and
regularization parts (:mod:`.updates`) and refines every step whose integrated total misses the
exact change ``f(θ_s) − f(θ_{s−1})`` (:mod:`.integrator`). The attribution views reuse its sweep
with their own integrands. Inside a ``torch.distributed`` process group the sweeps are split over
the ranks and summed back by :mod:`.sweep_split`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import TrajectoryError
from ..recording.format import StepRecord
from ..recording.trajectory import Trajectory
from . import checks, sweep_split
from .allocator import keeps_heap
from .batch import Batch
from .functional import FunctionalModel
from .integrator import RULE_NODES, StepStats, integrate_step
from .layout import ParamLayout
from .memory import MemoryPlan, activation_bytes, plan, view_bytes
from .options import EPKOptions, resolve_options
from .outputs import OutputFn, resolve_output_fn
from .results import Reconstruction, SweepStats
from .segment import Chunk, Segment
from .selection import Selector, resolve_parameters
from .sweep_split import SweepLog
from .updates import UpdateModel
from .views import SweepView

__all__ = ["ExactPathKernel", "Segment", "Chunk", "SweepStats"]


class ExactPathKernel:
    r"""Exact path kernel of a recorded training run (the core every view builds on).

    Args:
        model (nn.Module): any instance of the trained architecture (Captum's ``forward_func``
            convention). Its current weights are not used — the trajectory supplies them — and it
            is never modified (a copy is evaluated in eval mode).
        trajectory (Trajectory or path): the recorded run, or its directory.
        options (EPKOptions or str, optional): how to compute — an
            :class:`~captum_explaind.epk.options.EPKOptions` or a preset name (``"exact"``,
            ``"balanced"``, ``"fast"``). Default: "exact"
        output_fn (Callable, optional): raw model output → the explained tensor ``[n, ...]``
            (e.g. ``lambda out: out.logits[:, -1]``). Default: a tensor as is, ``.logits`` of a
            ``ModelOutput``, the first element of a tuple.
        parameters (optional): parameter names, modules, globs (see :mod:`.selection`) whose
            contributions are resolved; the rest of the path integral is reported as ``other``.
            ``None``: every trainable parameter. Default: None
        **overrides: individual options overriding the preset (``nodes=8``,
            ``dtype=torch.float32``, ``rtol=...``, ``batch_size=...``, ``show_progress=True``;
            see :class:`~captum_explaind.epk.options.EPKOptions`).

    Cost: per step, ``nodes`` forward-mode passes over the inputs (each carrying 2 tangents:
    kernel and regularization) plus one forward pass, plus ``nodes + 1`` passes on the inputs and
    sub-intervals that need refining. Memory: a few parameter vectors and the inputs' outputs.

    Examples::

        >>> epk = ExactPathKernel(model, trajectory)
        >>> parts = epk.reconstruct(x_test)
        >>> parts.final - (parts.initial + parts.kernel + parts.regularization)  # ≈ parts.delta
        >>> ExactPathKernel(bert, trajectory, output_fn=lambda o: o.logits).reconstruct(tokenizer(texts, ...))
    """

    def __init__(
        self,
        model: nn.Module,
        trajectory: Union[Trajectory, str, os.PathLike],
        options: Union[EPKOptions, str, None] = None,
        *,
        output_fn: Optional[OutputFn] = None,
        parameters: Union[Selector, Sequence[Selector], None] = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        opts = resolve_options(options, **overrides)
        checks.check_trajectory_arg(trajectory)
        if not isinstance(trajectory, Trajectory):
            trajectory = Trajectory.open(trajectory)
        trajectory.validate(model)
        checks.check_model_state(model, trajectory)
        if trajectory.num_steps == 0:
            raise TrajectoryError(f"trajectory {trajectory.path!r} holds no steps")
        device = opts.device
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        checks.check_device(torch.device(device))
        dtype = opts.dtype if opts.dtype is not None else trajectory.spec[trajectory.trainable[0]].dtype
        self.options: EPKOptions = opts.replace(device=device, dtype=dtype)
        self.model = model
        self.trajectory = trajectory
        self.output_fn = resolve_output_fn(output_fn)
        self.layout = ParamLayout(trajectory.trainable, [trajectory.spec[n].shape for n in trajectory.trainable])
        self._plan: Optional[MemoryPlan] = None  # batch sizes of the sweep under way (max_memory)
        # (step, batch) -> outputs, within one reconstruct(): the input probe's f(θ_0), f(θ_N) are its ends
        self._end_outputs: Optional[dict] = None
        self._select_parameters(model, parameters)
        fixed = trajectory.frozen_params(device=self.device, dtype=self.dtype)
        self._initial_buffers = trajectory.buffers(0, device=self.device, dtype=self.dtype)
        fixed.update(self._initial_buffers)
        self.functional = FunctionalModel(model, self.layout, fixed, device=self.device, dtype=self.dtype,
                                          output_fn=self.output_fn, per_sample=self.options.per_sample)
        if trajectory.family == "other":
            warnings.warn(
                f"optimizer {trajectory.optimizer_class} has no update model in this library: the "
                "regularization part is reported as 0 and the kernel part carries the whole update "
                "(the decomposition is still complete)",
                UserWarning,
                stacklevel=2,
            )

    def _select_parameters(self, model: nn.Module, parameters: Any) -> None:
        chosen = resolve_parameters(model, parameters)
        self.parameters = [n for n in chosen if n in self.layout]
        if parameters is not None and not self.parameters:
            raise ValueError(f"parameters={parameters!r} selects no trainable parameter")
        self._subset: Optional[torch.Tensor] = None
        if parameters is not None and len(self.parameters) < len(self.layout):
            self._subset = self.layout.mask(self.parameters, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ basics
    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.options.device  # type: ignore[return-value]

    @property
    def num_steps(self) -> int:
        return self.trajectory.num_steps

    def theta(self, step: int) -> torch.Tensor:
        """Flat trainable parameters θ_step on the compute device, in the compute dtype."""
        params = self.trajectory.params(step, device=self.device, dtype=self.dtype)
        flat = self.layout.flatten(params)
        if not bool(torch.isfinite(flat).all()):
            self._raise_first_nonfinite(step)
        return flat

    def _raise_first_nonfinite(self, step: int) -> None:
        """Name the first step (≤ ``step``) and parameter that went NaN/inf: whichever θ a view reads
        first, the user needs to know where the run diverged, not where the analysis noticed it."""
        for s in range(step + 1):
            params = self.trajectory.params(s, device=self.device, dtype=self.dtype)
            bad = [n for n in self.layout.names if not bool(torch.isfinite(params[n]).all())]
            if bad:
                raise TrajectoryError(
                    f"trajectory {self.trajectory.path!r}: parameter {bad[0]!r} is NaN or infinite at step {s}; "
                    "the run diverged and cannot be explained past this point"
                )

    def prepare_inputs(self, inputs: Any, additional_forward_args: Any = None, what: str = "inputs",
                       check: bool = True) -> Batch:
        """Captum-style inputs as a :class:`~captum_explaind.epk.batch.Batch` on the compute device.

        numpy arrays are converted. With ``check`` (default) the inputs must be finite and the model
        is called on them at θ_0 and θ_N: a model error is raised as
        :class:`~captum_explaind.errors.InvalidInputError` naming ``what``, and non-finite outputs
        as :class:`~captum_explaind.errors.NonFiniteError` — before any integration.
        """
        batch = Batch.from_inputs(checks.as_tensors(inputs), checks.as_tensors(additional_forward_args),
                                  device=self.device, dtype=self.dtype, what=what)
        if check:
            checks.check_inputs_finite(batch, what)
            checks.probe_inputs(self, batch, what)
        return batch

    def output_shape(self, batch: Batch) -> torch.Size:
        """Shape of the explained output after the example axis (one forward pass at θ_0)."""
        return self.functional.forward(self.theta(0), batch.row(0)).shape[1:]

    @property
    def chunk_size(self) -> Optional[int]:
        """Test inputs per chunk: ``options.batch_size``, or the memory plan's (the smaller)."""
        size = self.options.batch_size
        if self._plan is not None:
            size = self._plan.batch_size if size is None else min(size, self._plan.batch_size)
        return size

    def chunks(self, batch: Batch) -> List[Chunk]:
        """The batch cut into chunks of :attr:`chunk_size` examples."""
        return [Chunk(off, b.n, b) for off, b in batch.chunks(self.chunk_size)]

    @property
    def train_grad_bytes(self) -> Optional[int]:
        """Bytes the training side may hold at once under ``max_memory`` (None: no budget)."""
        return None if self._plan is None else self._plan.train_bytes

    def train_chunk(self, explicit: Optional[int]) -> Optional[int]:
        """Training samples per per-sample-gradient call: the caller's, else the memory plan's."""
        if explicit is not None or self._plan is None:
            return explicit
        return self._plan.train_batch_size

    def _memory_plan(self, batch: Batch, view: SweepView) -> Optional[MemoryPlan]:
        """Batch sizes under ``options.max_memory`` for a sweep of ``view`` over ``batch`` (or None)."""
        o = self.options
        if o.max_memory is None or batch.n == 0:
            return None
        theta = self.theta(0)
        return plan(int(o.max_memory), n=batch.n, n_params=self.layout.total, dtype=self.dtype,
                    activations=activation_bytes(self.functional, theta, batch.row(0)),
                    view_fixed=view_bytes(view), per_input_vectors=int(getattr(view, "per_input_vectors", 2)),
                    gradient_payload=bool(getattr(view, "gradient_payload", True)),
                    max_evaluations=o.max_evaluations, refine=o.refine, nodes=min(o.nodes, RULE_NODES))

    def tolerance(self, c0: torch.Tensor, c1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row step tolerance and noise floor from the checked outputs at both ends of a step.

        The tolerance is ``atol + rtol · max_j |Δf_j|``; the noise floor is a few ulps of
        ``max_j |f_j|`` in the compute dtype, below which no error can be resolved.
        """
        change = (c1 - c0).abs().amax(dim=1)
        scale = torch.maximum(c0.abs().amax(dim=1), c1.abs().amax(dim=1))
        noise = 16.0 * torch.finfo(self.dtype).eps * scale
        return self.options.atol + self.options.rtol * change, noise

    def forward(self, step: int, inputs: Any, additional_forward_args: Any = None) -> torch.Tensor:
        """``f(θ_step; inputs)`` (the explained output) with the buffers in effect after ``step``."""
        batch = inputs if isinstance(inputs, Batch) else self.prepare_inputs(inputs, additional_forward_args,
                                                                             check=False)
        return self._forward_all(step, batch)

    def _forward_all(self, step: int, batch: Batch) -> torch.Tensor:
        memo, key = self._end_outputs, (step, id(batch))
        if memo is not None and key in memo:
            return memo[key][1]
        theta = self.theta(step)
        self.functional.set_fixed(self.trajectory.buffers(step, device=self.device, dtype=self.dtype))
        try:
            out = torch.cat([self.functional.forward(theta, ch.batch) for ch in self.chunks(batch)])
        finally:
            self.functional.set_fixed(self._initial_buffers)
        if memo is not None:
            memo[key] = (batch, out)  # the batch is held so that its id is not reused meanwhile
        return out

    # ------------------------------------------------------------------ the sweeps
    @property
    def _refine_rows(self) -> int:
        """Points per batched call while refining: a vjp integrand holds a parameter-sized
        gradient per point, so bound the batch by ~256 MiB of those (at least 8, at most 1024)."""
        if self._plan is not None:
            return self._plan.refine_rows
        per_row = self.layout.total * torch.finfo(self.dtype).bits // 8
        return max(8, min(1024, (256 * 2**20) // max(per_row, 1)))

    def _integrate(self, seg: Segment, chunks: List[Chunk], f0s: List[torch.Tensor], f1s: List[torch.Tensor],
                   view: SweepView, log: SweepLog) -> None:
        """Integrate one segment for every chunk of inputs (error control per input)."""
        o = self.options
        for ci, ch in enumerate(chunks):
            rows = torch.arange(ch.n, device=self.device)
            c0, c1 = view.check(f0s[ci], ch, rows), view.check(f1s[ci], ch, rows)
            checks.check_step_outputs(seg.step, ch.offset, c0, c1)
            view.step_change(seg.step, ch, c0, c1)
            tol, noise = self.tolerance(c0, c1)
            try:
                stats: StepStats = integrate_step(
                    view.integrand(seg, ch), c0, c1, rule=o.quadrature, nodes=o.nodes, tol=tol, noise=noise,
                    control=o.refine, max_depth=o.max_depth, max_rows=self._refine_rows,
                    max_points=self.options.max_evaluations,
                )
            except checks.IntegrandNonFinite as err:
                raise checks.integrand_error(err, seg.step, ch.offset) from None
            log.add(seg.step, ch, stats)

    def _bar(self, total: int, view: SweepView, desc: str, show_progress: Optional[bool]) -> tqdm:
        show = self.options.show_progress if show_progress is None else show_progress
        return tqdm(total=total, desc=f"{getattr(view, 'label', 'steps')}: {desc}", disable=not show)

    def _step_buffers(self, s: int) -> dict:
        return self.trajectory.buffers(s, device=self.device, dtype=self.dtype)

    @keeps_heap
    def sweep(
        self,
        batch: Batch,
        view: SweepView,
        *,
        steps: Optional[Iterable[int]] = None,
        integrate: Optional[Iterable[int]] = None,
        need_precond: bool = False,
        desc: str = "steps",
        show_progress: Optional[bool] = None,
    ) -> SweepStats:
        """Integrate every selected step for every input, in time order, handing each to ``view``.

        Args:
            batch (Batch): the inputs (:meth:`prepare_inputs`).
            view (SweepView): what to integrate and accumulate (see :mod:`.views`).
            steps (iterable of int, optional): steps to visit (1-based). Default: all
            integrate (iterable of int, optional): the visited steps whose path integral is
                computed; the others are only handed to ``end_step``. Default: all visited
            need_precond (bool): compute Adam's preconditioner for every step.
            desc (str): progress-bar label. show_progress (bool, optional): override the option.

        Returns:
            *SweepStats*
        """
        N = self.num_steps
        selected = list(range(1, N + 1)) if steps is None else sorted(set(int(s) for s in steps))
        for s in selected:
            if not 1 <= s <= N:
                raise TrajectoryError(f"step {s} is outside the trajectory (valid: 1..{N})")
        chosen = set(selected)
        todo = chosen if integrate is None else chosen & set(int(s) for s in integrate)
        all_todo = sorted(todo)
        self._check_every_step(view)
        self._plan = self._memory_plan(batch, view)
        sharded = sweep_split.shardable(self, batch, view, selected)
        if sharded and sweep_split.pairs_apply(self, view, need_precond):
            stats = sweep_split.pair_forward(self, batch, view, all_todo, need_precond, desc, show_progress)
            if stats is not None:
                return stats
        if sharded:
            selected, todo = sweep_split.shard_steps(view, selected, todo)
            chosen = set(selected)
        state = _ForwardState(self, batch, view, need_precond, all_todo)
        bar = self._bar(len(selected), view, desc, show_progress)
        try:
            for s in range(1, (selected[-1] if selected else 0) + 1):
                state.visit(s, s in chosen, s in todo, (s + 1) in chosen)
                if s in chosen:
                    bar.update(1)
        finally:
            bar.close()
            self.functional.set_fixed(self._initial_buffers)
            self._plan = None
        if sharded:
            sweep_split.reduce_view(view, state.log)
        return state.log.finish(self.options.max_depth, self.options.max_evaluations)

    @keeps_heap
    def sweep_reverse(
        self,
        batch: Batch,
        view: SweepView,
        *,
        last: Optional[int] = None,
        integrate: Optional[Iterable[int]] = None,
        need_precond: bool = True,
        desc: str = "steps",
        show_progress: Optional[bool] = None,
    ) -> SweepStats:
        """Visit steps ``last, last−1, …, 1`` (reverse time), integrating the requested ones.

        The reverse-time data view accumulates test-side quantities backwards, so that memory is
        ``n_inputs × P`` instead of one buffer per training sample. ``end_step(segment,
        integrated)`` is called for every visited step, and ``done(step)`` returning True stops
        the sweep early. Each step's record is read once.

        Args:
            batch (Batch): the inputs. view (SweepView): see :mod:`.views`.
            last (int, optional): first step visited (going down). Default: the last step
            integrate (iterable of int, optional): steps whose path integral is computed.
                Default: every visited step
            need_precond (bool): compute Adam's preconditioner ``D_s`` for every step.

        Returns:
            *SweepStats*
        """
        traj, fm = self.trajectory, self.functional
        self._check_every_step(view)
        N = traj.num_steps
        last = N if last is None else int(last)
        if not 1 <= last <= N:
            raise TrajectoryError(f"step {last} is outside the trajectory (valid: 1..{N})")
        todo = set(range(1, last + 1)) if integrate is None else set(int(s) for s in integrate)
        um = UpdateModel(traj, self.layout, device=self.device, dtype=self.dtype, need_precond=need_precond)
        # The coefficients carry forward-time state (first momentum step, Adam counts): compute
        # them in time order first; they are a few scalars per parameter tensor and step.
        records = [traj.record(s) for s in range(1, last + 1)]
        scalars = [um.scalars(rec) for rec in records]
        buffer_steps = set(traj.buffer_steps())
        self._plan = self._memory_plan(batch, view)
        sharded = sweep_split.shardable(self, batch, view, sorted(todo))
        # In a process group each rank takes either a contiguous block of the steps, all inputs
        # (a view that can carry its reverse-time state between blocks: ``shard_steps``), or a
        # contiguous block of the inputs: the accumulators are per input, so the blocks never
        # interact and the results add up. A view that also splits each step's training side
        # (``splits_training``) needs every rank at every step.
        top, bottom = last, 1
        steps_mode = sharded and hasattr(view, "shard_steps") and view.shard_steps(last)
        if steps_mode:
            mine = distributed.shard(range(1, last + 1))
            top, bottom = (mine[-1], mine[0]) if mine else (0, 1)
            if hasattr(view, "begin_block"):
                getattr(view, "begin_block")(list(mine), lambda s: um.beta(scalars[s - 1]))  # noqa: B009
        chunks = sweep_split.rank_chunks(self, batch) if sharded and not steps_mode else self.chunks(batch)
        if sharded and not steps_mode and hasattr(view, "shard_rows"):
            rows = distributed.shard(range(batch.n))
            view.shard_rows(range(rows[0], rows[-1] + 1) if rows else range(0, 0))
        log = SweepLog(sorted(todo), batch.n, self.dtype)
        if steps_mode and hasattr(view, "keep_received") and not buffer_steps:
            if distributed.store_available():
                sweep_split.pair_reverse(self, batch, view, last, sorted(todo), records, scalars, um, log,
                                         self._bar(last, view, desc, show_progress))
                return log.finish(self.options.max_depth, self.options.max_evaluations)
        if sharded and (top < bottom or not chunks) and (steps_mode or not getattr(view, "splits_training", False)):
            self._plan = None
            if steps_mode:
                getattr(view, "finish_shard")()  # noqa: B009 — a hook only views with shard_steps have
            sweep_split.reduce_view(view, log)
            return log.finish(self.options.max_depth, self.options.max_evaluations)
        theta_next = self.theta(top)
        f_next: List[Optional[torch.Tensor]] = [None] * len(chunks)
        bar = self._bar(last, view, desc, show_progress)
        try:
            for s in range(top, bottom - 1, -1):
                rec = records[s - 1]
                theta_prev = self.theta(s - 1)
                coeffs = self._polyline_regularization(s, um.vectors(scalars[s - 1], rec))
                seg = Segment(s, theta_prev, theta_next, theta_next - theta_prev, coeffs, rec)
                after: List[Optional[torch.Tensor]] = [None] * len(chunks)  # f(θ_s, b_s), from step s+1
                if buffer_steps:
                    # The segment runs with the buffers in effect before the step.
                    fm.set_fixed(self._step_buffers(s - 1))
                    if s in buffer_steps:
                        after, f_next = f_next, [None] * len(chunks)
                integrated = s in todo
                if integrated:
                    f0s = [fm.forward(theta_prev, ch.batch) for ch in chunks]
                    f1s = [f if f is not None else fm.forward(theta_next, ch.batch) for f, ch in zip(f_next, chunks)]
                    if s in buffer_steps:
                        self._buffer_jumps_after(s, theta_next, chunks, f1s, after, view)
                    self._integrate(seg, chunks, f0s, f1s, view, log)
                    f_next = list(f0s)
                else:
                    f_next = [None] * len(chunks)
                view.end_step(seg, integrated)
                bar.update(1)
                theta_next = theta_prev
                if not steps_mode and view.done(s):
                    break
        finally:
            bar.close()
            fm.set_fixed(self._initial_buffers)
            self._plan = None
        if steps_mode:  # the carries between the ranks' blocks, then the rest of the view's work
            getattr(view, "finish_shard")()  # noqa: B009 — a hook only views with shard_steps have
        if sharded:
            sweep_split.reduce_view(view, log)
        return log.finish(self.options.max_depth, self.options.max_evaluations)

    def _polyline_regularization(self, step: int, coeffs: Any) -> Any:
        """keep_every: a stored step is a macro-step, whose regularization part is the recorded sum
        over its optimizer steps (not the one-step model's, which would need the unstored θs)."""
        reg = self.trajectory.regularization(step, device=self.device, dtype=self.dtype)
        if reg is None:
            return coeffs
        flat = torch.zeros(self.layout.total, dtype=self.dtype, device=self.device)
        for name, r in reg.items():
            if name in self.layout:
                flat[self.layout.slice(name)] = r.reshape(-1)
        coeffs.reg = flat if reg else None
        return coeffs

    def _check_every_step(self, view: SweepView) -> None:
        """Views that replay the training samples step by step need every optimizer step."""
        k = self.trajectory.keep_every
        if k > 1 and getattr(view, "replays_training", False):
            label = getattr(view, "label", "view")
            hint = (" (or pass polyline=True: the data view then runs on the polyline through the kept checkpoints, "
                    "an approximation reported in its residual)") if label == "data view" else ""
            raise TrajectoryError(
                f"trajectory {self.trajectory.path!r} keeps every {k}-th checkpoint (keep_every={k}): the "
                f"{label} replays each optimizer step's training samples and needs every step; the "
                f"reconstruction, model and training views are exact on it (along the kept checkpoints){hint}"
            )

    def _buffer_jumps_after(self, s: int, theta: torch.Tensor, chunks: List[Chunk], before: List[torch.Tensor],
                            after: List[Optional[torch.Tensor]], view: SweepView) -> None:
        """Reverse sweeps: hand ``view`` the jump ``f(θ_s, b_s) − f(θ_s, b_{s−1})`` of the buffers that
        moved in step ``s`` (``before``: the outputs with ``b_{s−1}``, in effect on entry and exit;
        ``after``: those with ``b_s`` where already known)."""
        fm = self.functional
        if any(a is None for a in after):
            fm.set_fixed(self._step_buffers(s))
            after = [a if a is not None else fm.forward(theta, ch.batch) for a, ch in zip(after, chunks)]
            fm.set_fixed(self._step_buffers(s - 1))
        for ch, a, b in zip(chunks, after, before):
            assert a is not None  # filled above
            view.buffer_jump(s, ch, a - b)

    # ------------------------------------------------------------------ reconstruction
    def reconstruct(self, inputs: Any, additional_forward_args: Any = None) -> Reconstruction:
        r"""Rewrite ``f(θ_N; inputs)`` as a sum over the training run.

        Args:
            inputs (Tensor, tuple, Mapping or pytree): inputs with the example axis first; a
                Mapping (``BatchEncoding``) is passed to the model by keyword.
            additional_forward_args (optional): passed to the model after the inputs; tensors
                with dim 0 = examples are batched with them.

        Returns:
            *Reconstruction*: ``initial``, ``kernel``, ``regularization``, ``residual`` (zero
            here), ``buffers``, ``other``, ``final`` and ``delta``, each ``[n_inputs, *output]``,
            with the options used and the sweep statistics.
        """
        from .reconstruct_view import ReconstructView

        # The input probe computes f(θ_0) and f(θ_N) on every input: those are the two ends (a
        # split sweep's fixed cost on every rank, so computing them once is part of the speed-up).
        self._end_outputs = {}
        try:
            batch = self.prepare_inputs(inputs, additional_forward_args)
            initial = self._forward_all(0, batch)
            final = self._forward_all(self.num_steps, batch)
        finally:
            self._end_outputs = None
        view = ReconstructView(self, batch.n, initial.shape[1:])
        stats = self.sweep(batch, view, desc="reconstruct")
        return view.result(initial, final, stats)

    def tangents(self, seg: Segment) -> Tuple[torch.Tensor, List[str]]:
        """Stacked tangents [T, P] splitting Δ_s into kernel, regularization (and other) parts."""
        reg = seg.coeffs.reg
        kern = seg.delta if reg is None else seg.delta - reg
        names = ["kernel"]
        rows = [kern if self._subset is None else kern * self._subset]
        if reg is not None:
            rows.append(reg if self._subset is None else reg * self._subset)
            names.append("regularization")
        if self._subset is not None:
            rows.append(seg.delta * (1.0 - self._subset))
            names.append("other")
        return torch.stack(rows), names


class _ForwardState:
    """What a forward sweep carries from one step to the next (θ, outputs, optimizer state)."""

    def __init__(self, epk: ExactPathKernel, batch: Batch, view: SweepView, need_precond: bool,
                 todo: List[int]) -> None:
        self.epk, self.view = epk, view
        self.um = UpdateModel(epk.trajectory, epk.layout, device=epk.device, dtype=epk.dtype,
                              need_precond=need_precond)
        self.buffer_steps = set(epk.trajectory.buffer_steps())
        self.chunks = epk.chunks(batch)
        self.log = SweepLog(todo, batch.n, epk.dtype)
        self.theta_prev: Optional[torch.Tensor] = None
        self.f_prev: List[Optional[torch.Tensor]] = [None] * len(self.chunks)
        epk.functional.set_fixed(epk._initial_buffers)

    def _buffers_after(self, s: int) -> bool:
        if s in self.buffer_steps:
            self.epk.functional.set_fixed(self.epk._step_buffers(s))
            return True
        return False

    def visit(self, s: int, selected: bool, integrated: bool, next_selected: bool) -> None:
        """Advance over step ``s``: integrate it, only hand it to ``end_step``, or skip it."""
        epk, rec = self.epk, self.epk.trajectory.record(s)
        if not selected and not self.um.needs_history:
            # Not requested and no state to carry: only the step counters advance (no vectors:
            # a rank of a split sweep steps over every step before its block this way)
            self.um.scalars(rec)
            self.theta_prev = epk.theta(s) if next_selected else None
            self.f_prev = [None] * len(self.chunks)
            self._buffers_after(s)
            return
        if self.theta_prev is None:
            self.theta_prev = epk.theta(s - 1)
        theta = epk.theta(s)
        coeffs = epk._polyline_regularization(s, self.um.advance(rec, self.theta_prev))
        if not selected:
            self.f_prev = [None] * len(self.chunks)
            self._buffers_after(s)
        elif not integrated:
            self.f_prev = [None] * len(self.chunks)
            self._buffers_after(s)
            self.view.end_step(self._segment(s, theta, coeffs, rec), False)
        else:
            self._integrate(s, theta, coeffs, rec)
        self.theta_prev = theta

    def _segment(self, s: int, theta: torch.Tensor, coeffs: Any, rec: StepRecord) -> Segment:
        assert self.theta_prev is not None
        return Segment(s, self.theta_prev, theta, theta - self.theta_prev, coeffs, rec)

    def _integrate(self, s: int, theta: torch.Tensor, coeffs: Any, rec: StepRecord) -> None:
        fm, seg = self.epk.functional, self._segment(s, theta, coeffs, rec)
        f0s = [f if f is not None else fm.forward(seg.theta0, ch.batch) for f, ch in zip(self.f_prev, self.chunks)]
        f1s = [fm.forward(theta, ch.batch) for ch in self.chunks]
        self.epk._integrate(seg, self.chunks, f0s, f1s, self.view, self.log)
        if self._buffers_after(s):
            for ci, ch in enumerate(self.chunks):
                after = fm.forward(theta, ch.batch)
                self.view.buffer_jump(s, ch, after - f1s[ci])
                f1s[ci] = after
        self.f_prev = list(f1s)
        self.view.end_step(seg, True)
