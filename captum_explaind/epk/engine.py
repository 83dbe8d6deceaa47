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
with their own integrands.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TrajectoryError
from ..recording.trajectory import Trajectory
from .functional import FunctionalModel, as_tuple
from .integrands import JvpIntegrand
from .segment import Chunk, Segment, take_rows
from .integrator import StepIntegrand, StepStats, integrate_step
from .layout import ParamLayout
from .quadrature import RULES, quadrature_rule
from .results import Reconstruction
from .selection import Selector, resolve_parameters
from .updates import UpdateModel

__all__ = ["ExactPathKernel", "Segment", "Chunk", "SweepStats"]


@dataclass
class SweepStats:
    """What a sweep measured: per-step errors [n_steps, n_inputs] and work done."""

    steps: List[int]
    step_error: torch.Tensor
    evaluations: int
    unconverged: int
    max_depth: int


class _SweepLog:
    """Collects per-step errors and work counters of a sweep."""

    def __init__(self, steps: List[int], n: int, dtype: torch.dtype) -> None:
        self.steps = steps
        self.errors = {s: torch.zeros(n, dtype=dtype) for s in steps}
        self.evaluations = self.unconverged = self.depth = 0

    def add(self, step: int, chunk: Chunk, stats: StepStats) -> None:
        self.errors[step][chunk.offset : chunk.offset + chunk.n] = stats.error.detach().cpu()
        self.evaluations += stats.evaluations
        self.unconverged += stats.unconverged
        self.depth = max(self.depth, stats.depth)

    def finish(self, max_depth: int) -> SweepStats:
        n = next(iter(self.errors.values())).shape[0] if self.errors else 0
        err = torch.stack([self.errors[s] for s in self.steps]) if self.steps else torch.zeros(0, n)
        if self.unconverged:
            warnings.warn(
                f"{self.unconverged} (step, input) pair(s) did not reach the tolerance within max_depth="
                f"{max_depth} refinements (largest step error {float(err.max()):.3g}); the remaining "
                "error is in the convergence delta",
                RuntimeWarning,
                stacklevel=4,
            )
        return SweepStats(self.steps, err, self.evaluations, self.unconverged, self.depth)


class ExactPathKernel:
    r"""Exact path kernel of a recorded training run (the core every view builds on).

    Args:
        model (nn.Module): any instance of the trained architecture (Captum's ``forward_func``
            convention). Its current weights are not used — the trajectory supplies them — and it
            is never modified (a copy is evaluated in eval mode).
        trajectory (Trajectory or path): the recorded run, or its directory.
        quadrature (str, optional): ``"gauss"`` (Gauss–Legendre), ``"midpoint"`` (the reference
            implementation's rule) or ``"left"`` (left endpoint; ``nodes=1`` is the gradient at
            θ_{s−1}, as TracIn uses). Default: "gauss"
        nodes (int, optional): nodes of the rule on each (sub-)interval. Default: 4
        error_control (bool, optional): refine steps whose integrated total misses the exact
            change by more than the tolerance. ``None``: on for ``"gauss"``, off for the other
            rules (so they reproduce their fixed-grid results). Default: None
        rtol (float, optional): per-step tolerance relative to the step's change of the output,
            ``max_j |f_j(θ_s) − f_j(θ_{s−1})|``. Default: 1e-10
        atol (float, optional): absolute per-step tolerance added to it. A floor of a few ulps of
            ``|f|`` is always added, since no computation in ``dtype`` can do better. Default: 0
        max_depth (int, optional): maximum refinement levels of one step. Smooth models need 0–2;
            a step crossing ReLU kinks usually converges in a few levels, since splits are placed
            at the estimated kink. Default: 40
        dtype (torch.dtype, optional): precision of the computation; ``torch.float64`` on a
            float32 trajectory gives an exact identity for the recorded path. ``None``: the
            trajectory's dtype. Default: None
        device (torch.device or str, optional): where to compute; ``None``: the model's device.
        batch_size (int, optional): inputs per chunk (memory control). ``None``: all at once.
        parameters (optional): parameter names, modules, globs (see :mod:`.selection`) whose
            contributions are resolved; the rest of the path integral is reported as ``other``.
            ``None``: every trainable parameter. Default: None
        show_progress (bool, optional): tqdm progress over steps. Default: False

    Cost: per step, ``nodes`` forward-mode passes over the inputs (each carrying 2 tangents:
    kernel and regularization) plus one forward pass, plus ``nodes + 1`` passes on the inputs and
    sub-intervals that need refining. Memory: a few parameter vectors and the inputs' outputs.

    Examples::

        >>> epk = ExactPathKernel(model, trajectory, dtype=torch.float64)
        >>> parts = epk.reconstruct(x_test)
        >>> parts.final - (parts.initial + parts.kernel + parts.regularization)  # ≈ parts.delta
    """

    def __init__(
        self,
        model: nn.Module,
        trajectory: Union[Trajectory, str, os.PathLike],
        *,
        quadrature: str = "gauss",
        nodes: int = 4,
        error_control: Optional[bool] = None,
        rtol: float = 1e-10,
        atol: float = 0.0,
        max_depth: int = 40,
        dtype: Optional[torch.dtype] = None,
        device: Union[torch.device, str, None] = None,
        batch_size: Optional[int] = None,
        parameters: Union[Selector, Sequence[Selector], None] = None,
        show_progress: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(trajectory, Trajectory):
            trajectory = Trajectory.open(trajectory)
        trajectory.validate(model)
        if quadrature not in RULES:
            raise ValueError(f"unknown quadrature {quadrature!r}; choose one of {RULES}")
        quadrature_rule(quadrature, nodes)  # validates nodes
        if rtol < 0 or atol < 0:
            raise ValueError("rtol and atol must be non-negative")
        if not isinstance(max_depth, int) or max_depth < 0:
            raise ValueError(f"max_depth must be a non-negative int, got {max_depth!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if trajectory.num_steps == 0:
            raise TrajectoryError(f"trajectory {trajectory.path!r} holds no steps")

        self.model = model
        self.trajectory = trajectory
        self.quadrature = quadrature
        self.nodes = int(nodes)
        self.error_control = (quadrature == "gauss") if error_control is None else bool(error_control)
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.max_depth = max_depth
        self.batch_size = batch_size
        self.show_progress = show_progress

        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        if dtype is None:
            dtype = trajectory.spec[trajectory.trainable[0]].dtype
        self.dtype = dtype

        self.layout = ParamLayout(trajectory.trainable, [trajectory.spec[n].shape for n in trajectory.trainable])
        chosen = resolve_parameters(model, parameters)
        self.parameters = [n for n in chosen if n in self.layout]
        if parameters is not None and not self.parameters:
            raise ValueError(f"parameters={parameters!r} selects no trainable parameter")
        self._subset = None
        if parameters is not None and len(self.parameters) < len(self.layout):
            self._subset = self.layout.mask(self.parameters, dtype=self.dtype, device=self.device)

        fixed = trajectory.frozen_params(device=self.device, dtype=self.dtype)
        self._initial_buffers = trajectory.buffers(0, device=self.device, dtype=self.dtype)
        fixed.update(self._initial_buffers)
        self.functional = FunctionalModel(model, self.layout, fixed, device=self.device, dtype=self.dtype)
        if trajectory.family == "other":
            warnings.warn(
                f"optimizer {trajectory.optimizer_class} has no update model in this library: the "
                "regularization part is reported as 0 and the kernel part carries the whole update "
                "(the decomposition is still complete)",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ basics
    @property
    def num_steps(self) -> int:
        return self.trajectory.num_steps

    def theta(self, step: int) -> torch.Tensor:
        """Flat trainable parameters θ_step on the compute device, in the compute dtype."""
        params = self.trajectory.params(step, device=self.device, dtype=self.dtype)
        flat = self.layout.flatten(params)
        if not bool(torch.isfinite(flat).all()):
            bad = next(n for n in self.layout.names if not bool(torch.isfinite(params[n]).all()))
            raise TrajectoryError(
                f"trajectory {self.trajectory.path!r}: parameter {bad!r} is NaN or infinite at step {step}; "
                "the run diverged and cannot be explained past this point"
            )
        return flat

    def prepare_inputs(self, inputs: Any, additional_forward_args: Any = None) -> Tuple[Tuple[Any, ...], Tuple[Any, ...], int]:
        """Inputs and extra forward arguments as tuples on the compute device, plus ``n``."""
        x = as_tuple(inputs)
        if not x:
            raise ValueError("inputs must be a tensor or a non-empty tuple of tensors")
        x = self.functional.prepare(x)
        a = self.functional.prepare(as_tuple(additional_forward_args))
        n = None
        for v in x:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                n = int(v.shape[0])
                break
        if n is None or n == 0:
            raise ValueError("inputs must hold at least one example (a tensor with dim 0 = examples)")
        for v in x:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] != n:
                raise ValueError(f"all input tensors must have the same number of examples ({n}), got {v.shape[0]}")
        return x, a, n

    def chunks(self, inputs: Tuple[Any, ...], args: Tuple[Any, ...], n: int) -> List[Chunk]:
        size = n if self.batch_size is None else self.batch_size
        out = []
        for start in range(0, n, size):
            rows = torch.arange(start, min(n, start + size))
            out.append(Chunk(start, len(rows), take_rows(inputs, rows, n), take_rows(args, rows, n)))
        return out

    def tolerance(self, c0: torch.Tensor, c1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row step tolerance and noise floor from the checked outputs at both ends of a step.

        The tolerance is ``atol + rtol · max_j |Δf_j|``; the noise floor is a few ulps of
        ``max_j |f_j|`` in the compute dtype, below which no error can be resolved.
        """
        change = (c1 - c0).abs().amax(dim=1)
        scale = torch.maximum(c0.abs().amax(dim=1), c1.abs().amax(dim=1))
        noise = 16.0 * torch.finfo(self.dtype).eps * scale
        return self.atol + self.rtol * change, noise

    def forward(self, step: int, inputs: Any, additional_forward_args: Any = None) -> torch.Tensor:
        """``f(θ_step; inputs)`` with the buffers in effect after ``step``."""
        x, a, _ = self.prepare_inputs(inputs, additional_forward_args)
        theta = self.theta(step)
        saved = dict(self._initial_buffers)
        self.functional.set_fixed(self.trajectory.buffers(step, device=self.device, dtype=self.dtype))
        try:
            return self.functional.forward(theta, x, a)
        finally:
            self.functional.set_fixed(saved)

    # ------------------------------------------------------------------ the sweeps
    @property
    def _refine_rows(self) -> int:
        """Points per batched call while refining: a vjp integrand holds a parameter-sized
        gradient per point, so bound the batch by ~256 MiB of those (at least 8, at most 1024)."""
        per_row = self.layout.total * torch.finfo(self.dtype).bits // 8
        return max(8, min(1024, (256 * 2**20) // max(per_row, 1)))

    def _integrate(self, seg: Segment, chunks: List[Chunk], f0s: List[torch.Tensor], f1s: List[torch.Tensor],
                   view: Any, log: "_SweepLog") -> None:
        """Integrate one segment for every chunk of inputs (error control per input)."""
        for ci, ch in enumerate(chunks):
            rows = torch.arange(ch.n, device=self.device)
            c0, c1 = view.check(f0s[ci], ch, rows), view.check(f1s[ci], ch, rows)
            if hasattr(view, "step_change"):
                view.step_change(seg.step, ch, c0, c1)
            tol, noise = self.tolerance(c0, c1)
            stats: StepStats = integrate_step(
                view.integrand(seg, ch),
                c0,
                c1,
                rule=self.quadrature,
                nodes=self.nodes,
                tol=tol,
                noise=noise,
                control=self.error_control,
                max_depth=self.max_depth,
                max_rows=self._refine_rows,
            )
            log.add(seg.step, ch, stats)

    def sweep(
        self,
        inputs: Tuple[Any, ...],
        args: Tuple[Any, ...],
        n: int,
        view: Any,
        *,
        steps: Optional[Iterable[int]] = None,
        integrate: Optional[Iterable[int]] = None,
        need_precond: bool = False,
        desc: str = "steps",
    ) -> SweepStats:
        """Integrate every selected step for every input, in time order, handing each to ``view``.

        ``view`` provides ``check(out, chunk, rows) -> [m, C]`` (the outputs whose exact change
        drives error control), ``integrand(segment, chunk) -> StepIntegrand`` and optionally
        ``step_change(step, chunk, c0, c1)`` (checked outputs at both ends of the step),
        ``end_step(segment, integrated)`` and ``buffer_jump(step, chunk, jump)``.

        Args:
            inputs, args, n: as returned by :meth:`prepare_inputs`.
            steps (iterable of int, optional): steps to visit (1-based). Default: all
            integrate (iterable of int, optional): the visited steps whose path integral is
                computed; the others are only handed to ``end_step``. Default: all visited
            need_precond (bool): compute Adam's preconditioner for every step.

        Returns:
            *SweepStats*
        """
        traj = self.trajectory
        N = traj.num_steps
        selected = list(range(1, N + 1)) if steps is None else sorted(set(int(s) for s in steps))
        for s in selected:
            if not 1 <= s <= N:
                raise TrajectoryError(f"step {s} is outside the trajectory (valid: 1..{N})")
        chosen = set(selected)
        todo = chosen if integrate is None else chosen & set(int(s) for s in integrate)
        last = selected[-1] if selected else 0
        um = UpdateModel(traj, self.layout, device=self.device, dtype=self.dtype, need_precond=need_precond)
        buffer_steps = set(traj.buffer_steps())
        chunks = self.chunks(inputs, args, n)
        fm = self.functional
        fm.set_fixed(self._initial_buffers)
        log = _SweepLog(sorted(todo), n, self.dtype)
        theta_prev: Optional[torch.Tensor] = None
        f_prev: List[Optional[torch.Tensor]] = [None] * len(chunks)
        bar = tqdm(total=len(selected), desc=f"{type(view).__name__.strip('_')}: {desc}", disable=not self.show_progress)
        try:
            for s in range(1, last + 1):
                rec = traj.record(s)
                sel = s in chosen
                if not sel and not um.needs_history:
                    # Not requested and no state to carry: only the step counters advance.
                    um.advance(rec, None)
                    theta_prev = self.theta(s) if (s + 1) in chosen else None
                    f_prev = [None] * len(chunks)
                    if s in buffer_steps:
                        fm.set_fixed(traj.buffers(s, device=self.device, dtype=self.dtype))
                    continue
                if theta_prev is None:
                    theta_prev = self.theta(s - 1)
                theta = self.theta(s)
                coeffs = um.advance(rec, theta_prev)
                if sel and s not in todo:
                    seg = Segment(s, theta_prev, theta, theta - theta_prev, coeffs, rec)
                    f_prev = [None] * len(chunks)
                    if s in buffer_steps:
                        fm.set_fixed(traj.buffers(s, device=self.device, dtype=self.dtype))
                    view.end_step(seg, False)
                    bar.update(1)
                elif sel:
                    seg = Segment(s, theta_prev, theta, theta - theta_prev, coeffs, rec)
                    f0s = [f if f is not None else fm.forward(theta_prev, ch.inputs, ch.args) for f, ch in zip(f_prev, chunks)]
                    f1s = [fm.forward(theta, ch.inputs, ch.args) for ch in chunks]
                    self._integrate(seg, chunks, f0s, f1s, view, log)
                    if s in buffer_steps:
                        fm.set_fixed(traj.buffers(s, device=self.device, dtype=self.dtype))
                        for ci, ch in enumerate(chunks):
                            after = fm.forward(theta, ch.inputs, ch.args)
                            if hasattr(view, "buffer_jump"):
                                view.buffer_jump(s, ch, after - f1s[ci])
                            f1s[ci] = after
                    f_prev = list(f1s)
                    if hasattr(view, "end_step"):
                        view.end_step(seg, True)
                    bar.update(1)
                else:
                    f_prev = [None] * len(chunks)
                    if s in buffer_steps:
                        fm.set_fixed(traj.buffers(s, device=self.device, dtype=self.dtype))
                theta_prev = theta
        finally:
            bar.close()
            fm.set_fixed(self._initial_buffers)
        return log.finish(self.max_depth)

    def sweep_reverse(
        self,
        inputs: Tuple[Any, ...],
        args: Tuple[Any, ...],
        n: int,
        view: Any,
        *,
        last: Optional[int] = None,
        integrate: Optional[Iterable[int]] = None,
        need_precond: bool = True,
        desc: str = "steps",
    ) -> SweepStats:
        """Visit steps ``last, last−1, …, 1`` (reverse time), integrating the requested ones.

        The reverse-time data view accumulates test-side quantities backwards, so that memory is
        ``n_inputs × P`` instead of one buffer per training sample. ``view`` has the protocol of
        :meth:`sweep`; ``end_step(segment, integrated)`` is called for every visited step (with
        ``integrated`` False when the step was only visited), and an optional ``done(step)``
        returning True stops the sweep early (nothing earlier can contribute any more).

        Args:
            last (int, optional): first step visited (going down). Default: the last step
            integrate (iterable of int, optional): steps whose path integral is computed.
                Default: every visited step
            need_precond (bool): compute Adam's preconditioner ``D_s`` for every step.

        Returns:
            *SweepStats*
        """
        traj = self.trajectory
        N = traj.num_steps
        last = N if last is None else int(last)
        if not 1 <= last <= N:
            raise TrajectoryError(f"step {last} is outside the trajectory (valid: 1..{N})")
        todo = set(range(1, last + 1)) if integrate is None else set(int(s) for s in integrate)
        um = UpdateModel(traj, self.layout, device=self.device, dtype=self.dtype, need_precond=need_precond)
        # The coefficients carry forward-time state (first momentum step, Adam counts): compute
        # them in time order first; they are a few scalars per parameter tensor and step.
        scalars = [um.scalars(traj.record(s)) for s in range(1, last + 1)]
        buffer_steps = set(traj.buffer_steps())
        chunks = self.chunks(inputs, args, n)
        fm = self.functional
        log = _SweepLog(sorted(todo), n, self.dtype)
        theta_next = self.theta(last)
        f_next: List[Optional[torch.Tensor]] = [None] * len(chunks)
        bar = tqdm(total=last, desc=f"{type(view).__name__.strip('_')}: {desc}", disable=not self.show_progress)
        try:
            for s in range(last, 0, -1):
                rec = traj.record(s)
                theta_prev = self.theta(s - 1)
                coeffs = um.vectors(scalars[s - 1], rec)
                seg = Segment(s, theta_prev, theta_next, theta_next - theta_prev, coeffs, rec)
                if buffer_steps:
                    # The segment runs with the buffers in effect before the step.
                    fm.set_fixed(traj.buffers(s - 1, device=self.device, dtype=self.dtype))
                    if s in buffer_steps:
                        f_next = [None] * len(chunks)
                integrated = s in todo
                if integrated:
                    f0s = [fm.forward(theta_prev, ch.inputs, ch.args) for ch in chunks]
                    f1s = [f if f is not None else fm.forward(theta_next, ch.inputs, ch.args) for f, ch in zip(f_next, chunks)]
                    self._integrate(seg, chunks, f0s, f1s, view, log)
                    f_next = list(f0s)
                else:
                    f_next = [None] * len(chunks)
                view.end_step(seg, integrated)
                bar.update(1)
                theta_next = theta_prev
                if hasattr(view, "done") and view.done(s):
                    break
        finally:
            bar.close()
            fm.set_fixed(self._initial_buffers)
        return log.finish(self.max_depth)

    # ------------------------------------------------------------------ reconstruction
    def reconstruct(self, inputs: Any, additional_forward_args: Any = None) -> Reconstruction:
        r"""Rewrite ``f(θ_N; inputs)`` as a sum over the training run.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): inputs with dim 0 = examples, as for Captum.
            additional_forward_args (optional): passed to the model after the inputs; tensors
                with dim 0 = examples are batched with them.

        Returns:
            *Reconstruction*: ``initial``, ``kernel``, ``regularization``, ``residual`` (zero
            here), ``buffers``, ``other``, ``final`` and ``delta``, each ``[n_inputs, *output]``.
        """
        x, a, n = self.prepare_inputs(inputs, additional_forward_args)
        initial = self._forward_all(0, x, a, n)
        view = _ReconstructView(self, n, initial.shape[1:])
        stats = self.sweep(x, a, n, view, desc="reconstruct")
        final = self._forward_all(self.num_steps, x, a, n)
        shape = initial.shape
        kernel = view.parts[:, 0].reshape(shape)
        reg = view.parts[:, 1].reshape(shape)
        other = view.parts[:, 2].reshape(shape)
        residual = torch.zeros_like(initial)
        buffers = view.buffers.reshape(shape)
        delta = final - initial - kernel - reg - residual - buffers - other
        return Reconstruction(
            initial=initial,
            kernel=kernel,
            regularization=reg,
            residual=residual,
            buffers=buffers,
            other=other,
            final=final,
            delta=delta,
            step_error=stats.step_error,
            evaluations=stats.evaluations,
            unconverged=stats.unconverged,
        )

    def _forward_all(self, step: int, x: Tuple[Any, ...], a: Tuple[Any, ...], n: int) -> torch.Tensor:
        theta = self.theta(step)
        self.functional.set_fixed(self.trajectory.buffers(step, device=self.device, dtype=self.dtype))
        try:
            outs = [self.functional.forward(theta, ch.inputs, ch.args) for ch in self.chunks(x, a, n)]
        finally:
            self.functional.set_fixed(self._initial_buffers)
        return torch.cat(outs)

    def tangents(self, seg: Segment) -> Tuple[torch.Tensor, List[str]]:
        """Stacked tangents [T, P] splitting Δ_s into kernel, regularization (and other) parts."""
        reg = seg.coeffs.reg
        kern = seg.delta if reg is None else seg.delta - reg
        names = ["kernel"]
        rows = [kern]
        if self._subset is not None:
            rows = [kern * self._subset]
        if reg is not None:
            rows.append(reg if self._subset is None else reg * self._subset)
            names.append("regularization")
        if self._subset is not None:
            rows.append(seg.delta * (1.0 - self._subset))
            names.append("other")
        return torch.stack(rows), names


class _ReconstructView:
    def __init__(self, epk: ExactPathKernel, n: int, out_shape: torch.Size) -> None:
        self.epk = epk
        c = 1
        for d in out_shape:
            c *= d
        self.parts = torch.zeros(n, 3, c, dtype=epk.dtype, device=epk.device)
        self.buffers = torch.zeros(n, c, dtype=epk.dtype, device=epk.device)

    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        return out.reshape(out.shape[0], -1)

    def integrand(self, seg: Segment, chunk: Chunk) -> StepIntegrand:
        tangents, names = self.epk.tangents(seg)
        slots = torch.tensor([{"kernel": 0, "regularization": 1, "other": 2}[k] for k in names], device=self.parts.device)

        def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
            block = torch.zeros(payload.shape[0], 3, payload.shape[2], dtype=payload.dtype, device=payload.device)
            block.index_copy_(1, slots, payload)
            self.parts.index_add_(0, rows, block)

        return JvpIntegrand(self.epk.functional, seg, tangents, chunk, sink)

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None:
        self.buffers[chunk.offset : chunk.offset + chunk.n] += jump.reshape(jump.shape[0], -1)
