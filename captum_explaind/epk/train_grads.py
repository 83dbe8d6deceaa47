r"""Per-sample training gradients for the data and similarity views ("gradient computers").

The data view needs, for every recorded step ``i``, each training sample's share of the gradient
the optimizer saw: ``w_{i,k} ∇_θ ℓ_k(θ_{i−1})``, summed over the micro-batches of the step. How
to get it depends on how training ran the model:

* :class:`IndependentGrads` — each sample's loss depends on that sample only (no train-mode
  normalization, no replayed dropout): per-example gradients of the evaluation-mode model
  (``torch.func.vmap(grad)``, with a per-example loop for models ``vmap`` cannot handle). One
  gradient per distinct sample of the step, in chunks.
* :class:`CoupledGrads` — training forwarded every micro-batch *as a whole*: BatchNorm layers in
  train mode normalize with the statistics of that batch, so sample ``k``'s loss depends on every
  sample of its batch. The batch loss ``Σ_k w_k ℓ_k(θ; batch statistics)`` then has gradient
  exactly ``Σ_k w_k ∇_θ ℓ_k``, each ``ℓ_k`` differentiated *through* the batch statistics, i.e.
  the rows of the Jacobian of the batch's per-sample loss vector. They are computed by one
  forward of the recorded micro-batch in training mode and vmapped vector–Jacobian products
  with one-hot cotangents (a loop of them where ``vmap`` fails). Dropout masks are replayed by
  restoring the RNG state recorded before the micro-batch's training forward
  (``MicroBatch.rng_state`` / ``cuda_rng_state``) under :func:`torch.random.fork_rng`.

:func:`select_train_grads` picks one from the recording (the manifest's ``training_modes``, else
the buffers that moved during training, else the live model) or from
``EPKOptions.train_grads``. A computer answers two questions:

* :meth:`TrainGrads.weighted_grads` — ``(indices, W)`` pairs, ``W[r] = w_r ∇ℓ_r``; over all pairs of
  a step, ``Σ_r W[r]`` is the replayed gradient of the step's loss (an index may occur in several
  pairs when a sample was in several micro-batches; add them up).
* :meth:`TrainGrads.project` — the same gradients projected on test-side directions
  ``[D, P]`` per parameter group, plus the replayed gradient (what the data view needs; a
  forward-mode computer can answer it without ever forming ``W``).

Both take ``part=(index, count)``: only that share of the step's gradients (the data view under
``torchrun`` splits each step's training samples over the ranks — independent samples, or the
rows of each micro-batch's Jacobian — and adds up the replayed gradient); the shares of all
``count`` parts are disjoint and cover the step. :meth:`TrainGrads.splits_samples` says whether a
step can be split that way.

Adding a computer: subclass :class:`TrainGrads`, implement :meth:`~TrainGrads.weighted_grads`
(and :meth:`~TrainGrads.project` if it can do better than projecting them), and add its name to
:func:`select_train_grads` and ``options.TRAIN_GRADS``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import grad, vjp, vmap

from .. import distributed
from .._compat import functorch_friendly
from ..recording.format import MicroBatch, StepRecord
from .batch import batched_dims, lift_rows, take_rows
from .functional import FunctionalModel
from .memory import activation_bytes
from .training_set import (
    GRAD_CALL_BYTES,
    TrainingSet,
    per_sample_loss_grads,
    sample_chunk,
    step_samples,
    weighted_param_grads,
)

if TYPE_CHECKING:
    from .engine import ExactPathKernel

__all__ = ["TrainGrads", "IndependentGrads", "CoupledGrads", "TrainingModes", "training_modes",
           "select_train_grads", "training_forward"]

_NORM = nn.modules.batchnorm._NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm* (mode-dependent norms)
_DROPOUT = nn.modules.dropout._DropoutNd


@dataclass(frozen=True)
class TrainingModes:
    """Which modules ran in a mode-dependent way during training.

    Attributes:
        batch_norm (list[str]): normalization modules in train mode (batch statistics).
        dropout (list[str]): dropout modules with p > 0 in train mode.
        source (str): ``"manifest"`` (recorded), ``"buffers"`` (normalization modules whose
            running statistics moved during the recorded run) or ``"none"``.
    """

    batch_norm: List[str] = field(default_factory=list)
    dropout: List[str] = field(default_factory=list)
    source: str = "none"


def training_modes(trajectory: Any, model: nn.Module) -> TrainingModes:
    """The training modes of a recorded run.

    Read from the manifest's ``training_modes`` (written by the recorder at the first step). A
    normalization module also counts as having run in train mode when its running statistics changed
    during the run (they only move in train mode) — this covers older recordings without the key and
    normalization layers the manifest does not list (``InstanceNorm`` with running statistics) — or,
    for one that keeps no running statistics, when it is in train mode in ``model`` now and the
    recording does not say otherwise.
    """
    recorded = getattr(trajectory, "manifest", {}).get("training_modes")
    changed = set()
    if trajectory.buffer_steps():
        first, last = trajectory.buffers(0), trajectory.buffers(trajectory.num_steps)
        changed = {name.rpartition(".")[0] for name in first if not torch.equal(first[name], last[name])}
    listed = set(recorded.get("batch_norm", [])) if isinstance(recorded, dict) else set()
    norms = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _NORM):
            continue
        live = recorded is None and not mod.track_running_stats and mod.training
        if name in listed or name in changed or live:
            norms.append(name)
    if isinstance(recorded, dict):
        return TrainingModes(norms, list(recorded.get("dropout", [])), "manifest")
    return TrainingModes(norms, [], "buffers" if norms else "none")


@contextlib.contextmanager
def training_forward(module: nn.Module, modes: TrainingModes, replay_dropout: bool) -> Iterator[None]:
    """Put ``module`` in the modes training used for the duration (flags restored on exit).

    With ``replay_dropout`` the whole module is in train mode (as ``model.train()`` during
    training), except normalization and dropout modules the recording lists as not in train
    mode; otherwise it is in eval mode except the listed normalization modules. Those keep no
    running statistics while inside (``track_running_stats=False``: normalize with the batch's
    statistics, as training did, without touching the buffers, which come from the trajectory).
    """
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in module.modules()]
    norms = set(modes.batch_norm)
    try:
        if replay_dropout:
            module.train()
            listed_dropout = set(modes.dropout) if modes.source == "manifest" else None
            for name, m in module.named_modules():
                if isinstance(m, _NORM) and name not in norms:
                    m.eval()
                if isinstance(m, _DROPOUT) and listed_dropout is not None and name not in listed_dropout:
                    m.eval()
        else:
            module.eval()
        for name in norms:
            m = module.get_submodule(name)
            m.train()
            if isinstance(m, _NORM):
                m.track_running_stats = False
        yield
    finally:
        for m, was_training, track in saved:
            m.training = was_training
            if track is not None:
                m.track_running_stats = track


@contextlib.contextmanager
def _rng_replayed(mb: MicroBatch, device: torch.device) -> Iterator[bool]:
    """Restore the RNG state recorded before ``mb``'s training forward (inside a fork, so the
    caller's RNG is untouched); yields whether there was one."""
    cpu = getattr(mb, "rng_state", None)
    cuda = getattr(mb, "cuda_rng_state", None)
    if cpu is None and cuda is None:
        yield False
        return
    devices = [device] if (cuda is not None and device.type == "cuda") else []
    with torch.random.fork_rng(devices=devices):
        if cpu is not None:
            torch.set_rng_state(cpu)
        if devices:
            assert cuda is not None  # devices is only non-empty with a recorded CUDA state
            torch.cuda.set_rng_state(cuda, device)
        yield True


class TrainGrads:
    """Per-sample training gradients of recorded steps (see the module docstring).

    Args:
        fm (FunctionalModel): the model at arbitrary parameters (device, dtype, fixed tensors).
        train (TrainingSet): the training samples by dataset index.
        loss_fn (Callable): per-sample loss ``loss_fn(raw_outputs, target) -> [m]``.
        train_batch_size (int, optional): rows of gradients per call (memory control);
            ``None``: ~24 MiB of gradients.
    """

    #: the name :func:`select_train_grads` and ``EPKOptions.train_grads`` use
    name = "base"

    def __init__(self, fm: FunctionalModel, train: TrainingSet, loss_fn: Callable,
                 train_batch_size: Optional[int] = None) -> None:
        self.fm, self.train, self.loss_fn = fm, train, loss_fn
        self.train_batch_size = train_batch_size
        self._act_bytes: Optional[int] = None  # one sample's activations (batch backwards' chunking)

    def _chunk(self, m: int) -> int:
        return sample_chunk(self.train_batch_size, m, self.fm.layout.total, self.fm.dtype)

    def weighted_grads(self, rec: StepRecord, theta: torch.Tensor, what: str = "data view",
                       part: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(indices [m], W [m, P])`` with ``W[r] = w_r ∇_θ ℓ_r(θ)``, the gradient at ``theta`` of
        sample ``indices[r]``'s weighted loss in step ``rec`` (see the module docstring); with
        ``part=(index, count)`` only that share of them."""
        raise NotImplementedError

    def splits_samples(self, rec: StepRecord) -> bool:
        """Whether :meth:`project` of step ``rec`` can be split by ``part`` (over its samples)."""
        return True

    def project(self, rec: StepRecord, theta: torch.Tensor, directions: torch.Tensor,
                group_slices: Sequence[Sequence[slice]], what: str = "data view",
                part: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted per-sample gradients projected on ``directions``.

        Args:
            rec (StepRecord): the step. theta (Tensor): θ_{i−1}, [P].
            directions (Tensor): [D, P] test-side vectors.
            group_slices (list of list of slice): parameter groups (slices of the flat θ).
            part (tuple[int, int], optional): ``(index, count)``: only share ``index`` of
                ``count`` of the step's gradients (and their part of the replayed gradient).
                Default: all

        Returns:
            *tuple[Tensor, Tensor, Tensor]*: ``indices [m]``, ``dots [D, m, G]`` with
            ``dots[d, r, g] = Σ_{p∈g} directions[d, p] W[r, p]``, and the replayed gradient
            ``Σ_r W[r]`` [P].
        """
        g_rep = torch.zeros(self.fm.layout.total, dtype=self.fm.dtype, device=self.fm.device)
        idx, dots = [], []
        G = len(group_slices)
        directions = flush_subnormal(directions)
        for indices, W in self.weighted_grads(rec, theta, what, part):
            g_rep += W.sum(0)
            W = flush_subnormal(W)
            dots.append(_group_dots(directions, W, group_slices))
            idx.append(indices)
        if not idx:  # an empty share (fewer samples than parts)
            return (torch.zeros(0, dtype=torch.int64),
                    torch.zeros(directions.shape[0], 0, G, dtype=directions.dtype, device=directions.device), g_rep)
        return torch.cat(idx), torch.cat(dots, dim=1), g_rep


class IndependentGrads(TrainGrads):
    """Each sample's loss through the evaluation-mode model, alone (one gradient per distinct
    sample of a step, weighted by its summed batch weights)."""

    name = "independent"

    def weighted_grads(self, rec: StepRecord, theta: torch.Tensor, what: str = "data view",
                       part: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        uniq, weights = step_samples(rec, what, self.fm.device, self.fm.dtype)
        if part is not None:  # a contiguous share of the step's distinct samples
            lo, hi = _share(len(uniq), part)
            uniq, weights = uniq[lo:hi], weights[lo:hi]
        size = self._chunk(len(uniq))
        for start in range(0, len(uniq), size):
            sl = slice(start, start + size)
            G = per_sample_loss_grads(self.fm, self.train, self.loss_fn, theta, uniq[sl])
            yield uniq[sl], weights[sl].unsqueeze(1) * G


    def project(self, rec: StepRecord, theta: torch.Tensor, directions: torch.Tensor,
                group_slices: Sequence[Sequence[slice]], what: str = "data view",
                part: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`TrainGrads.project` from each parameter's weighted per-sample gradients as they
        come (:func:`~.training_set.weighted_param_grads`): no ``[m, P]`` concatenation and no
        weighted copy, two passes over that array fewer per chunk of samples. Same arguments and
        returns; the flat path where per-sample ``vmap`` is off."""
        uniq, weights = step_samples(rec, what, self.fm.device, self.fm.dtype)
        if part is not None:
            lo, hi = _share(len(uniq), part)
            uniq, weights = uniq[lo:hi], weights[lo:hi]
        layout = self.fm.layout
        g_rep = torch.zeros(layout.total, dtype=self.fm.dtype, device=self.fm.device)
        directions = flush_subnormal(directions)
        idx, dots = [], []
        size = self._chunk(len(uniq))
        for start in range(0, len(uniq), size):
            sl = slice(start, start + size)
            per = weighted_param_grads(self.fm, self.train, self.loss_fn, theta, uniq[sl], weights[sl])
            if per is None:  # decided on the first chunk (vmap off for the loss): the flat path
                return super().project(rec, theta, directions, group_slices, what, part)
            dots.append(_param_dots(directions, per, layout, group_slices, g_rep))
            idx.append(uniq[sl])
        if not idx:  # an empty share (fewer samples than parts)
            return (torch.zeros(0, dtype=torch.int64),
                    torch.zeros(directions.shape[0], 0, len(group_slices), dtype=directions.dtype,
                                device=directions.device), g_rep)
        return torch.cat(idx), torch.cat(dots, dim=1), g_rep

    def restricted_grads(self, rec: StepRecord, theta: torch.Tensor, names: Sequence[str], what: str = "data view",
                         part: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`weighted_grads` on the parameter tensors ``names`` only: ``(indices [m], W [m, Σ|p|])``,
        the columns those tensors' elements, in the order of ``names``.

        The other parameters enter as constants, so each per-sample backward stops at the layers
        of ``names`` (for the last layer it is nearly free). The same numbers as the columns of
        :meth:`weighted_grads`, at a fraction of its cost when ``names`` are a small part.
        """
        fm, layout, loss_fn = self.fm, self.fm.layout, self.loss_fn
        uniq, weights = step_samples(rec, what, fm.device, fm.dtype)
        if part is not None:
            lo, hi = _share(len(uniq), part)
            uniq, weights = uniq[lo:hi], weights[lo:hi]
        base = fm._params(theta)
        where = [layout.names.index(nm) for nm in names]
        sizes, shapes = [layout.numels[i] for i in where], [layout.shapes[i] for i in where]
        sel0 = torch.cat([theta[layout.slice(nm)] for nm in names])

        def value(sel: torch.Tensor, b: Any, e: Any) -> torch.Tensor:
            params = dict(base)
            for nm, piece, shape in zip(names, torch.split(sel, sizes), shapes):
                params[nm] = piece.view(shape)
            return loss_fn(b.call(fm.module, params), e).sum()

        size = sample_chunk(self.train_batch_size, len(uniq), max(1, sel0.numel()), fm.dtype)
        with functorch_friendly():
            for start in range(0, len(uniq), size):
                sl = slice(start, start + size)
                batch, target = self.train.batch(uniq[sl])
                ed = batched_dims(target, batch.n)
                try:
                    fn = batch.per_row(_lifted(grad(value), ed))
                    G = vmap(fn, in_dims=batch.dims + (None, ed))(batch.args, batch.kwargs, sel0, target)
                except Exception:  # a model vmap cannot handle: one backward per sample
                    G = torch.stack([self._one(value, sel0, batch, target, i) for i in range(batch.n)])
                yield uniq[sl], weights[sl].unsqueeze(1) * G

    @staticmethod
    def _one(value: Callable, sel0: torch.Tensor, batch: Any, target: Any, i: int) -> torch.Tensor:
        sel = sel0.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(value(sel, batch.row(i), take_rows(target, torch.tensor([i]), batch.n)), sel,
                                       allow_unused=True)
        return torch.zeros_like(sel0) if g is None else g

    def batch_grad(self, rec: StepRecord, theta: torch.Tensor, what: str = "data view",
                   part: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The replayed gradient ``Σ_k w_k ∇_θ ℓ_k`` [P] of the step's samples (of share ``part``),
        by batch backwards (no per-sample gradients)."""
        fm = self.fm
        uniq, weights = step_samples(rec, what, fm.device, fm.dtype)
        if part is not None:
            lo, hi = _share(len(uniq), part)
            uniq, weights = uniq[lo:hi], weights[lo:hi]
        g = torch.zeros(fm.layout.total, dtype=fm.dtype, device=fm.device)
        size = self._batch_chunk(theta, uniq)
        with functorch_friendly(), torch.enable_grad():
            for start in range(0, len(uniq), size):
                sl = slice(start, start + size)
                batch, target = self.train.batch(uniq[sl])
                th = theta.detach().requires_grad_(True)
                loss = (weights[sl] * self.loss_fn(fm.raw(th, batch), target)).sum()
                (gi,) = torch.autograd.grad(loss, th, allow_unused=True)
                if gi is not None:
                    g += gi
        return g

    def _batch_chunk(self, theta: torch.Tensor, uniq: torch.Tensor) -> int:
        """Samples per batch backward: a batch backward holds activations, not per-sample gradients,
        so as many as fit ``GRAD_CALL_BYTES`` of one sample's activations (measured once), and never
        fewer than a per-sample-gradient call (the caller's ``train_batch_size`` is kept as given).

        Fig. 4 of the Grokking study at p = 113 (4,000 pairs, 89k parameters): 118 backwards of 34
        samples per visited step before, 0.53 s; a handful now.
        """
        m = len(uniq)
        if self.train_batch_size is not None or m == 0:
            return max(self._chunk(m), 1)
        if self._act_bytes is None:
            # the increment from one sample to two: what is saved once per call (the weights a
            # matmul keeps for its backward) is not a per-sample cost
            one, _ = self.train.batch(uniq[:1])
            two, _ = self.train.batch(uniq[:2]) if m > 1 else (one, None)
            a1, a2 = activation_bytes(self.fm, theta, one), activation_bytes(self.fm, theta, two)
            self._act_bytes = max(1, a2 - a1 if m > 1 else a1)
        return max(self._chunk(m), min(m, GRAD_CALL_BYTES // self._act_bytes), 1)

    def project_restricted(self, rec: StepRecord, theta: torch.Tensor, directions: torch.Tensor,
                           group_slices: Sequence[Sequence[slice]], names: Sequence[str], what: str = "data view",
                           part: Optional[Tuple[int, int]] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`project` when the groups lie inside the parameter tensors ``names``: per-sample
        gradients of those alone (:meth:`restricted_grads`) and the replayed gradient of all
        parameters by batch backwards (:meth:`batch_grad`). Same arguments and returns as
        :meth:`project` (``group_slices`` in the flat θ, each inside ``names``)."""
        layout = self.fm.layout
        # the flat columns of names, and each group's slices moved to the restricted coordinates
        cols = torch.cat([torch.arange(layout.slice(nm).start, layout.slice(nm).stop, device=directions.device)
                          for nm in names])
        offset, pos = 0, {}
        for nm in names:
            sl = layout.slice(nm)
            pos[(sl.start, sl.stop)] = slice(offset, offset + sl.stop - sl.start)
            offset += sl.stop - sl.start
        local = [[pos[(sl.start, sl.stop)] for sl in group if sl.stop > sl.start] for group in group_slices]
        g_rep = self.batch_grad(rec, theta, what, part)
        idx, dots = [], []
        D = flush_subnormal(directions[:, cols])
        for indices, W in self.restricted_grads(rec, theta, names, what, part):
            W = flush_subnormal(W)
            dots.append(_group_dots(D, W, local))
            idx.append(indices)
        if not idx:
            return (torch.zeros(0, dtype=torch.int64),
                    torch.zeros(directions.shape[0], 0, len(local), dtype=directions.dtype, device=directions.device),
                    g_rep)
        return torch.cat(idx), torch.cat(dots, dim=1), g_rep


class CoupledGrads(TrainGrads):
    """Rows of the Jacobian of each recorded micro-batch's per-sample loss vector, forwarded as
    training forwarded it (train-mode normalization, replayed dropout).

    Args: as :class:`TrainGrads`, plus

        modes (TrainingModes): which modules ran in train mode.
    """

    name = "coupled"

    def __init__(self, fm: FunctionalModel, train: TrainingSet, loss_fn: Callable,
                 train_batch_size: Optional[int] = None, modes: Optional[TrainingModes] = None) -> None:
        super().__init__(fm, train, loss_fn, train_batch_size)
        self.modes = modes if modes is not None else TrainingModes()
        self._loop = False  # vmap over the one-hot cotangents failed once: loop from then on

    def weighted_grads(self, rec: StepRecord, theta: torch.Tensor, what: str = "data view",
                       part: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        step_samples(rec, what, self.fm.device, self.fm.dtype)  # the named error for a step without samples
        for mb in rec.batches:
            if mb.indices.numel() == 0:
                continue
            w = mb.weights.to(device=self.fm.device, dtype=self.fm.dtype)
            # a share of each micro-batch's Jacobian rows: every part runs the (coupled) forward,
            # and only its own vector–Jacobian products
            share = None if part is None else _share(int(mb.indices.numel()), part)
            if share is not None and share[0] == share[1]:
                continue
            for rows, J in self.jacobian(mb, theta, share):
                yield mb.indices[rows.cpu()], w[rows].unsqueeze(1) * J

    def loss_vector(self, flat: torch.Tensor, mb: MicroBatch, batch: Any, target: Any) -> torch.Tensor:
        """The micro-batch's per-sample losses ``[B]`` at θ = ``flat``, forwarded as in training."""
        fm = self.fm
        params = fm.layout.split(flat)
        params.update(fm.fixed)
        with _rng_replayed(mb, fm.device) as replay, training_forward(fm.module, self.modes, replay):
            return self.loss_fn(batch.call(fm.module, params), target)

    def jacobian(self, mb: MicroBatch, theta: torch.Tensor, share: Optional[Tuple[int, int]] = None
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(rows, J[rows])`` chunks of the Jacobian ``∂ℓ_r/∂θ`` [B, P] of micro-batch ``mb``
        (only rows ``share = (lo, hi)`` when given)."""
        batch, target = self.train.batch(mb.indices)
        B = batch.n
        with functorch_friendly():
            # vjp is typed as returning 2 or 3 values (3 with has_aux=True); here it is 2
            losses, pull = vjp(lambda th: self.loss_vector(th, mb, batch, target), theta)  # type: ignore[misc]
            if losses.shape != (B,):
                raise ValueError(f"loss_fn must return one loss per sample ([{B}]), got {tuple(losses.shape)}")
            eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
            lo, hi = (0, B) if share is None else share
            size = self._chunk(hi - lo)
            for start in range(lo, hi, size):
                rows = torch.arange(start, min(hi, start + size), device=losses.device)
                yield rows, self._rows(pull, eye[rows])

    def _rows(self, pull: Callable, cotangents: torch.Tensor) -> torch.Tensor:
        if not self._loop:
            try:
                return vmap(pull)(cotangents)[0]
            except Exception:  # an op without a batching rule in the backward: one vjp per row
                self._loop = True
        return torch.stack([pull(c)[0] for c in cotangents])


def select_train_grads(epk: "ExactPathKernel", train: TrainingSet, loss_fn: Callable,
                       choice: Optional[str] = None) -> TrainGrads:
    """The gradient computer for the data and similarity views of ``epk``'s recording.

    Args:
        epk (ExactPathKernel): the core (functional model, trajectory, options).
        train (TrainingSet): training samples. loss_fn (Callable): per-sample loss.
        choice (str, optional): ``"independent"``, ``"coupled"`` or ``"auto"``; default
            ``epk.options.train_grads``. ``"auto"`` is ``"coupled"`` when training ran
            normalization modules in train mode (batch statistics) or recorded the RNG states that
            replay its dropout masks, else ``"independent"``.

    Returns:
        *TrainGrads*
    """
    choice = choice if choice is not None else getattr(epk.options, "train_grads", "auto")
    size = epk.options.train_batch_size
    modes = training_modes(epk.trajectory, epk.model)
    replayable = _has_rng_states(epk)
    if modes.dropout and not replayable:
        # Without the RNG states the masks of training cannot be rebuilt: say which modules, and
        # let the data view's residual measure what the replay misses (never folded into scores).
        names = ", ".join(modes.dropout[:6]) + (", ..." if len(modes.dropout) > 6 else "")
        warnings.warn(
            f"dropout ran in train mode during training ({names}) but the recording holds no RNG states "
            "(record_rng was off), so its masks cannot be replayed: per-sample gradients are taken without "
            "dropout and the mismatch with the recorded updates is reported in the residual",
            RuntimeWarning,
            stacklevel=4,
        )
    if choice == "auto":
        coupled = bool(modes.batch_norm) or (bool(modes.dropout) and replayable)
        choice = "coupled" if coupled else "independent"
    if choice == "independent":
        return IndependentGrads(epk.functional, train, loss_fn, size)
    if choice == "coupled":
        return CoupledGrads(epk.functional, train, loss_fn, size, modes)
    raise ValueError(f"train_grads must be 'auto', 'independent' or 'coupled', got {choice!r}")


def flush_subnormal(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its subnormal entries (|x| < ``finfo.tiny``) set to zero, for a product.

    Per-sample loss gradients of well-fit samples hold many subnormal numbers (softmax
    probabilities below 1e-38 in float32), and CPU matrix products slow down ~50× on them (measured
    on the Grokking study's decoder gradients: 7 % subnormal, 8.7 s → 0.16 s). Each flushed entry
    is below ``tiny`` (1.2e-38 in float32, 2.2e-308 in float64), so a product changes by less than
    ``tiny · Σ|other factor|``: far below the round-off of any result that is not itself subnormal.
    """
    if not t.is_floating_point():
        return t
    if t.device.type == "cpu" and torch.get_num_threads() == 1 and _fpu_flushes():
        # Inside :func:`subnormals_flushed` on one thread the FPU reads subnormal inputs as zero
        # (DAZ), so the product is already what it would be on the flushed tensor; the explicit
        # flush would cost two passes over a [samples, parameters] tensor (31 % of a Fig. 4 step).
        # Intra-op worker threads do not share the calling thread's mode: then flush explicitly.
        return t
    return t.masked_fill(t.abs() < torch.finfo(t.dtype).tiny, 0)


def _fpu_flushes() -> bool:
    """Whether this thread's arithmetic treats subnormal inputs as zero (``torch.set_flush_denormal``)."""
    probe = torch.tensor([1e-39], dtype=torch.float32)
    return bool((probe * 1.0).item() == 0.0)


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """CPU arithmetic with subnormal inputs and results taken as zero (``torch.set_flush_denormal``)
    for the duration; the previous mode is restored on exit.

    A reverse sweep's accumulators decay by β per step (to 1e-19 of their peak before they are
    dropped), and gradients of well-fit samples hold softmax probabilities below 1e-38: in float32
    many entries are subnormal, and every CPU operation on them is ~10–100× slower. Flushing
    changes each result by less than ``finfo.tiny`` (1.2e-38 in float32, 2.2e-308 in float64).
    """
    was = _fpu_flushes()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def _lifted(fn: Callable, ed: Any) -> Callable:
    """``fn(sel, b, e)`` called per row as ``(b, sel, e)``, the row's target lifted back to a batch of one."""
    return lambda b, sel, e: fn(sel, b, lift_rows(e, ed))


def _share(m: int, part: Tuple[int, int]) -> Tuple[int, int]:
    """``(lo, hi)``: the contiguous share ``part = (index, count)`` of ``m`` items (:func:`distributed.shard`)."""
    rows = distributed.shard(range(m), *part)
    return (rows[0], rows[-1] + 1) if rows else (0, 0)


def _has_rng_states(epk: "ExactPathKernel") -> bool:
    rec = epk.trajectory.record(1)
    return any(getattr(mb, "rng_state", None) is not None or getattr(mb, "cuda_rng_state", None) is not None
               for mb in rec.batches)


def _param_dots(directions: torch.Tensor, per: Dict[str, torch.Tensor], layout: Any,
                groups: Sequence[Sequence[slice]], g_rep: torch.Tensor) -> torch.Tensor:
    """:func:`_group_dots` of per-parameter rows ``per`` (``name → [m, numel]``, in the flat
    order): each group's slices cut at the parameters' bounds; their sums added to ``g_rep``."""
    m = next(iter(per.values())).shape[0]
    out = torch.zeros(directions.shape[0], m, len(groups), dtype=directions.dtype, device=directions.device)
    for name, W in per.items():
        ps = layout.slice(name)
        g_rep[ps] += W.sum(0)
        W = flush_subnormal(W)
        for gi, group in enumerate(groups):
            for gs in group:
                a, b = max(gs.start, ps.start), min(gs.stop, ps.stop)
                if a < b:
                    out[:, :, gi] += directions[:, a:b] @ W[:, a - ps.start : b - ps.start].T
    return out


def _group_dots(directions: torch.Tensor, W: torch.Tensor, groups: Sequence[Sequence[slice]]) -> torch.Tensor:
    """``[D, m, G]``: per group, ``directions[:, g] · W[:, g]`` summed over the group's slices."""
    zero = torch.zeros(directions.shape[0], W.shape[0], dtype=W.dtype, device=W.device)
    return torch.stack([sum((directions[:, gs] @ W[:, gs].T for gs in group), zero) for group in groups], dim=-1)
