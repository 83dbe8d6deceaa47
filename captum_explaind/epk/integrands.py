"""Integrands of one training step, for :func:`.integrator.integrate_step`.

* :class:`JvpIntegrand` — forward mode, ``J_f(θ(t)) v`` for a stack of tangents ``v`` (kernel
  part, regularization part, masked per layer, ...): all outputs, no Jacobian.
* :class:`SelectedJvpIntegrand` — the same, reduced to the selected target output.
* :class:`VjpIntegrand` — reverse mode, the per-example gradient of the selected target output,
  ``∇_θ f_target(θ(t); x)`` [m, P]: what per-parameter scores and the data view need.
* :class:`JacobianIntegrand` — the rows of the Jacobian for a few outputs per example
  [m, J, P] (one backward pass per output): the similarity view.

Each is evaluated either at one parameter point shared by all rows (a float ``t``) or at one point
per row (a tensor ``t``, used when refinement sends different inputs to different sub-intervals).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch

from .batch import Batch
from .functional import FunctionalModel, restrict_columns
from .kinks import capture_preactivations
from .segment import Chunk, Segment
from .target import Target

__all__ = ["JvpIntegrand", "SelectedJvpIntegrand", "VjpIntegrand", "JacobianIntegrand"]

Sink = Callable[[torch.Tensor, torch.Tensor], None]


def _forward(fm: FunctionalModel, seg: Segment, t: Union[float, torch.Tensor], b: Batch) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return fm.forward_on_segment(seg.theta0, seg.delta, t.to(seg.delta.dtype), b)
    return fm.forward(seg.point(t), b)


def _target_grads(fm: FunctionalModel, seg: Segment, t: Union[float, torch.Tensor], b: Batch,
                  target: Target, idx: torch.Tensor, project: Optional[torch.Tensor] = None,
                  columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-example gradients of the selected explained output [m, P] (``idx``: flat indices [m]),
    their projections ``grads @ project`` [m, K], or their entries at ``columns`` followed by
    ``grads @ Δ_s`` [m, |columns| + 1]."""
    def scalar(raw: Any, i: torch.Tensor) -> torch.Tensor:
        return target.scalar(fm.explain(raw, 1), i)

    if not isinstance(t, torch.Tensor) and (project is not None or columns is not None):
        # a shared point too: projections and column subsets are cheaper on the segment path,
        # which never forms a row's whole gradient (Fig. 3a at p = 113: most of a late step's
        # time was its base pass of whole per-row gradients)
        t = torch.full((b.n,), float(t), dtype=seg.delta.dtype, device=seg.delta.device)
    if isinstance(t, torch.Tensor):
        return fm.grads_on_segment(seg.theta0, seg.delta, t.to(seg.delta.dtype), b, scalar, idx, project=project,
                                   columns=columns)
    grads = fm.selected_grads(seg.point(t), b, scalar, idx)[0]
    if columns is not None:
        return restrict_columns(grads, columns, seg.delta)
    return grads if project is None else grads @ project


def _jvp(
    fm: FunctionalModel, seg: Segment, t: Union[float, torch.Tensor], tangents: torch.Tensor, b: Batch
) -> torch.Tensor:
    """``J v`` as [m, T, C] (outputs flattened)."""
    if isinstance(t, torch.Tensor):
        jv = fm.jvp_on_segment(seg.theta0, seg.delta, t.to(seg.delta.dtype), tangents, b)  # [m, T, ...]
        return jv.reshape(jv.shape[0], jv.shape[1], -1)
    _, jv = fm.jvp(seg.point(t), tangents, b)  # [T, m, ...]
    return jv.reshape(jv.shape[0], jv.shape[1], -1).transpose(0, 1)


class _Capturing:
    """Shared ``capture``: activation inputs at a shared point ``t`` (for kink splitting)."""

    fm: FunctionalModel
    seg: Segment
    chunk: Chunk

    def capture(self, t: float, rows: torch.Tensor) -> Optional[torch.Tensor]:
        b = self.chunk.take(rows)
        theta = self.seg.point(t)
        return capture_preactivations(lambda: self.fm.forward(theta, b), len(rows))


class JvpIntegrand(_Capturing):
    """``J_f(θ(t)) V`` for a stack of tangents V; payload [m, T, C], checked: all outputs."""

    def __init__(self, fm: FunctionalModel, seg: Segment, tangents: torch.Tensor, chunk: Chunk, sink: Sink) -> None:
        self.fm, self.seg, self.tangents, self.chunk, self.sink = fm, seg, tangents, chunk, sink

    def evaluate(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.chunk.take(rows)
        payload = _jvp(self.fm, self.seg, t, self.tangents, b)
        return payload, payload.sum(dim=1)

    def checked(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        b = self.chunk.take(rows)
        out = _forward(self.fm, self.seg, t, b)
        return out.reshape(out.shape[0], -1)

    def accumulate(self, rows: torch.Tensor, payload: torch.Tensor) -> None:
        self.sink(self.chunk.offset + rows, payload)


class SelectedJvpIntegrand(_Capturing):
    """Target-selected ``J_f(θ(t)) V``; the last tangent must be Δ_s itself (it drives the check).

    Payload [m, T] (one value per tangent), checked: the target output [m, 1].
    """

    def __init__(
        self, fm: FunctionalModel, seg: Segment, tangents: torch.Tensor, chunk: Chunk, target: Target, sink: Sink
    ) -> None:
        self.fm, self.seg, self.tangents, self.chunk, self.target, self.sink = fm, seg, tangents, chunk, target, sink

    def evaluate(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.chunk.take(rows)
        jv = _jvp(self.fm, self.seg, t, self.tangents, b)  # [m, T, C]
        g = self.chunk.offset + rows
        m, T, C = jv.shape
        sel = self.target.select(jv.transpose(0, 1).reshape(T * m, C), g.repeat(T)).reshape(T, m).transpose(0, 1)
        return sel, sel[:, -1:]

    def checked(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        b = self.chunk.take(rows)
        out = _forward(self.fm, self.seg, t, b)
        return self.target.select(out, self.chunk.offset + rows).unsqueeze(1)

    def accumulate(self, rows: torch.Tensor, payload: torch.Tensor) -> None:
        self.sink(self.chunk.offset + rows, payload)


class VjpIntegrand(_Capturing):
    """Per-example gradient of the target output; payload [m, P], checked: the target [m, 1].

    With ``project`` ([P, K], its last column Δ_s itself, which drives the check) the payload is
    ``grads @ project`` [m, K]: what per-group scores need, without holding, weighting and
    summing parameter-sized rows at every node of every refinement level.
    """

    def __init__(self, fm: FunctionalModel, seg: Segment, chunk: Chunk, target: Target, sink: Sink,
                 project: Optional[torch.Tensor] = None) -> None:
        self.fm, self.seg, self.chunk, self.target, self.sink = fm, seg, chunk, target, sink
        self.project = project

    def evaluate_rule(self, t: torch.Tensor, w: torch.Tensor, rows: torch.Tensor
                      ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """A rule at once: ``Σ_j w_rj ∇f(θ(t_rj))`` per row [m, P] and each node's checked total
        [m, K, 1] (``t``, ``w``: [m, K]); None where only node-by-node evaluation is available
        (projections, models off the shared-weight path)."""
        if self.project is not None:
            return None
        b = self.chunk.take(rows)
        idx = self.target.rows_index(self.chunk.offset + rows)

        def scalar(raw: Any, i: torch.Tensor) -> torch.Tensor:
            return self.target.scalar(self.fm.explain(raw, 1), i)

        out = self.fm.integrated_grads_on_segment(self.seg.theta0, self.seg.delta, t, w, b, scalar, idx)
        return None if out is None else (out[0], out[1].unsqueeze(2))

    def evaluate(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.chunk.take(rows)
        idx = self.target.rows_index(self.chunk.offset + rows)
        out = _target_grads(self.fm, self.seg, t, b, self.target, idx, self.project)
        if self.project is not None:
            return out, out[:, -1:]
        return out, (out @ self.seg.delta).unsqueeze(1)

    def checked(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        b = self.chunk.take(rows)
        out = _forward(self.fm, self.seg, t, b)
        return self.target.select(out, self.chunk.offset + rows).unsqueeze(1)

    def accumulate(self, rows: torch.Tensor, payload: torch.Tensor) -> None:
        self.sink(self.chunk.offset + rows, payload)


class JacobianIntegrand(_Capturing):
    """Jacobian rows of outputs ``outputs[row, j]``; payload [m, J, P], checked: those outputs [m, J].

    With ``columns`` (ascending indices into P) the payload holds only those Jacobian columns,
    [m, J, |columns|]: a similarity restricted to one layer never holds, weights or sums the
    rest, which at refinement levels of thousands of (input, interval) pairs is most of the work.
    The check still differentiates along the whole step (``grads @ Δ_s``).
    """

    def __init__(self, fm: FunctionalModel, seg: Segment, chunk: Chunk, outputs: torch.Tensor, sink: Sink,
                 columns: Optional[torch.Tensor] = None) -> None:
        self.fm, self.seg, self.chunk, self.outputs, self.sink = fm, seg, chunk, outputs, sink
        self.columns = columns

    def evaluate(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.chunk.take(rows)
        outs = self.outputs[(self.chunk.offset + rows).to(self.outputs.device)]  # [m, J]
        pick = Target(torch.zeros(0, dtype=torch.int64), 0)  # a flat index per row, given per call
        rows_j = [_target_grads(self.fm, self.seg, t, b, pick, outs[:, j], columns=self.columns)
                  for j in range(outs.shape[1])]
        payload = torch.stack(rows_j, dim=1)
        if self.columns is not None:  # the last column is the check, grads @ Δ_s
            return payload[..., :-1], payload[..., -1]
        return payload, payload @ self.seg.delta

    def checked(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        b = self.chunk.take(rows)
        out = _forward(self.fm, self.seg, t, b)
        outs = self.outputs[(self.chunk.offset + rows).to(self.outputs.device)]
        return out.reshape(out.shape[0], -1).gather(1, outs.to(out.device))

    def accumulate(self, rows: torch.Tensor, payload: torch.Tensor) -> None:
        self.sink(self.chunk.offset + rows, payload)
