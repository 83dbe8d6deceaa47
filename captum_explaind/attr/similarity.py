r"""Similarity view: how alike two predictions are "from the model's perspective" (Def. 4.4).

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

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum.log import log_usage

from ..epk.engine import ExactPathKernel
from ..epk.integrands import JacobianIntegrand
from ..epk.segment import Chunk, Segment
from ..epk.selection import resolve_parameters
from ..epk.updates import UpdateModel
from ..errors import TrajectoryError, UnsupportedOptimizerError
from ..recording.trajectory import Trajectory
from ._base import EPKAttribution
from ._steps import StepsType, parse_windows
from ._target import Target, TargetType
from ._train_data import TrainingSet, check_loss_fn, check_train_batch_size, sample_chunk

__all__ = ["PredictionSimilarity"]


class _SimilarityView:
    """Forward sweep: per-sample momentum buffers → D_s, and target Jacobians → Gram matrix."""

    def __init__(self, epk: ExactPathKernel, n: int, outputs: torch.Tensor, train: TrainingSet, loss_fn: Callable,
                 subset: Optional[torch.Tensor], mask: Optional[torch.Tensor], integrate: List[int],
                 train_batch_size: Optional[int]) -> None:
        self.epk, self.n, self.outputs, self.train, self.loss_fn = epk, n, outputs, train, loss_fn
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

    # sweep protocol ------------------------------------------------------------
    def check(self, out: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> torch.Tensor:
        flat = out.reshape(out.shape[0], -1)
        return flat.gather(1, self.outputs[chunk.offset + rows].to(flat.device))

    def step_change(self, step: int, chunk: Chunk, c0: torch.Tensor, c1: torch.Tensor) -> None:
        self.exact[chunk.offset : chunk.offset + chunk.n] += c1 - c0

    def integrand(self, seg: Segment, chunk: Chunk) -> JacobianIntegrand:
        if self._phi is None:
            J = self.outputs.shape[1]
            self._phi = torch.zeros(self.n, J, self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)

        def sink(rows: torch.Tensor, payload: torch.Tensor) -> None:
            self._phi.index_add_(0, rows, payload)

        return JacobianIntegrand(self.epk.functional, seg, chunk, self.outputs, sink)

    def end_step(self, seg: Segment, integrated: bool) -> None:
        D = self._train_statistic(seg)
        if integrated:
            phi = self._phi  # [n, J, P]
            self._phi = None
            w = D if self.mask is None else D * self.mask
            scaled = phi * w.sqrt()
            flat = scaled.reshape(self.n, -1)
            self.gram += flat @ flat.T

    # training side --------------------------------------------------------------
    def _train_statistic(self, seg: Segment) -> torch.Tensor:
        """D_s = Σ_{k∈K} (Δ_s^{(k)})², updating every per-sample momentum buffer by one step."""
        co, rec, s = seg.coeffs, seg.record, seg.step
        if not rec.batches:
            raise TrajectoryError(f"step {s} has no recorded training samples; the similarity view needs them")
        idx = torch.cat([b.indices for b in rec.batches])
        wts = torch.cat([b.weights for b in rec.batches])
        uniq, inv = torch.unique(idx, return_inverse=True)
        weights = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, wts)
        weights = weights.to(device=self.epk.device, dtype=self.epk.dtype)
        fm = self.epk.functional
        size = sample_chunk(self.train_batch_size, len(uniq), self.epk.layout.total, self.epk.dtype)
        loss_fn = self.loss_fn

        def select(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(out, y.unsqueeze(0)).sum()

        grads, g_rep = [], torch.zeros(self.epk.layout.total, dtype=self.epk.dtype, device=self.epk.device)
        for start in range(0, len(uniq), size):
            sl = slice(start, start + size)
            x, y = self.train.batch(uniq[sl])
            G, _ = fm.selected_grads(seg.theta0, x, (), select, y, purpose="loss")
            g_rep += weights[sl] @ G
            grads.append(G)
        G = torch.cat(grads)
        norm = float(torch.linalg.vector_norm(g_rep * co.active))
        c = rec.grad_norm / norm if norm > 0 else 0.0
        u = (co.sign * c) * weights.unsqueeze(1) * G  # σ c a G per batch sample
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


class PredictionSimilarity(EPKAttribution):
    r"""Cosine similarity of two predictions' influence tensors (the paper's Def. 4.4).

    Args:
        model (nn.Module): an instance of the trained architecture.
        trajectory (Trajectory or path): the recorded run (SGD, Adam or AdamW families).
        train_dataset (Dataset or DataLoader): the training set the recorder's indices refer to.
        loss_fn (Callable, optional): per-sample training loss (``reduction="none"``).
            Default: cross-entropy.
        train_batch_size (int, optional): training samples per per-sample-gradient call.
            Default: a whole step's batch, in chunks of at most ~256 MiB of gradients.
        **options: options of :class:`~captum_explaind.ExactPathKernel`.

    Cost: one forward sweep; per step a per-sample gradient pass over the step's batch, and on the
    selected steps ``nodes × |J|`` batched backward passes over the inputs (one per compared
    output). Memory: ``n × |J| × P`` for the test side, ``|K| × P`` momentum buffers.

    Examples::

        >>> sim = PredictionSimilarity(model, trajectory, train_set)
        >>> S = sim.attribute(x_test, target=y_test)                     # [n, n], from the model's view
        >>> S_mlp = sim.attribute(x_test, target=y_test, layers="mlp", steps=range(100, 200))
    """

    def __init__(self, model: torch.nn.Module, trajectory: Union[Trajectory, str, os.PathLike], train_dataset: Any,
                 loss_fn: Optional[Callable] = None, *, train_batch_size: Optional[int] = None, **options: Any) -> None:
        super().__init__(model, trajectory, **options)
        traj = self.epk.trajectory
        if traj.family == "other":
            raise UnsupportedOptimizerError(
                f"the similarity view needs each training sample's share of every update, which optimizer "
                f"{traj.optimizer_class} has no exact form for (supported: SGD, Adam, AdamW)"
            )
        UpdateModel(traj, self.epk.layout, device=self.epk.device, dtype=self.epk.dtype, need_precond=True)
        self.train_batch_size = check_train_batch_size(train_batch_size)
        self.train = TrainingSet(train_dataset, self.epk.functional)
        self.loss_fn = check_loss_fn(loss_fn, self.epk.functional, self.epk.theta(0), self.train)

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: Any,
        others: Any = None,
        target: TargetType = None,
        other_target: TargetType = None,
        additional_forward_args: Any = None,
        layers: Any = None,
        steps: StepsType = None,
        train_subset: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        r"""Cosine similarity of flattened influence tensors, ``[n_inputs, n_others]``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): predictions to compare.
            others (optional): a second set of inputs (same structure); ``None`` compares
                ``inputs`` with themselves. Default: None
            target (optional): outputs J of each input: ``None`` keeps every output as its own
                axis of the tensor; an int, tuple or per-example list selects one. Default: None
            other_target (optional): targets of ``others``; defaults to ``target``.
            additional_forward_args (optional): extra model arguments shared by both sets.
            layers (optional): parameters Θ (names, modules, globs). Default: all trainable
            steps (int, range or slice, optional): steps S. Default: all
            train_subset (sequence of int, optional): training samples K. Default: all

        Returns:
            *Tensor* ``[n_inputs, n_others]`` in [−1, 1].
        """
        x, a, n, tgt = self._prepare(inputs, target, additional_forward_args)
        n_self = n
        if others is not None:
            xo, _, no, tgt_o = self._prepare(others, target if other_target is None else other_target,
                                             additional_forward_args)
            x = _concat(x, xo)
            tgt = Target(None if tgt.index is None and tgt_o.index is None else _cat_index(tgt, tgt_o, n, no), tgt.n_outputs)
            n = n + no
        windows, multi = parse_windows(steps, self.epk.num_steps)
        if multi:
            raise ValueError("steps must be one window here (a range or slice)")
        window = windows[0]
        if tgt.index is None:
            outputs = torch.arange(tgt.n_outputs).expand(n, -1)
        else:
            outputs = tgt.index.unsqueeze(1)
        outputs = outputs.to(self.epk.device)
        mask = None
        if layers is not None:
            names = [p for p in resolve_parameters(self.model, layers) if p in self.epk.layout]
            mask = self.epk.layout.mask(names, dtype=self.epk.dtype, device=self.epk.device)
        subset = None
        if train_subset is not None:
            subset = torch.as_tensor(list(train_subset), dtype=torch.int64)
            if subset.numel() == 0 or int(subset.min()) < 0 or int(subset.max()) >= len(self.train):
                raise ValueError(f"train_subset must hold indices in 0..{len(self.train) - 1}")
        view = _SimilarityView(self.epk, n, outputs, self.train, self.loss_fn, subset, mask, list(window),
                               self.train_batch_size)
        self.epk.sweep(x, a if others is None else _shared_args(a, n_self), n, view,
                       steps=range(1, window.stop), integrate=window, need_precond=True, desc="similarity")
        g = view.gram
        norms = g.diagonal().clamp_min(0).sqrt()
        cos = g / (norms.unsqueeze(1) * norms.unsqueeze(0)).clamp_min(torch.finfo(g.dtype).tiny)
        if others is None:
            return cos
        return cos[:n_self, n_self:]


def _concat(x: Tuple[Any, ...], y: Tuple[Any, ...]) -> Tuple[Any, ...]:
    if len(x) != len(y):
        raise ValueError("others must have the same structure as inputs")
    out = []
    for u, v in zip(x, y):
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and u.dim() > 0:
            out.append(torch.cat([u, v]))
        else:
            raise TypeError("inputs and others must be tensors (or tuples of tensors) with dim 0 = examples")
    return tuple(out)


def _shared_args(a: Tuple[Any, ...], n: int) -> Tuple[Any, ...]:
    for v in a:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            raise ValueError("per-example additional_forward_args cannot be shared with others; pass "
                             "arguments that are the same for every example")
    return a


def _cat_index(t1: Target, t2: Target, n1: int, n2: int) -> torch.Tensor:
    if t1.index is None or t2.index is None:
        raise ValueError("target and other_target must both select outputs, or both be None")
    return torch.cat([t1.index, t2.index])
