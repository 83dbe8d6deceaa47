"""Data view: the exact influence of every training sample on a prediction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Union

import torch
from captum.influence import DataInfluence
from captum.log import log_usage

from ..epk.selection import resolve_groups
from ..epk.updates import UpdateModel
from ..errors import UnsupportedOptimizerError
from ..recording.trajectory import Trajectory
from ._base import EPKAttribution
from ._data_view import DataView
from ._steps import StepsType, parse_windows
from ._target import TargetType
from ._train_data import TrainingSet, check_loss_fn, check_train_batch_size
from .parameter_influence import LayersType

__all__ = ["TrainingDataInfluence", "DataDecomposition", "KMostInfluentialResults"]


class KMostInfluentialResults(NamedTuple):
    """Top-k training samples per test input (same fields as Captum's result type).

    Attributes:
        indices (Tensor): ``[n_inputs, k]`` training-set indices.
        influence_scores (Tensor): ``[n_inputs, k]`` their scores, sorted descending for
            proponents and ascending for opponents.
    """

    indices: torch.Tensor
    influence_scores: torch.Tensor


@dataclass
class DataDecomposition:
    r"""A prediction's change over the selected steps, split over training samples.

    ``change = scores.sum(training axis and any window/group axes) + regularization + residual + delta``

    Attributes:
        scores (Tensor): ``[n_inputs, n_train]`` signed influence of each training sample
            (positive: pushed the target output up), with a window axis (``[n, n_train, W]``)
            for a list of windows and a group axis last for ``layers``.
        regularization (Tensor): ``[n_inputs]`` part of the change due to weight decay.
        residual (Tensor): ``[n_inputs]`` part of the recorded updates the replay does not
            explain (``Σ_s φ_s·E_s``, E_s = Δ_s − K_s − R_s): round-off for deterministic
            training with a supported optimizer; large under dropout or a mismatched loss.
        change (Tensor): ``[n_inputs]`` exact change of the target output over the selected steps.
        delta (Tensor): ``[n_inputs]`` convergence delta (quadrature error).
        grad_scale (dict[int, float]): per step, the global gradient scale measured at replay.
        windows (list[range]): the step windows; ``indexing`` says how steps were assigned.
    """

    scores: torch.Tensor
    regularization: torch.Tensor
    residual: torch.Tensor
    change: torch.Tensor
    delta: torch.Tensor
    grad_scale: Dict[int, float] = field(default_factory=dict)
    windows: List[range] = field(default_factory=list)
    indexing: str = "application"


class TrainingDataInfluence(EPKAttribution, DataInfluence):
    r"""Exact influence of every training sample on a prediction (ExPLAIND's data view).

    For test input x and target output j, training sample k receives

    .. math::

        Ψ(x, k) = \sum_s Φ_s(x)_j · Δ_s^{(k)},

    the part of the prediction's change carried by sample k's loss gradients through every later
    update (momentum included, loss gradients kept inside the momentum sum, replayed at
    θ_{i−1} with the recorded batch weights and the measured gradient scale). Scores add up:
    ``Σ_k Ψ(x, k) + regularization + residual + delta = f_j(θ_N; x) − f_j(θ_0; x)``.

    The computation runs backwards over the steps with one accumulator per test input (memory
    ``n_inputs × P``, never one buffer per training sample) and touches at each step only the
    samples of that step's batch. It also answers Captum's ``DataInfluence.influence`` contract,
    so it drops in where ``TracInCP`` is used.

    Args:
        model (nn.Module): an instance of the trained architecture.
        trajectory (Trajectory or path): the recorded run (SGD, Adam or AdamW families; Adam
            needs its recorded ``exp_avg_sq``).
        train_dataset (Dataset or DataLoader): the training set the recorder's indices refer to;
            ``train_dataset[i]`` is ``(*inputs, label)``.
        loss_fn (Callable, optional): per-sample training loss ``loss_fn(outputs, labels) ->
            [m]`` (``reduction="none"``). Default: cross-entropy, which is also NLL for
            log-probability outputs.
        train_batch_size (int, optional): training samples per per-sample-gradient call (memory
            control). Default: a whole step's batch, in chunks of at most ~256 MiB of
            per-sample gradients, so peak memory does not grow with the batch.
        **options: options of :class:`~captum_explaind.ExactPathKernel` (``quadrature`` incl.
            ``"left"``, ``nodes``, error control, ``dtype``, ``device``, ``batch_size``,
            ``show_progress``).

    Cost: per step, ``nodes`` batched backward passes over the test inputs (their target
    gradients) plus one per-sample gradient pass over the step's batch and a matrix product
    ``[n_inputs, P] × [P, |B|]``; the same order as one TracInCP checkpoint restricted to the batch.

    Examples::

        >>> tdi = TrainingDataInfluence(model, trajectory, train_set, dtype=torch.float64)
        >>> scores, delta = tdi.attribute(x_test, target=y_test, return_convergence_delta=True)
        >>> top = tdi.influence((x_test, y_test), k=5)          # Captum's DataInfluence API
    """

    def __init__(
        self,
        model: torch.nn.Module,
        trajectory: Union[Trajectory, str, os.PathLike],
        train_dataset: Any,
        loss_fn: Optional[Callable] = None,
        *,
        train_batch_size: Optional[int] = None,
        **options: Any,
    ) -> None:
        EPKAttribution.__init__(self, model, trajectory, **options)
        traj = self.epk.trajectory
        if traj.family == "other":
            raise UnsupportedOptimizerError(
                f"the data view needs an exact per-sample form of the update, which optimizer "
                f"{traj.optimizer_class} does not have (supported: torch.optim.SGD, Adam, AdamW); the "
                "model and training views (ParameterInfluence, StepInfluence) work with any optimizer"
            )
        # Fails now, with a clear message, if Adam's second moment was not recorded.
        UpdateModel(traj, self.epk.layout, device=self.epk.device, dtype=self.epk.dtype, need_precond=True)
        self.train_batch_size = check_train_batch_size(train_batch_size)
        self.train_dataset = train_dataset
        self.train = TrainingSet(train_dataset, self.epk.functional)
        self._check_indices()
        self.loss_fn = check_loss_fn(loss_fn, self.epk.functional, self.epk.theta(0), self.train)
        self.last_decomposition_: Optional[DataDecomposition] = None

    def _check_indices(self) -> None:
        n = len(self.train)
        for rec in self.epk.trajectory.records():
            for b in rec.batches:
                if b.indices.numel() and int(b.indices.max()) >= n:
                    raise ValueError(
                        f"train_dataset has {n} samples but step {rec.step} of the trajectory used "
                        f"sample index {int(b.indices.max())}; pass the dataset the recorder's indices refer to"
                    )

    @log_usage()
    def decompose(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        layers: LayersType = None,
        steps: StepsType = None,
        indexing: str = "application",
    ) -> DataDecomposition:
        r"""Per-training-sample scores with the regularization, residual and delta beside them.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): test inputs, dim 0 = examples.
            target (optional): Captum's target; ``None`` sums over outputs. Default: None
            additional_forward_args (optional): extra arguments for the test forward.
            layers (optional): split the scores over parameter groups (a last axis).
            steps (int, range, slice or list, optional): restrict to a window of steps, or give
                several windows (a window axis after the training axis). Default: all steps
            indexing (str, optional): ``"application"`` (default; the paper's): a window holds
                the updates *applied* in it, including momentum-carried gradients of earlier
                steps; ``"gradient"``: a window holds the gradients *computed* in it, credited for
                every later update they enter (windows must then partition the run). Totals
                agree; per-window slices differ under momentum.

        Returns:
            *DataDecomposition*
        """
        if indexing not in ("application", "gradient"):
            raise ValueError(f"indexing must be 'application' or 'gradient', got {indexing!r}")
        N = self.epk.num_steps
        windows, multi = parse_windows(steps, N)
        if indexing == "gradient":
            covered = sorted(s for r in windows for s in r)
            if covered != list(range(1, N + 1)):
                raise ValueError(
                    "with indexing='gradient' the windows must partition all steps 1..N: a gradient "
                    "computed at step i is credited for every later update it enters"
                )
        x, a, n, tgt = self._prepare(inputs, target, additional_forward_args)
        groups = None if layers is None else resolve_groups(self.model, layers)
        view = DataView(self.epk, n, tgt, self.train, self.loss_fn, windows, indexing, groups, self.train_batch_size)
        self.epk.sweep_reverse(x, a, n, view, last=view.last, integrate=view.integrate_steps, need_precond=True,
                               desc="training data")
        scores = view.scores
        reg = view.regularization.sum(dim=1)
        residual = view.path - scores.sum(dim=(1, 2, 3)) - reg
        delta = view.exact - view.path
        if not multi:
            scores = scores[:, :, 0]
        if groups is None:
            scores = scores[..., 0]
        result = DataDecomposition(scores, reg, residual, view.exact, delta, dict(sorted(view.grad_scale.items())),
                                   windows, indexing)
        self.last_decomposition_ = result
        return result

    @log_usage()
    def attribute(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        layers: LayersType = None,
        steps: StepsType = None,
        return_convergence_delta: bool = False,
        indexing: str = "application",
    ) -> Any:
        r"""Signed influence of every training sample: ``[n_inputs, n_train]``.

        Args: as :meth:`decompose`, plus

            return_convergence_delta (bool, optional): also return, per input, ``f(θ_N) − f(θ_0)
                − Σ scores − regularization − residual`` for the target (over the selected steps).

        Returns:
            *Tensor* **attributions** ``[n_inputs, n_train]`` (plus window/group axes), or
            ``(attributions, delta)``. The regularization and residual parts are in
            ``self.last_decomposition_``.
        """
        res = self.decompose(inputs, target, additional_forward_args, layers, steps, indexing)
        if return_convergence_delta:
            return res.scores, res.delta
        return res.scores

    @log_usage()
    def influence(  # type: ignore[override]
        self,
        inputs: Any = None,
        k: Optional[int] = None,
        proponents: bool = True,
        show_progress: bool = False,
    ) -> Any:
        r"""Captum's ``DataInfluence.influence``: the labels are the target.

        Args:
            inputs (tuple): ``(*model_inputs, labels)``; the influence is on the output of each
                test example's label.
            k (int, optional): return only the ``k`` most influential training samples.
            proponents (bool, optional): with ``k``, the most positive (True) or most negative
                (False) scores. Default: True
            show_progress (bool, optional): progress bar. Default: False

        Returns:
            *Tensor* ``[n_inputs, n_train]`` scores, or *KMostInfluentialResults* with ``k``.
        """
        if not isinstance(inputs, (tuple, list)) or len(inputs) < 2:
            raise TypeError("inputs must be a tuple (*model_inputs, labels), as for Captum's TracInCP")
        *x, labels = inputs
        if isinstance(labels, torch.Tensor):
            labels = labels.reshape(-1).tolist() if labels.dim() <= 1 else [tuple(r) for r in labels.tolist()]
        saved = self.epk.show_progress
        self.epk.show_progress = show_progress or saved
        try:
            scores = self.attribute(tuple(x) if len(x) > 1 else x[0], target=list(labels))
        finally:
            self.epk.show_progress = saved
        if k is None:
            return scores
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= scores.shape[1]:
            raise ValueError(f"k must be an int in 1..{scores.shape[1]}, got {k!r}")
        vals, idx = torch.topk(scores, k, dim=1, largest=proponents)
        return KMostInfluentialResults(idx, vals)

    def data_similarity(self, inputs: Any, others: Any = None, target: TargetType = None,
                        other_target: TargetType = None, **kwargs: Any) -> torch.Tensor:
        r"""Data-perspective similarity: cosine of two predictions' per-training-sample scores.

        Args:
            inputs, others: test inputs; ``others=None`` compares ``inputs`` with themselves.
            target, other_target: targets of each (``other_target`` defaults to ``target``).
            **kwargs: ``layers``, ``steps``, ``additional_forward_args`` of :meth:`attribute`
                (applied to both).

        Returns:
            *Tensor* ``[n_inputs, n_others]``.
        """
        a = self.attribute(inputs, target=target, **kwargs).reshape(_n(inputs), -1)
        if others is None:
            b = a
        else:
            b = self.attribute(others, target=target if other_target is None else other_target, **kwargs)
            b = b.reshape(b.shape[0], -1)
        return _cosine(a, b)


def _n(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    return int(first.shape[0])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = a.norm(dim=1, keepdim=True)
    nb = b.norm(dim=1, keepdim=True)
    return (a @ b.T) / (na * nb.T).clamp_min(torch.finfo(a.dtype).tiny)
