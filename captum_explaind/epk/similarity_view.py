r"""Similarity statistic: how alike two predictions are "from the model's perspective" (Def. 4.4).

The influence tensor of a prediction, restricted to steps S, parameters Θ, training samples K
and outputs J, is ``Γ_S(Θ, x, K)_J[s, p, k, j] = Φ_s(x)_{j,p} · Δ_s^{(k)}[p]``. Two predictions
are compared by the cosine of their flattened tensors. The inner product factorizes,

.. math::

    ⟨Γ(x), Γ(x')⟩ = \sum_{s∈S} \sum_{j} \sum_{p∈Θ} Φ_s(x)_{j,p}\, Φ_s(x')_{j,p}\, D_{s,p},
    \qquad D_{s,p} = \sum_{k∈K} (Δ_s^{(k)}[p])^2,

so the training side enters through one vector ``D_s`` per step and no tensor of size
steps × parameters × training samples is ever built. ``Δ_s^{(k)}`` (sample k's share of update
s, momentum included) needs one running momentum buffer per training sample of ``K`` that is
still carrying weight — memory ``|K| × P`` for momentum optimizers, nothing for plain SGD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch

from .integrands import JacobianIntegrand
from .segment import Chunk, Segment
from .train_grads import TrainGrads, select_train_grads
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

    @property
    def per_input_vectors(self) -> int:
        """Memory model: φ of every selected output (and its scaled copy)."""
        return 2 * int(self.outputs.shape[1])

    def __init__(self, epk: "ExactPathKernel", n: int, outputs: torch.Tensor, train: TrainingSet, loss_fn: Callable,
                 subset: Optional[torch.Tensor], mask: Optional[torch.Tensor], integrate: List[int],
                 train_batch_size: Optional[int], grads: Optional[TrainGrads] = None) -> None:
        self.epk, self.n, self.outputs, self.train, self.loss_fn = epk, n, outputs, train, loss_fn
        # per-sample training gradients: independent, or coupled through train-mode batch statistics
        self.grads = grads if grads is not None else forward_mode(select_train_grads(epk, train, loss_fn), epk)
        self.mask = mask
        self.integrate = set(integrate)
        self.train_batch_size = train_batch_size
        self.in_subset = None
        if subset is not None:
            self.in_subset = torch.zeros(len(train), dtype=torch.bool)
            self.in_subset[subset] = True
        self.buffers: Dict[int, torch.Tensor] = {}  # training index -> momentum buffer b^{(k)}
        self.gram = torch.zeros(n, n, dtype=epk.dtype, device=epk.device)
        self._phi: Optional[torch.Tensor] = None  # [n, J, P]
        self.exact = torch.zeros(n, outputs.shape[1], dtype=epk.dtype, device=epk.device)
        self.buffer_change = torch.zeros_like(self.exact)  # output jumps of buffers (BatchNorm statistics)

    # sweep protocol ------------------------------------------------------------
    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        flat = out.reshape(out.shape[0], -1)
        return flat.gather(1, self.outputs[chunk.offset + rows].to(flat.device))

    def step_change(self, step: int, chunk: Chunk, c0: torch.Tensor, c1: torch.Tensor) -> None:
        self.exact[chunk.offset : chunk.offset + chunk.n] += c1 - c0

    def buffer_jump(self, step: int, chunk: Chunk, jump: torch.Tensor) -> None:
        rows = torch.arange(chunk.n, device=jump.device)
        self.buffer_change[chunk.offset : chunk.offset + chunk.n] += self.check(jump, chunk, rows)

    def integrand(self, seg: Segment, chunk: Chunk) -> JacobianIntegrand:
        if self._phi is None:
            J = self.outputs.shape[1]
            self._phi = torch.zeros(self.n, J, self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)

        def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
            phi = self._phi
            assert phi is not None  # set above for this step; end_step() clears it
            phi.index_add_(0, rows, payload)

        return JacobianIntegrand(self.epk.functional, seg, chunk, self.outputs, sink)

    def end_step(self, seg: Segment, integrated: bool) -> None:
        D = self._train_statistic(seg)
        if integrated:
            phi = self._phi  # [n, J, P]
            assert phi is not None  # integrand() created it for this integrated step
            self._phi = None
            w = D if self.mask is None else D * self.mask
            scaled = phi * w.sqrt()
            flat = scaled.reshape(self.n, -1)
            self.gram += flat @ flat.T

    # training side --------------------------------------------------------------
    def _train_statistic(self, seg: Segment) -> torch.Tensor:
        """D_s = Σ_{k∈K} (Δ_s^{(k)})², updating every per-sample momentum buffer by one step."""
        co = seg.coeffs
        dev, dt, P = self.epk.device, self.epk.dtype, self.epk.layout.total
        step_samples(seg.record, "similarity view", dev, dt)  # the named error for a step without samples
        parts = list(self.grads.weighted_grads(seg.record, seg.theta0, "similarity view"))
        idx = torch.cat([i for i, _ in parts])
        uniq, inv = torch.unique(idx, return_inverse=True)  # a sample in several micro-batches: add up
        WG = torch.zeros(len(uniq), P, dtype=dt, device=dev)
        WG.index_add_(0, inv.to(dev), torch.cat([w for _, w in parts]))
        c = measured_grad_scale(seg.record, WG.sum(0), co.active)
        u = (co.sign * c) * WG  # σ c a G per batch sample
        pre = co.precond if co.precond is not None else 1.0
        scale = co.lr * pre
        D = torch.zeros(self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)
        new = {int(k): u[i] for i, k in enumerate(uniq.tolist())}
        carry = bool((co.beta != 0).any())
        keys = set(self.buffers) | set(new) if carry else set(new)
        buffers: Dict[int, torch.Tensor] = {}
        for k in keys:
            uk = new.get(k)
            b = self.buffers.get(k)
            b = (co.beta * b if b is not None else None)
            if uk is not None:
                b = co.h * uk if b is None else b + co.h * uk
            if b is None:
                continue
            delta_k = -scale * (co.e * b + (co.z * uk if uk is not None else 0.0))
            if self.in_subset is None or bool(self.in_subset[k]):
                D += delta_k * delta_k
            if carry and bool(b.abs().max() > 0):
                buffers[k] = b
        self.buffers = buffers
        return D


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix of inner products."""
    norms = g.diagonal().clamp_min(0).sqrt()
    return g / (norms.unsqueeze(1) * norms.unsqueeze(0)).clamp_min(torch.finfo(g.dtype).tiny)
