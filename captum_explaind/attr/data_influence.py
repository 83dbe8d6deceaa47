"""Data view: the exact influence of every training sample on a prediction."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import torch
from captum.influence import DataInfluence
from captum.log import log_usage
from torch.utils.data import DataLoader

from ..epk import checks
from ..epk.batch import Batch
from ..epk.data_view import data_view
from ..epk.options import EPKOptions
from ..epk.outputs import OutputFn
from ..epk.results import DataDecomposition
from ..epk.selection import resolve_groups
from ..epk.target import TargetType, resolve_target
from ..epk.training_set import LABEL_KEYS, TrainingSet, check_loss_fn, check_train_batch_size
from ..epk.updates import UpdateModel
from ..epk.windows import StepsType, parse_windows
from ..errors import UnsupportedOptimizerError
from ..recording.trajectory import Trajectory
from ._base import EPKAttribution
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


def _check_order(trajectory: Any, train_dataset: Any) -> None:
    """Captum's ``TracInCP(model, train_dataset, checkpoints, ...)`` puts the data second; here the
    trajectory is second. Name the swap instead of failing somewhere inside."""
    run = (Trajectory, str, os.PathLike)
    if isinstance(train_dataset, run) and not isinstance(trajectory, run):
        raise TypeError(
            "TrainingDataInfluence(model, trajectory, train_dataset, loss_fn): the trajectory comes second and "
            "the training data third (Captum's TracInCP takes train_dataset second); swap the two arguments"
        )


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
    so it drops in where ``TracInCP`` is used (differences: the constructor takes the trajectory
    second and the data third; scores are contributions to the label's *output*, not products of
    loss gradients; ``reduction="sum"`` losses are used per sample with the recorded weighting).

    Args:
        model (nn.Module): an instance of the trained architecture.
        trajectory (Trajectory or path): the recorded run (SGD, Adam or AdamW families; Adam
            needs its recorded ``exp_avg_sq``).
        train_dataset (Dataset or DataLoader): the training set the recorder's indices refer to;
            items are ``(*inputs, label)`` tuples or Mappings (tokenized rows; passed by keyword).
        loss_fn (Callable, optional): per-sample training loss ``loss_fn(outputs, target) ->
            [m]``: ``outputs`` is the raw model output, ``target`` the labels (tuple items) or
            the collated batch (Mapping items). A ``torch.nn`` loss with ``reduction="sum"`` or
            ``"mean"`` is used per sample. Default: cross-entropy of the logits.
        collate_fn (Callable, optional): rebuilds a recorded micro-batch from its items (e.g. the
            padding collator training used). Default: the DataLoader's, else ``default_collate``.
        label_keys (sequence of str, optional): Mapping entries that are labels, not model
            inputs. Default: ``("labels", "label", "label_ids")``
        train_batch_size (int, optional): training samples per per-sample-gradient call (memory
            control; also an option). Default: calls of at most ~24 MiB of gradients.
        options (EPKOptions or str, optional), output_fn (Callable, optional), **overrides: how to
            compute and what to explain, as for :class:`~captum_explaind.ExactPathKernel`.

    Cost: per step, ``nodes`` batched backward passes over the test inputs (their target
    gradients) plus one per-sample gradient pass over the step's batch and a matrix product
    ``[n_inputs, P] × [P, |B|]``; the same order as one TracInCP checkpoint restricted to the batch.

    Examples::

        >>> tdi = TrainingDataInfluence(model, trajectory, train_set)
        >>> scores, delta = tdi.attribute(x_test, target=y_test, return_convergence_delta=True)
        >>> top = tdi.influence((x_test, y_test), k=5)          # Captum's DataInfluence API
        >>> parts = tdi.explain(x_test, target=y_test)          # + regularization, residual, options
    """

    def __init__(
        self,
        model: torch.nn.Module,
        trajectory: Union[Trajectory, str, os.PathLike],
        train_dataset: Any,
        loss_fn: Optional[Callable] = None,
        *,
        collate_fn: Optional[Callable] = None,
        label_keys: Sequence[str] = LABEL_KEYS,
        train_batch_size: Optional[int] = None,
        options: Union[EPKOptions, str, None] = None,
        output_fn: Optional[OutputFn] = None,
        **overrides: Any,
    ) -> None:
        _check_order(trajectory, train_dataset)
        if train_batch_size is not None:
            overrides["train_batch_size"] = check_train_batch_size(train_batch_size)
        EPKAttribution.__init__(self, model, trajectory, options, output_fn=output_fn, **overrides)
        traj = self.epk.trajectory
        if traj.family == "other":
            raise UnsupportedOptimizerError(
                f"the data view needs an exact per-sample form of the update, which optimizer "
                f"{traj.optimizer_class} does not have (supported: torch.optim.SGD, Adam, AdamW); the "
                "model and training views (ParameterInfluence, StepInfluence) work with any optimizer"
            )
        # Fails now, with a clear message, if Adam's second moment was not recorded.
        UpdateModel(traj, self.epk.layout, device=self.epk.device, dtype=self.epk.dtype, need_precond=True)
        self.train_dataset = train_dataset
        self.train = TrainingSet(train_dataset, self.epk.functional, collate_fn, label_keys)
        self._check_indices()
        with checks.named_errors("train_dataset / loss_fn"):  # the user's data and loss, probed on 2 samples
            checks.check_loss_arg(loss_fn)
            self.loss_fn = check_loss_fn(loss_fn, self.epk.functional, self.epk.theta(0), self.train)

    @property
    def train_batch_size(self) -> Optional[int]:
        return self.epk.options.train_batch_size

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
    def explain(
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
            inputs (Tensor, tuple, Mapping or pytree): test inputs, example axis first.
            target (optional): Captum's target on the explained output; ``None`` sums over
                outputs. Default: None
            additional_forward_args (optional): extra arguments for the test forward.
            layers (optional): split the scores over parameter groups (a last axis). The
                groups must be disjoint; parameters in no group get no per-sample scores, their
                share summed over the training samples is ``other`` (exact, from each step's
                replayed batch gradient — with independent samples only the grouped parameters'
                per-sample gradients are formed, so a small group, e.g. the last layer, is cheap).
            steps (int, range, slice or list, optional): restrict to a window of steps, or give
                several windows (a window axis after the training axis; with application indexing
                they may overlap, one sweep serves them all, and ``result.window(k)`` is window k's
                own decomposition). Default: all steps
            indexing (str, optional): ``"application"`` (default; the paper's): a window holds
                the updates *applied* in it, including momentum-carried gradients of earlier
                steps; ``"gradient"``: a window holds the gradients *computed* in it, credited for
                every later update they enter (windows must then partition the run). Totals
                agree; per-window slices differ under momentum.

        Returns:
            *DataDecomposition* (with its axes, the options used and the sweep statistics)
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
        batch, tgt = self._prepare(inputs, target, additional_forward_args)
        groups = None if layers is None else resolve_groups(self.model, layers)
        view = data_view(self.epk, batch.n, tgt, self.train, self.loss_fn, windows, indexing, groups,
                         self.train_batch_size)
        return view.result(view.run(batch), multi)

    #: the name this method had before results carried their options (same method)
    decompose = explain

    @overload
    def attribute(self, inputs: Any, target: TargetType = ..., additional_forward_args: Any = ...,
                  layers: LayersType = ..., steps: StepsType = ..., *, return_convergence_delta: Literal[True],
                  indexing: str = ...) -> Tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def attribute(self, inputs: Any, target: TargetType = ..., additional_forward_args: Any = ...,
                  layers: LayersType = ..., steps: StepsType = ..., return_convergence_delta: Literal[False] = ...,
                  indexing: str = ...) -> torch.Tensor: ...

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
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        r"""Signed influence of every training sample: ``[n_inputs, n_train]``.

        Args: as :meth:`explain`, plus

            return_convergence_delta (bool, optional): also return, per input, ``f(θ_N) − f(θ_0)
                − Σ scores − regularization − residual − buffers`` for the target (over the
                selected steps; ``buffers``: BatchNorm running statistics, see :meth:`explain`).

        Returns:
            *Tensor* **attributions** ``[n_inputs, n_train]`` (plus window/group axes), or
            ``(attributions, delta)``. :meth:`explain` returns the regularization and residual
            parts beside the scores.
        """
        res = self.explain(inputs, target, additional_forward_args, layers, steps, indexing)
        self._note_buffers(res.buffers, res.change)
        if return_convergence_delta:
            return res.scores, res.delta
        return res.scores

    # ------------------------------------------------------------------ Captum's DataInfluence
    def _labelled(self, inputs: Any) -> Tuple[Any, List[Any]]:
        """Model inputs and per-example targets from ``(*inputs, labels)`` or a DataLoader of those."""
        if isinstance(inputs, DataLoader):
            parts = [self._labelled(b) for b in inputs]
            if not parts:
                raise ValueError("the inputs DataLoader yields no batch")
            batch = self.epk.prepare_inputs(parts[0][0], what="inputs")
            for x, _ in parts[1:]:
                batch = batch.concat(self.epk.prepare_inputs(x), what="a later batch of the DataLoader")
            return batch, [t for _, ts in parts for t in ts]
        if isinstance(inputs, Mapping):
            x = {k: v for k, v in inputs.items() if k not in self.train.label_keys}
            return x, _as_targets(self._label_entry(inputs))
        if not isinstance(inputs, (tuple, list)) or len(inputs) < 2:
            raise TypeError("inputs must be a tuple (*model_inputs, labels) or a DataLoader of those, as for "
                            "Captum's TracInCP")
        *x, labels = inputs
        return (tuple(x) if len(x) > 1 else x[0]), _as_targets(labels)

    def _label_entry(self, batch: Mapping) -> Any:
        """The labels of a Mapping batch: its first entry named in ``label_keys``."""
        key = next((k for k in self.train.label_keys if k in batch), None)
        if key is None:
            raise TypeError(f"a Mapping batch needs a label entry (one of {self.train.label_keys}) for influence()")
        return batch[key]

    @overload  # type: ignore[override]
    def influence(self, inputs: Any = ..., k: None = ..., proponents: bool = ..., show_progress: bool = ...,
                  aggregate: bool = ...) -> torch.Tensor: ...

    @overload
    def influence(self, inputs: Any = ..., *, k: int, proponents: bool = ..., show_progress: bool = ...,
                  aggregate: bool = ...) -> "KMostInfluentialResults": ...

    @overload
    def influence(self, inputs: Any, k: int, proponents: bool = ..., show_progress: bool = ...,
                  aggregate: bool = ...) -> "KMostInfluentialResults": ...

    @log_usage()
    def influence(  # type: ignore[override]
        self,
        inputs: Any = None,
        k: Optional[int] = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Union[torch.Tensor, "KMostInfluentialResults"]:
        r"""Captum's ``DataInfluence.influence``: the labels are the target.

        Args:
            inputs (tuple or DataLoader): ``(*model_inputs, labels)``, or a DataLoader yielding
                such batches (or Mappings with a label entry); the influence is on the output of
                each test example's label.
            k (int, optional): return only the ``k`` most influential training samples.
            proponents (bool, optional): with ``k``, the most positive (True) or most negative
                (False) scores. Default: True
            show_progress (bool, optional): progress bar. Default: False
            aggregate (bool, optional): sum the scores over the test examples (``[1, n_train]``),
                as Captum's ``aggregate=True``. Default: False

        Returns:
            *Tensor* ``[n_inputs, n_train]`` scores, or *KMostInfluentialResults* with ``k``.
        """
        x, labels = self._labelled(inputs)
        batch = x if isinstance(x, Batch) else self.epk.prepare_inputs(x)
        tgt = resolve_target(labels, batch.n, self.epk.output_shape(batch))
        view = data_view(self.epk, batch.n, tgt, self.train, self.loss_fn, [range(1, self.epk.num_steps + 1)],
                         "application", None, self.train_batch_size)
        scores = view.result(view.run(batch, show_progress=show_progress or None), False).scores
        if aggregate:
            scores = scores.sum(dim=0, keepdim=True)
        if k is None:
            return scores
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= scores.shape[1]:
            raise ValueError(f"k must be an int in 1..{scores.shape[1]}, got {k!r}")
        vals, idx = torch.topk(scores, k, dim=1, largest=proponents)
        return KMostInfluentialResults(idx, vals)

    @log_usage()
    def self_influence(self, inputs: Any = None, show_progress: bool = False, chunk: int = 64, *,
                       outer_loop_by_checkpoints: bool = False) -> torch.Tensor:
        r"""Each training sample's influence on its own prediction (Captum's ``self_influence``).

        The score of sample k on the output of its own label, computed exactly for all samples
        in chunks of ``chunk`` test inputs (one reverse sweep each).

        Args:
            inputs (optional): ``None`` for the training set itself (as in Captum); otherwise
                ``(*inputs, labels)`` or a DataLoader, whose i-th example is taken to be training
                sample i.
            show_progress (bool, optional): progress bar. Default: False
            chunk (int, optional): test inputs per sweep (memory ``chunk × (P + n_train)``).
            outer_loop_by_checkpoints (bool, optional): accepted for ``TracInCP`` compatibility;
                no effect (one reverse sweep over the steps per chunk either way).

        Returns:
            *Tensor* ``[n]``.
        """
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            hint = (" (TracInCP's third argument outer_loop_by_checkpoints is keyword-only here)"
                    if isinstance(chunk, bool) else "")
            raise TypeError(f"chunk must be a positive int, got {chunk!r}{hint}")
        if inputs is None:
            n = len(self.train)
            out = []
            for start in range(0, n, chunk):
                idx = torch.arange(start, min(n, start + chunk))
                batch, target = self.train.batch(idx)
                labels = target if isinstance(target, torch.Tensor) else self._label_entry(target)
                out.append(self._self_scores(batch, _as_targets(labels), idx, show_progress))
            return torch.cat(out)
        x, labels = self._labelled(inputs)
        batch = x if isinstance(x, Batch) else self.epk.prepare_inputs(x)
        return self._self_scores(batch, labels, torch.arange(batch.n), show_progress)

    def _self_scores(self, batch: Batch, labels: List[Any], idx: torch.Tensor, show_progress: bool) -> torch.Tensor:
        if int(idx.max()) >= len(self.train):
            raise ValueError(f"self_influence got {batch.n} examples but the training set has {len(self.train)}")
        tgt = resolve_target(labels, batch.n, self.epk.output_shape(batch))
        view = data_view(self.epk, batch.n, tgt, self.train, self.loss_fn, [range(1, self.epk.num_steps + 1)],
                         "application", None, self.train_batch_size)
        scores = view.result(view.run(batch, show_progress=show_progress or None), False).scores
        return scores.gather(1, idx.to(scores.device).unsqueeze(1)).squeeze(1)

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
        a = self.attribute(inputs, target=target, **kwargs)
        a = a.reshape(a.shape[0], -1)
        if others is None:
            b = a
        else:
            b = self.attribute(others, target=target if other_target is None else other_target, **kwargs)
            b = b.reshape(b.shape[0], -1)
        return _cosine(a, b)


def _as_targets(labels: Any) -> List[Any]:
    if isinstance(labels, torch.Tensor):
        return labels.reshape(-1).tolist() if labels.dim() <= 1 else [tuple(r) for r in labels.tolist()]
    return list(labels)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = a.norm(dim=1, keepdim=True)
    nb = b.norm(dim=1, keepdim=True)
    return (a @ b.T) / (na * nb.T).clamp_min(torch.finfo(a.dtype).tiny)
