r"""The data view's training side without per-sample gradients (forward mode; large models).

At step i the reverse sweep scores every sample k of the step's batch against the accumulated
test direction ``T_i(x)`` (:mod:`.data_view`):

.. math:: Γ_i(x, k) = -σ_i c_i w_{i,k} \, ∇_θ ℓ_k(θ_{i-1}) · T_i(x) .

``∇ℓ_k · T`` is the directional derivative of sample k's loss along ``T``. One forward-mode
``jvp`` of the batch's per-sample loss vector ``ℓ(θ) = [ℓ_1 … ℓ_m]`` along ``T_i(x)`` gives it
for the whole batch at once, so the per-sample gradients ``[m, P]`` are never built: memory is
one forward pass carrying a tangent, not batch × P. The work is one such pass per test input,
window and parameter group (vmapped over a few tangents at a time), against one per-sample
gradient pass per step on the other path — so this path is for models whose per-sample
gradients do not fit, and is chosen automatically only then (``EPKOptions.train_jvp``).

The measured gradient scale ``c_i`` needs the replayed batch gradient ``Σ_k w_{i,k} ∇ℓ_k``:
one ordinary backward pass of the weighted batch loss (memory P plus activations).

Forward mode sees whatever forward the training side runs, so the same function serves an
independent per-sample forward and a batch-coupled one (train-mode normalization): the rows of
the loss vector's Jacobian are then the coupled per-sample gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch.func import grad, jvp, vmap

from .._compat import functorch_friendly
from ..recording.format import StepRecord
from .functional import FunctionalModel
from .train_grads import CoupledGrads, TrainGrads
from .training_set import GRAD_CHUNK_BYTES, TrainingSet, step_samples

if TYPE_CHECKING:
    from .engine import ExactPathKernel

__all__ = ["use_train_jvp", "loss_jvp_scores", "directional_scores", "ForwardModeGrads", "forward_mode",
           "TANGENTS_PER_PASS"]

#: tangents carried by one vmapped forward-mode pass (memory: that many forward passes)
TANGENTS_PER_PASS = 8


def use_train_jvp(choice: Optional[bool], m: int, n_params: int, dtype: torch.dtype,
                  budget: Optional[int] = None) -> bool:
    """Whether the forward-mode path scores a step of ``m`` distinct samples.

    Args:
        choice (bool or None): the option ``train_jvp``; ``None`` decides here.
        m (int): distinct samples of the step. n_params (int): P. dtype: compute dtype.
        budget (int, optional): bytes the per-sample gradients may take (default: the
            per-sample path's chunk, ``GRAD_CHUNK_BYTES``).

    Returns:
        *bool*: ``choice`` when given; else True when even one per-sample gradient chunk of the
        step would not fit the budget (``m × P`` too large to hold at once).
    """
    if choice is not None:
        return bool(choice)
    limit = GRAD_CHUNK_BYTES if budget is None else budget
    return m * n_params * (torch.finfo(dtype).bits // 8) > limit


def _directional(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, tangents: torch.Tensor,
                 fm: FunctionalModel) -> torch.Tensor:
    """``[T, m]``: the loss vector's derivative along each row of ``tangents`` (vmapped, else a loop)."""
    if tangents.shape[0] > 1 and fm.use_vmap("tangents"):
        try:
            return vmap(lambda v: jvp(fn, (theta,), (v,))[1])(tangents)
        except Exception as err:  # model not vmappable over tangents: one jvp each
            fm.vmap_failed("tangents", err)
    return torch.stack([jvp(fn, (theta,), (v,))[1] for v in tangents])


def directional_scores(losses: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, weights: torch.Tensor,
                       directions: torch.Tensor, group_slices: Sequence[Sequence[slice]], fm: FunctionalModel,
                       tangents_per_pass: int = TANGENTS_PER_PASS) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``w_k ∇ℓ_k(θ)·d`` for every direction ``d`` and group, from forward-mode passes of ``losses``.

    Args:
        losses (Callable): θ ↦ the per-sample loss vector ``[m]`` (independent or batch-coupled).
        theta (Tensor): [P]. weights (Tensor): w_k [m].
        directions (Tensor): ``[D, P]``. group_slices: per group, the slices of θ it holds.
        fm (FunctionalModel): decides whether ``vmap`` over tangents works.

    Returns:
        *tuple[Tensor, Tensor]*: ``dots [D, m, G]`` (weighted) and ``Σ_k w_k ∇ℓ_k`` [P] (one backward).
    """
    D, P = directions.shape
    G = len(group_slices)
    m = int(weights.numel())
    dots = torch.zeros(D, m, G, dtype=directions.dtype, device=directions.device)
    with functorch_friendly():
        g_rep = grad(_weighted(losses, weights))(theta)  # one backward of the weighted batch loss
        with torch.no_grad():
            for g, slices in enumerate(group_slices):
                for r0 in range(0, D, tangents_per_pass):
                    rows = directions[r0 : r0 + tangents_per_pass]
                    if G > 1 or not _covers(slices, P):
                        rows = _masked(rows, slices)
                    dots[r0 : r0 + rows.shape[0], :, g] = _directional(losses, theta, rows, fm)
    return dots * weights.view(1, -1, 1), g_rep


def loss_jvp_scores(
    fm: FunctionalModel,
    train: TrainingSet,
    loss_fn: Callable,
    theta: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    directions: torch.Tensor,
    group_slices: Sequence[Sequence[slice]],
    sample_chunk: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Independent samples (evaluation-mode forward): weighted ``w_k ∇ℓ_k(θ)·d`` and the replayed gradient.

    Args:
        fm, train, loss_fn: the model, the samples, the per-sample loss.
        theta (Tensor): θ_{i−1} [P]. indices (Tensor): distinct indices [m]. weights (Tensor): w [m].
        directions (Tensor): ``[D, P]``. group_slices: parameter groups.
        sample_chunk (int, optional): samples per forward pass. Default: all of the step

    Returns:
        *tuple[Tensor, Tensor]*: ``dots [D, m, G]`` and ``Σ_k w_k ∇ℓ_k`` [P].
    """
    m = int(indices.numel())
    size = m if sample_chunk is None else max(1, int(sample_chunk))
    parts, g_rep = [], torch.zeros(directions.shape[1], dtype=theta.dtype, device=theta.device)
    for start in range(0, m, size):
        sl = slice(start, min(m, start + size))
        batch, target = train.batch(indices[sl])

        def losses(th: torch.Tensor, batch=batch, target=target) -> torch.Tensor:
            return loss_fn(fm.raw(th, batch), target)

        dots, g = directional_scores(losses, theta, weights[sl], directions, group_slices, fm)
        parts.append(dots)
        g_rep += g
    return torch.cat(parts, dim=1), g_rep


class ForwardModeGrads(TrainGrads):
    """A gradient computer (``epk/train_grads.py``) whose projections run in forward mode.

    Wraps the computer chosen for the recording (independent or batch-coupled): ``project`` —
    what the data view asks — is answered by :func:`directional_scores` on the same per-sample
    loss vector whenever :func:`use_train_jvp` says so for the step, else by the wrapped
    computer; ``weighted_grads`` (the similarity view needs the gradients themselves) always
    is the wrapped computer's. Under ``max_memory`` the training chunk follows the memory plan.

    Args:
        inner (TrainGrads): the computer for the recording.
        epk (ExactPathKernel): the core (options ``train_jvp`` and the memory plan).
    """

    def __init__(self, inner: TrainGrads, epk: "ExactPathKernel") -> None:
        super().__init__(inner.fm, inner.train, inner.loss_fn, inner.train_batch_size)
        self.inner, self.epk = inner, epk
        self.name = inner.name  # what results report: the wrapped computer, "+jvp" once forward mode ran
        self.forward_steps = 0  # steps projected in forward mode

    def _sync(self) -> Optional[int]:
        size = self.epk.train_chunk(self.epk.options.train_batch_size)
        self.inner.train_batch_size = size
        return size

    def weighted_grads(self, rec: StepRecord, theta: torch.Tensor, what: str = "data view",
                       part: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._sync()
        return self.inner.weighted_grads(rec, theta, what, part)

    def _forward_step(self, rec: StepRecord, what: str = "data view") -> bool:
        epk = self.epk
        uniq, _ = step_samples(rec, what, epk.device, epk.dtype)
        return use_train_jvp(epk.options.train_jvp, len(uniq), epk.layout.total, epk.dtype, epk.train_grad_bytes)

    def splits_samples(self, rec: StepRecord) -> bool:
        """Per-sample steps split over their samples; forward-mode ones do not (their cost is per
        direction: a caller splits the directions instead)."""
        return not self._forward_step(rec)

    def project(self, rec: StepRecord, theta: torch.Tensor, directions: torch.Tensor,
                group_slices: Sequence[Sequence[slice]], what: str = "data view",
                part: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self._sync()
        epk = self.epk
        uniq, weights = step_samples(rec, what, epk.device, epk.dtype)
        if not self._forward_step(rec, what):
            return self.inner.project(rec, theta, directions, group_slices, what, part)
        if part is not None:
            raise ValueError("a forward-mode step cannot be split over its samples (see splits_samples)")
        self.forward_steps += 1
        self.name = self.inner.name + "+jvp"
        if not isinstance(self.inner, CoupledGrads):
            dots, g_rep = loss_jvp_scores(self.fm, self.train, self.loss_fn, theta, uniq, weights, directions,
                                          group_slices, size)
            return uniq, dots, g_rep
        return self._coupled(rec, theta, directions, group_slices)

    def _coupled(self, rec: StepRecord, theta: torch.Tensor, directions: torch.Tensor,
                 group_slices: Sequence[Sequence[slice]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each recorded micro-batch forwarded as training did (its per-sample loss vector)."""
        inner = self.inner
        assert isinstance(inner, CoupledGrads)  # project() routes only coupled computers here
        idx, parts = [], []
        g_rep = torch.zeros(directions.shape[1], dtype=theta.dtype, device=theta.device)
        for mb in rec.batches:
            if mb.indices.numel() == 0:
                continue
            batch, target = self.train.batch(mb.indices)

            def losses(th: torch.Tensor, mb=mb, batch=batch, target=target) -> torch.Tensor:
                return inner.loss_vector(th, mb, batch, target)

            w = mb.weights.to(device=self.fm.device, dtype=self.fm.dtype)
            dots, g = directional_scores(losses, theta, w, directions, group_slices, self.fm)
            idx.append(mb.indices)
            parts.append(dots)
            g_rep += g
        return torch.cat(idx), torch.cat(parts, dim=1), g_rep


def forward_mode(inner: TrainGrads, epk: "ExactPathKernel") -> ForwardModeGrads:
    """``inner`` with forward-mode projections where they are chosen (see :class:`ForwardModeGrads`)."""
    return inner if isinstance(inner, ForwardModeGrads) else ForwardModeGrads(inner, epk)


def _weighted(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda th: (w * fn(th)).sum()


def _covers(slices: Sequence[slice], P: int) -> bool:
    return len(slices) == 1 and (slices[0].start or 0) == 0 and slices[0].stop == P


def _masked(rows: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    """The tangents restricted to a parameter group (zero elsewhere)."""
    out = torch.zeros_like(rows)
    for s in slices:
        out[:, s] = rows[:, s]
    return out
