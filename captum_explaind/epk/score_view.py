r"""Shared engine of the model view (per parameter / layer) and the training view (per step).

Per step s and input x, the target output's change splits exactly over parameters p and update
parts c ∈ {kernel, regularization}:

.. math:: f_j(θ_s) - f_j(θ_{s-1}) = \sum_p Φ_s(x)_{j,p} \, (Δ_s − R_s)_p + \sum_p Φ_s(x)_{j,p} (R_s)_p .

:class:`ScoreView` integrates these contributions and reduces them *as soon as a step is done* to
the granularity the caller asked for — windows of steps × (parameter elements | groups) ×
parts — so steps × parameters × inputs is never materialised unless that is the request.

Two ways to get there (``method``):

* ``"vjp"`` — per-example gradients of the target, integrated along the segment ([n, P] per
  step), then multiplied element-wise with Δ_s − R_s and R_s. Cost per step: ``nodes``
  batched backward passes, independent of the number of groups. Needed for per-element scores.
* ``"jvp"`` — forward mode with one masked tangent per (group, part), plus Δ_s itself for the
  error check. Cost per step: ``nodes`` forward passes carrying ``G·C + 1`` tangents. Cheaper for
  a handful of groups; never builds a per-example gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Union, cast

import torch

from .batch import Batch
from .integrands import SelectedJvpIntegrand, VjpIntegrand
from .results import ScoreResult, SweepStats
from .segment import Chunk, Segment
from .target import Target
from .views import ViewBase

if TYPE_CHECKING:
    from .engine import ExactPathKernel

__all__ = ["ScoreView", "COMPONENTS", "choose_method"]

COMPONENTS = ("kernel", "regularization", "total")


def choose_method(method: str, n_groups: Optional[int], n_components: int) -> str:
    """``"auto"`` picks forward mode when it needs only a few tangents."""
    if method not in ("auto", "jvp", "vjp"):
        raise ValueError(f"method must be 'auto', 'jvp' or 'vjp', got {method!r}")
    if n_groups is None:
        if method == "jvp":
            raise ValueError("per-parameter scores need method='vjp' (or 'auto')")
        return "vjp"
    if method != "auto":
        return method
    return "jvp" if n_groups * n_components + 1 <= 4 else "vjp"


class ScoreView(ViewBase):
    """Accumulates target-selected contributions per (input, window, element-or-group, part).

    Args:
        epk (ExactPathKernel): the core (options, model, trajectory).
        n (int): number of inputs.
        target (Target): resolved target selection.
        windows (list[range]): windows of application steps; each gets one result slot.
        components (sequence of str): parts to report, from :data:`COMPONENTS`.
        groups (OrderedDict[str, list[str]] or None): parameter groups; ``None`` = per element.
        method (str): ``"vjp"`` or ``"jvp"`` (already chosen).
    """

    shard_sum = ("acc", "exact", "buffers")

    @property
    def gradient_payload(self) -> bool:
        """Memory model: the vjp path's integrand rows are gradients."""
        return self.method == "vjp"

    def __init__(
        self,
        epk: "ExactPathKernel",
        n: int,
        target: Target,
        windows: List[range],
        components: Sequence[str],
        groups: Optional["OrderedDict[str, List[str]]"],
        method: str,
    ) -> None:
        self.epk = epk
        self.n = n
        self.target = target
        self.windows = windows
        self.components = list(components)
        self.groups = groups
        self.method = method
        dev, dt = epk.device, epk.dtype
        self.step_window: Dict[int, int] = {}
        for w, r in enumerate(windows):
            for s in r:
                if s in self.step_window:
                    raise ValueError(f"step windows overlap at step {s}")
                self.step_window[s] = w
        W, C = len(windows), len(self.components)
        P = epk.layout.total
        self.masks: Optional[torch.Tensor]  # [G, P]; None = per element (then the method is "vjp")
        if groups is None:
            self.acc = torch.zeros(n, W, C, P, dtype=dt, device=dev)
            self.masks = None
        else:
            self.masks = torch.stack(
                [
                    epk.layout.mask([p for p in names if p in epk.layout], dtype=dt, device=dev)
                    for names in groups.values()
                ]
            )  # [G, P]
            self.acc = torch.zeros(n, W, C, len(groups), dtype=dt, device=dev)
        self.exact = torch.zeros(n, W, dtype=dt, device=dev)
        self.buffers = torch.zeros(n, W, dtype=dt, device=dev)  # jumps of buffers moved after the steps
        self._u: Optional[torch.Tensor] = None  # integrated target gradient of the current step
        self._u_step = self._scores_step = -1
        self._step_scores: Optional[torch.Tensor] = None  # jvp path: [n, C*G] of the current step

    @property
    def steps(self) -> List[int]:
        return sorted(self.step_window)

    # ------------------------------------------------------------------ sweep protocol
    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        return self.target.select(out, chunk.offset + rows).unsqueeze(1)

    def step_change(self, step: int, chunk: Chunk, c0: torch.Tensor, c1: torch.Tensor) -> None:
        w = self.step_window[step]
        self.exact[chunk.offset : chunk.offset + chunk.n, w] += (c1 - c0)[:, 0]

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None:
        rows = torch.arange(chunk.n, device=jump.device)
        w = self.step_window[step]
        self.buffers[chunk.offset : chunk.offset + chunk.n, w] += self.target.select(jump, chunk.offset + rows)

    def _parts(self, seg: Segment) -> Dict[str, Optional[torch.Tensor]]:
        reg = seg.coeffs.reg
        return {
            "kernel": seg.delta if reg is None else seg.delta - reg,
            "regularization": reg,
            "total": seg.delta,
        }

    def _group_tangents(self, seg: Segment) -> torch.Tensor:
        """One row per (part, group) — the part of Δ_s restricted to the group — then Δ_s itself."""
        parts = self._parts(seg)
        masks = self.masks
        assert masks is not None  # per-group scores only
        rows_t = []
        for comp in self.components:
            part = parts[comp]
            for g in range(masks.shape[0]):
                rows_t.append(torch.zeros_like(seg.delta) if part is None else part * masks[g])
        rows_t.append(seg.delta)  # drives the error check
        return torch.stack(rows_t)

    def _step_sink(self, seg: Segment, k: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """A sink adding each row's first ``k`` payload columns to this step's per-group scores."""
        if self._step_scores is None or self._scores_step != seg.step:
            self._step_scores = torch.zeros(self.n, k, dtype=self.epk.dtype, device=self.epk.device)
            self._scores_step = seg.step

        def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
            scores = self._step_scores
            assert scores is not None  # set above for this step; end_step() clears it
            scores.index_add_(0, rows, payload[:, :k])

        return sink

    def integrand(self, seg: Segment, chunk: Chunk) -> Union[VjpIntegrand, SelectedJvpIntegrand]:
        fm = self.epk.functional
        if self.method == "vjp" and self.masks is not None:
            # Per-group scores by reverse mode: project each row's gradient on the (part, group)
            # tangents as it is computed, so refinement carries [rows, G·C + 1], not [rows, P].
            tangents = self._group_tangents(seg)
            return VjpIntegrand(fm, seg, chunk, self.target, self._step_sink(seg, tangents.shape[0] - 1),
                                project=tangents.T.contiguous())
        if self.method == "vjp":
            if self._u is None or self._u_step != seg.step:
                self._u = torch.zeros(self.n, self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)
                self._u_step = seg.step

            def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
                u = self._u
                assert u is not None  # set above for this step; end_step() clears it
                u.index_add_(0, rows, payload)

            return VjpIntegrand(fm, seg, chunk, self.target, sink)

        assert self.masks is not None  # choose_method: "jvp" only with parameter groups
        tangents = self._group_tangents(seg)
        return SelectedJvpIntegrand(fm, seg, tangents, chunk, self.target, self._step_sink(seg, tangents.shape[0] - 1))

    def end_step(self, seg: Segment, integrated: bool = True) -> None:
        w = self.step_window[seg.step]
        C = len(self.components)
        if self.method == "vjp" and self.masks is None:
            u = self._u
            assert u is not None  # integrand() created it for this step
            parts = self._parts(seg)
            for c, comp in enumerate(self.components):
                part = parts[comp]
                if part is not None:
                    self.acc[:, w, c] += u * part
            self._u = None
        else:
            masks, step_scores = self.masks, self._step_scores
            assert masks is not None and step_scores is not None  # groups given; integrand() ran this step
            G = masks.shape[0]
            self.acc[:, w] += step_scores.reshape(self.n, C, G)
            self._step_scores = None

    def result(self, stats: SweepStats) -> ScoreResult:
        """The scores with their axes, the exact changes and the delta per window."""
        scores = {c: self.acc[:, :, i] for i, c in enumerate(self.components)}
        if "total" in scores:
            explained = scores["total"].sum(-1)
        else:
            # cast for mypy only: with no components ``sum`` gives the int 0, which ``self.exact - 0`` accepts too
            explained = cast(torch.Tensor, sum(s.sum(-1) for s in scores.values()))
        layout = self.epk.layout
        # buffers (BatchNorm running statistics) are their own component: change = scores + buffers + delta
        return ScoreResult(
            scores=scores, change=self.exact + self.buffers, delta=self.exact - explained, windows=list(self.windows),
            groups=None if self.groups is None else list(self.groups), parameters=list(layout.names),
            shapes=[tuple(s) for s in layout.shapes], stats=stats, options=self.epk.options.to_dict(),
            buffers=self.buffers,
        )

    # ------------------------------------------------------------------ run
    def run(self, batch: Batch, show_progress: Optional[bool] = None) -> SweepStats:
        """Sweep the windows' steps; the scores are then in ``acc``, the exact changes in ``exact``."""
        return self.epk.sweep(batch, self, steps=self.steps, desc="scores", show_progress=show_progress)
