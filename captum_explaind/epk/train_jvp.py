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

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.func import grad, jvp, vmap

from .._compat import functorch_friendly
from .functional import FunctionalModel
from .training_set import GRAD_CHUNK_BYTES, TrainingSet

__all__ = ["use_train_jvp", "loss_jvp_scores", "TANGENTS_PER_PASS"]

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


def _loss_vector(fm: FunctionalModel, train: TrainingSet, loss_fn: Callable,
                 indices: torch.Tensor) -> Tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    batch, target = train.batch(indices)

    def losses(theta: torch.Tensor) -> torch.Tensor:
        return loss_fn(fm.raw(theta, batch), target)

    return losses, batch.n


def _directional(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, tangents: torch.Tensor,
                 fm: FunctionalModel) -> torch.Tensor:
    """``[T, m]``: the loss vector's derivative along each row of ``tangents`` (vmapped, else a loop)."""
    if tangents.shape[0] > 1 and fm.use_vmap("tangents"):
        try:
            return vmap(lambda v: jvp(fn, (theta,), (v,))[1])(tangents)
        except Exception as err:  # model not vmappable over tangents: one jvp each
            fm.vmap_failed("tangents", err)
    return torch.stack([jvp(fn, (theta,), (v,))[1] for v in tangents])


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
    tangents_per_pass: int = TANGENTS_PER_PASS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Directional derivatives ``∇ℓ_k(θ) · T`` for a step's samples, and the replayed batch gradient.

    Args:
        fm (FunctionalModel): the model. train (TrainingSet): the samples. loss_fn: per-sample loss.
        theta (Tensor): θ_{i−1} [P].
        indices (Tensor): the step's distinct training indices [m].
        weights (Tensor): their batch weights w_{i,k} [m].
        directions (Tensor): test directions ``[W, n, P]`` (windows × inputs).
        group_slices: per parameter group, the slices of θ it holds (one group of everything for
            plain per-sample scores).
        sample_chunk (int, optional): samples per forward pass. Default: all of the step
        tangents_per_pass (int): tangents vmapped in one forward-mode pass.

    Returns:
        *tuple[Tensor, Tensor]*: ``dots [W, n, m, G]`` (``dots[w, x, k, g] = Σ_{p∈g}
        ∇ℓ_k[p] T_{w,x}[p]``, unweighted, as the per-sample path's ``T @ G.T``) and
        ``Σ_k w_k ∇ℓ_k`` [P].
    """
    W, n, P = directions.shape
    G = len(group_slices)
    m = int(indices.numel())
    size = m if sample_chunk is None else max(1, int(sample_chunk))
    flat_dirs = directions.reshape(W * n, P)
    dots = torch.zeros(W * n, m, G, dtype=directions.dtype, device=directions.device)
    g_rep = torch.zeros(P, dtype=theta.dtype, device=theta.device)
    with functorch_friendly():
        for start in range(0, m, size):
            sl = slice(start, min(m, start + size))
            fn, _ = _loss_vector(fm, train, loss_fn, indices[sl])
            g_rep += grad(_weighted(fn, weights[sl]))(theta)  # one backward of the weighted batch loss
            with torch.no_grad():
                for g, slices in enumerate(group_slices):
                    for r0 in range(0, W * n, tangents_per_pass):
                        rows = flat_dirs[r0 : r0 + tangents_per_pass]
                        if G > 1 or not _covers(slices, P):
                            rows = _masked(rows, slices)
                        dots[r0 : r0 + rows.shape[0], sl, g] = _directional(fn, theta, rows, fm)
    return dots.reshape(W, n, m, G), g_rep


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
