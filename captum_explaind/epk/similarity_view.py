r"""Similarity statistic: how alike two predictions are "from the model's perspective" (Def. 4.4).

The influence tensor of a prediction, restricted to steps S, parameters Θ, training samples K
and outputs J, is ``Γ_S(Θ, x, K)_J[s, p, k, j] = Φ_s(x)_{j,p} · Δ_s^{(k)}[p]``. Two predictions
are compared by the cosine of their flattened tensors. The inner product factorizes,

.. math::

    ⟨Γ(x), Γ(x')⟩ = \sum_{s∈S} \sum_{j} \sum_{p∈Θ} Φ_s(x)_{j,p}\, Φ_s(x')_{j,p}\, D_{s,p},
    \qquad D_{s,p} = \sum_{k∈K} (Δ_s^{(k)}[p])^2,

so the training side enters through one vector ``D_s`` per step and no tensor of size
steps × parameters × training samples is ever built. ``Δ_s^{(k)}`` (sample k's share of update
s, momentum included) needs one running momentum buffer per training sample — memory
``n_train × |Θ|`` for momentum optimizers. Only the selected parameters Θ are kept: the
optimizers' updates act element by element (the preconditioner is per element too), so
``Δ_s^{(k)}[p]`` for ``p ∈ Θ`` depends on sample k's gradients at ``p`` only, and ``D_s`` matters
only under Θ. The buffers are one dense ``[n_train, |Θ|]`` tensor updated in place.

One forward sweep serves several windows S_1, S_2, …: the buffers do not depend on the window,
so every step is visited once and each integrated step adds to the Gram matrix of every window
holding it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch

from ..recording.format import StepRecord
from .integrands import JacobianIntegrand
from .segment import Chunk, Segment
from .train_grads import IndependentGrads, TrainGrads, select_train_grads
from .train_jvp import forward_mode
from .training_set import TrainingSet, measured_grad_scale, step_samples
from .views import ViewBase

if TYPE_CHECKING:
    from .engine import ExactPathKernel

__all__ = ["SimilarityView", "cosine_from_gram"]


class SimilarityView(ViewBase):
    """Forward sweep: per-sample momentum buffers → D_s, and target Jacobians → Gram matrix."""

    # Split over steps: the Gram matrix is a sum over steps; the per-sample momentum buffers need
    # every earlier step's training side, so each rank visits the steps before its own too.
    shard_sum = ("gram", "exact", "buffer_change")
    visit_every_step = True
    replays_training = True  # needs every optimizer step (no keep_every)
    label = "similarity view"

    @property
    def per_input_vectors(self) -> int:
        """Memory model: φ of every selected output (and its scaled copy)."""
        return 2 * int(self.outputs.shape[1])

    def __init__(self, epk: "ExactPathKernel", n: int, outputs: torch.Tensor, train: TrainingSet, loss_fn: Callable,
                 subset: Optional[torch.Tensor], mask: Optional[torch.Tensor], windows: List[range],
                 train_batch_size: Optional[int], grads: Optional[TrainGrads] = None) -> None:
        self.epk, self.n, self.outputs, self.train, self.loss_fn = epk, n, outputs, train, loss_fn
        # per-sample training gradients: independent, or coupled through train-mode batch statistics
        self.grads = grads if grads is not None else forward_mode(select_train_grads(epk, train, loss_fn), epk)
        dev, dt = epk.device, epk.dtype
        # the selected elements Θ (all without a mask); D_s and the buffers live on them only
        self.coords = None if mask is None else torch.nonzero(mask, as_tuple=False).reshape(-1).to(dev)
        layout = epk.layout
        self.selected = [] if mask is None else [
            nm for nm in layout.names if layout.numels[layout.names.index(nm)] and bool(mask[layout.slice(nm)].all())]
        # per-sample gradients on Θ only (a backward that stops at Θ's layers) where samples are
        # independent and Θ is whole parameters; else the full gradients, restricted afterwards
        inner = getattr(self.grads, "inner", self.grads)  # under the forward-mode wrapper
        self._restricted = (self.coords is not None and type(inner) is IndependentGrads
                            and sum(layout.numels[layout.names.index(nm)] for nm in self.selected) == len(self.coords))
        self.windows = list(windows)
        self.windows_of: Dict[int, List[int]] = {}
        for w, r in enumerate(self.windows):
            for step in r:
                self.windows_of.setdefault(int(step), []).append(w)
        self.integrate = set(self.windows_of)
        self.train_batch_size = train_batch_size
        self.in_subset = None
        if subset is not None:
            self.in_subset = torch.zeros(len(train), dtype=torch.bool, device=dev)
            self.in_subset[subset.to(dev)] = True
        self.buffers: Optional[torch.Tensor] = None  # [n_train, |Θ|] momentum buffers b^{(k)}
        self._decay = 1.0  # Π max β over the visited steps: the weight left on momentum from before them
        self._decay_at: Dict[int, float] = {}  # window start -> that weight when the window began
        W, J = len(self.windows), outputs.shape[1]
        self.gram = torch.zeros(W, n, n, dtype=dt, device=dev)
        self._phi: Optional[torch.Tensor] = None  # [n, J, |Θ|]
        self.exact = torch.zeros(W, n, J, dtype=dt, device=dev)
        self.buffer_change = torch.zeros_like(self.exact)  # output jumps of buffers (BatchNorm statistics)

    # sweep protocol ------------------------------------------------------------
    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        flat = out.reshape(out.shape[0], -1)
        return flat.gather(1, self.outputs[chunk.offset + rows].to(flat.device))

    def step_change(self, step: int, chunk: Chunk, c0: torch.Tensor, c1: torch.Tensor) -> None:
        for w in self.windows_of.get(step, ()):
            self.exact[w, chunk.offset : chunk.offset + chunk.n] += c1 - c0

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None:
        rows = torch.arange(chunk.n, device=jump.device)
        for w in self.windows_of.get(step, ()):
            self.buffer_change[w, chunk.offset : chunk.offset + chunk.n] += self.check(jump, chunk, rows)

    def integrand(self, seg: Segment, chunk: Chunk) -> JacobianIntegrand:
        if self._phi is None:
            J = self.outputs.shape[1]
            width = self.epk.layout.total if self.coords is None else len(self.coords)  # Θ's columns only
            self._phi = torch.zeros(self.n, J, width, dtype=self.epk.dtype, device=self.epk.device)

        def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
            phi = self._phi
            assert phi is not None  # set above for this step; end_step() clears it
            phi.index_add_(0, rows, payload)

        return JacobianIntegrand(self.epk.functional, seg, chunk, self.outputs, sink, columns=self.coords)

    def end_step(self, seg: Segment, integrated: bool) -> None:
        D = self._train_statistic(seg)  # [|Θ|]
        if integrated:
            phi = self._phi  # [n, J, |Θ|] (the integrand kept Θ's columns only)
            assert phi is not None  # integrand() created it for this integrated step
            self._phi = None
            flat = (phi * D.sqrt()).reshape(self.n, -1)
            g = flat @ flat.T
            for w in self.windows_of.get(seg.step, ()):
                self.gram[w] += g

    def truncation(self, w: int) -> float:
        """The largest weight momentum from before the sweep's first step has in window ``w``."""
        return self._decay_at.get(w, 0.0)

    # training side --------------------------------------------------------------
    def _restrict(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.coords is None else v.index_select(-1, self.coords)

    def _restricted_grads(self, rec: StepRecord, theta: torch.Tensor, active: torch.Tensor
                          ) -> Optional[Tuple[List[Tuple[torch.Tensor, torch.Tensor]], float]]:
        """The step's samples and their weighted loss gradients on Θ only, as parts
        ``(indices [m], W [m, |Θ|])``, and the measured gradient scale ``c``.

        The per-sample gradients differentiate Θ's parameters alone (the others enter as
        constants), so their backward pass stops at Θ's layers: for the last layer it is nearly free.
        The scale is global (clipping, loss scaling), so it is measured on Θ: the recorded norm of
        Θ's gradients (none recorded: inactive, zero) over the replayed one. ``None`` where Θ's
        replayed gradient is zero (the caller then replays all parameters for this step).
        """
        inner = getattr(self.grads, "inner", self.grads)  # under the forward-mode wrapper
        assert isinstance(inner, IndependentGrads)  # self._restricted says so
        parts = [(i.to(self.epk.device), w) for i, w in inner.restricted_grads(rec, theta, self.selected,
                                                                                 "similarity view")]
        total = parts[0][1].sum(0)
        for _, w in parts[1:]:
            total += w.sum(0)
        norm = float(torch.linalg.vector_norm(total * self._restrict(active)))
        if norm == 0:
            return None
        c = sum(rec.grad_sq.get(nm, 0.0) for nm in self.selected) ** 0.5 / norm
        return parts, c

    def _step_parts(self, seg: Segment) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], float]:
        """The step's weighted per-sample gradients on Θ, in parts ``(indices, W)``, and the measured scale."""
        co = seg.coeffs
        step_samples(seg.record, "similarity view", self.epk.device, self.epk.dtype)  # the named error if none
        fast = self._restricted_grads(seg.record, seg.theta0, co.active) if self._restricted else None
        if fast is not None:
            return fast
        parts = []
        g_rep = torch.zeros(self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)
        for i, wg in self.grads.weighted_grads(seg.record, seg.theta0, "similarity view"):
            g_rep += wg.sum(0)  # the replayed gradient (all parameters): the measured scale needs it
            parts.append((i.to(self.epk.device), self._restrict(wg)))
        return parts, measured_grad_scale(seg.record, g_rep, co.active)

    def _train_statistic(self, seg: Segment) -> torch.Tensor:
        """D_s = Σ_{k∈K} (Δ_s^{(k)})² on Θ, updating every per-sample momentum buffer by one step.

        The buffers are ``n_train × |Θ|`` (4,000 × 7,360 for the Grokking decoder): every pass over
        them costs, so each part of the step's gradients goes into them in place (a contiguous
        run of samples as a slice, no index copy), and the ``z u`` term (Nesterov) is only formed
        where it is not zero.
        """
        co = seg.coeffs
        dev, dt = self.epk.device, self.epk.dtype
        parts, c = self._step_parts(seg)
        sign, h, e, z, beta = (self._restrict(t) for t in (co.sign, co.h, co.e, co.z, co.beta))
        pre = self._restrict(co.precond) if co.precond is not None else 1.0
        scale = self._restrict(co.lr) * pre
        if self.buffers is None:
            self.buffers = torch.zeros(len(self.train), parts[0][1].shape[1], dtype=dt, device=dev)
        self._decay *= float(co.beta.max()) if co.beta.numel() else 0.0
        for w in self.windows_of.get(seg.step, ()):
            self._decay_at.setdefault(w, self._decay)
        B = self.buffers
        B.mul_(beta)  # b ← β b + h u, u = σ c a G (a sample without a gradient this step: b ← β b)
        has_z = bool((z != 0).any())
        zu = torch.zeros_like(B) if has_z else None
        for idx, W in parts:  # a sample in several micro-batches: its rows add up
            _add_rows(B, idx, W, (sign * c) * h)
            if zu is not None:
                _add_rows(zu, idx, W, (sign * c) * z)
        # Δ^{(k)} = −η D (e b + z u): rows of the samples in K, in chunks small enough to stay in
        # cache (a whole-matrix reduction along the sample axis is several times slower)
        rows = None if self.in_subset is None else torch.nonzero(self.in_subset).reshape(-1)
        n_rows = B.shape[0] if rows is None else len(rows)
        D = torch.zeros(B.shape[1], dtype=dt, device=dev)
        for start in range(0, n_rows, 256):
            r = slice(start, start + 256) if rows is None else rows[start : start + 256]
            d = B[r] * e if zu is None else torch.addcmul(zu[r], e, B[r])
            D += (d * d).sum(0)
        return D * (scale * scale)


def _add_rows(target: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, coef: torch.Tensor) -> None:
    """``target[idx] += W · coef`` (rows, in place): as a slice when ``idx`` is a contiguous run."""
    n = len(idx)
    if n and int(idx[-1]) - int(idx[0]) == n - 1 and bool((idx[1:] > idx[:-1]).all()):
        target[int(idx[0]) : int(idx[0]) + n].addcmul_(W, coef)
    elif n:
        target.index_add_(0, idx, W * coef)


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix of inner products."""
    norms = g.diagonal().clamp_min(0).sqrt()
    return g / (norms.unsqueeze(1) * norms.unsqueeze(0)).clamp_min(torch.finfo(g.dtype).tiny)
