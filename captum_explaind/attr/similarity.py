"""Similarity view: how alike two predictions are "from the model's perspective" (Def. 4.4).

The statistic and its factorization live in :mod:`captum_explaind.epk.similarity_view`; this is
the Captum-facing class.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from captum.log import log_usage

from ..epk import checks
from ..epk.options import EPKOptions
from ..epk.outputs import OutputFn
from ..epk.results import SimilarityResult
from ..epk.selection import resolve_parameters
from ..epk.similarity_view import SimilarityView, cosine_from_gram
from ..epk.target import Target, TargetType
from ..epk.training_set import LABEL_KEYS, TrainingSet, check_loss_fn, check_train_batch_size
from ..epk.updates import UpdateModel
from ..epk.windows import StepsType, parse_windows
from ..errors import UnsupportedOptimizerError
from ..recording.trajectory import Trajectory
from ._base import EPKAttribution

__all__ = ["PredictionSimilarity"]


class PredictionSimilarity(EPKAttribution):
    r"""Cosine similarity of two predictions' influence tensors (the paper's Def. 4.4).

    Args:
        model (nn.Module): an instance of the trained architecture.
        trajectory (Trajectory or path): the recorded run (SGD, Adam or AdamW families).
        train_dataset (Dataset or DataLoader): the training set the recorder's indices refer to.
        loss_fn (Callable, optional): per-sample training loss (``reduction="none"``).
            Default: cross-entropy.
        collate_fn, label_keys: as for :class:`TrainingDataInfluence` (Mapping training items).
        train_batch_size (int, optional): training samples per per-sample-gradient call.
            Default: a whole step's batch, in calls of at most ~24 MiB of gradients.
        options (EPKOptions or str, optional), output_fn (Callable, optional), **overrides: how to
            compute and what to explain, as for :class:`~captum_explaind.ExactPathKernel`.

    Cost: one forward sweep; per step a per-sample gradient pass over the step's batch, and on the
    selected steps ``nodes × |J|`` batched backward passes over the inputs (one per compared
    output). Memory: ``n × |J| × P`` for the test side, ``|K| × P`` momentum buffers.

    Examples::

        >>> sim = PredictionSimilarity(model, trajectory, train_set)
        >>> S = sim.attribute(x_test, target=y_test)                     # [n, n], from the model's view
        >>> S_mlp = sim.attribute(x_test, target=y_test, layers="mlp", steps=range(100, 200))
    """

    def __init__(self, model: torch.nn.Module, trajectory: Union[Trajectory, str, os.PathLike], train_dataset: Any,
                 loss_fn: Optional[Callable] = None, *, collate_fn: Optional[Callable] = None,
                 label_keys: Sequence[str] = LABEL_KEYS, train_batch_size: Optional[int] = None,
                 options: Union[EPKOptions, str, None] = None, output_fn: Optional[OutputFn] = None,
                 **overrides: Any) -> None:
        if train_batch_size is not None:
            overrides["train_batch_size"] = check_train_batch_size(train_batch_size)
        super().__init__(model, trajectory, options, output_fn=output_fn, **overrides)
        traj = self.epk.trajectory
        if traj.family == "other":
            raise UnsupportedOptimizerError(
                f"the similarity view needs each training sample's share of every update, which optimizer "
                f"{traj.optimizer_class} has no exact form for (supported: SGD, Adam, AdamW)"
            )
        UpdateModel(traj, self.epk.layout, device=self.epk.device, dtype=self.epk.dtype, need_precond=True)
        self.train_batch_size = self.epk.options.train_batch_size
        self.train = TrainingSet(train_dataset, self.epk.functional, collate_fn, label_keys)
        with checks.named_errors("train_dataset / loss_fn"):  # the user's data and loss, probed on 2 samples
            checks.check_loss_arg(loss_fn)
            self.loss_fn = check_loss_fn(loss_fn, self.epk.functional, self.epk.theta(0), self.train)

    @log_usage()
    def explain(
        self,
        inputs: Any,
        others: Any = None,
        target: TargetType = None,
        other_target: TargetType = None,
        additional_forward_args: Any = None,
        layers: Any = None,
        steps: StepsType = None,
        train_subset: Optional[Sequence[int]] = None,
    ) -> SimilarityResult:
        r"""Similarities with the inner products, window, layers and options behind them.

        Args: as :meth:`attribute`.

        Returns:
            *SimilarityResult*
        """
        windows, multi = parse_windows(steps, self.epk.num_steps)
        if multi:
            raise ValueError("steps must be one window here (a range or slice); explain_windows() takes several")
        return self._explain(inputs, others, target, other_target, additional_forward_args, layers, windows,
                             train_subset)[0]

    @log_usage()
    def explain_windows(
        self,
        inputs: Any,
        windows: Sequence[Union[int, range, slice]],
        others: Any = None,
        target: TargetType = None,
        other_target: TargetType = None,
        additional_forward_args: Any = None,
        layers: Any = None,
        train_subset: Optional[Sequence[int]] = None,
        start: Optional[int] = None,
    ) -> List[SimilarityResult]:
        r"""One :class:`SimilarityResult` per window of steps, from a single forward sweep.

        The per-sample momentum buffers do not depend on the window, so the sweep visits each step
        once (up to the last window's end) and adds every integrated step to the Gram matrix of
        each window that holds it. Each result equals :meth:`explain` with ``steps=window``.

        Args:
            inputs: predictions to compare. windows (list of range, slice or int): the steps S
                of each result (they may overlap).
            others, target, other_target, additional_forward_args, layers, train_subset: as
                :meth:`attribute`.
            start (int, optional): begin the sweep at this step with empty momentum buffers
                instead of at step 1. The buffers then miss the momentum of earlier steps, which
                enters window ``w`` with weight at most ``Π β`` over the steps from ``start`` to
                ``w.start`` (``β``: the optimizer's momentum coefficient, e.g. ``0.9^409 ≈ 2e-19``);
                each result reports that bound as ``truncation`` (0 without ``start``). Default: None

        Returns:
            *list[SimilarityResult]*, in the order of ``windows`` (``stats`` is the shared sweep's)
        """
        if isinstance(windows, (range, slice, int)) or not len(windows):
            raise ValueError("windows must be a non-empty list of windows (ranges, slices or steps)")
        parsed = [parse_windows(w, self.epk.num_steps)[0][0] for w in windows]
        if start is not None:
            first = min(w.start for w in parsed)
            if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start <= first:
                raise ValueError(f"start must be a step in 1..{first} (the first window's start), got {start!r}")
        return self._explain(inputs, others, target, other_target, additional_forward_args, layers, parsed,
                             train_subset, start or 1)

    def _explain(self, inputs: Any, others: Any, target: TargetType, other_target: TargetType,
                 additional_forward_args: Any, layers: Any, windows: List[range],
                 train_subset: Optional[Sequence[int]], start: int = 1) -> List[SimilarityResult]:
        batch, tgt = self._prepare(inputs, target, additional_forward_args)
        n_self = batch.n
        if others is not None:
            ob, tgt_o = self._prepare(others, target if other_target is None else other_target,
                                      additional_forward_args, what="others")
            if tgt.index is None and tgt_o.index is None:
                index = None
            elif tgt.index is None or tgt_o.index is None:
                raise ValueError("target and other_target must both select outputs, or both be None")
            else:
                index = torch.cat([tgt.index, tgt_o.index])
            batch = batch.concat(ob)
            tgt = Target(index, tgt.n_outputs)
        n = batch.n
        outputs = torch.arange(tgt.n_outputs).expand(n, -1) if tgt.index is None else tgt.index.unsqueeze(1)
        outputs = outputs.to(self.epk.device)
        mask, names = None, None
        if layers is not None:
            names = [p for p in resolve_parameters(self.model, layers) if p in self.epk.layout]
            mask = self.epk.layout.mask(names, dtype=self.epk.dtype, device=self.epk.device)
        subset = None
        if train_subset is not None:
            if not hasattr(train_subset, "__len__") or len(train_subset) > len(self.train):  # before any list()
                raise ValueError(f"train_subset must be a sequence of at most {len(self.train)} training-set indices")
            subset = torch.as_tensor(list(train_subset), dtype=torch.int64)
            if subset.numel() == 0 or int(subset.min()) < 0 or int(subset.max()) >= len(self.train):
                raise ValueError(f"train_subset must hold indices in 0..{len(self.train) - 1}")
        view = SimilarityView(self.epk, n, outputs, self.train, self.loss_fn, subset, mask, windows,
                              self.train_batch_size)
        last = max(w.stop for w in windows)
        stats = self.epk.sweep(batch, view, steps=range(start, last), integrate=sorted(view.integrate),
                               need_precond=True, desc="similarity")
        out = []
        for w, window in enumerate(windows):
            gram = view.gram[w]
            cos = cosine_from_gram(gram)
            out.append(SimilarityResult(
                similarity=cos if others is None else cos[:n_self, n_self:], gram=gram, window=window, layers=names,
                train_subset=subset, stats=stats, options=self.epk.options.to_dict(),
                change=view.exact[w] + view.buffer_change[w], buffers=view.buffer_change[w],
                train_grads=view.grads.name, truncation=view.truncation(w) if start > 1 else 0.0))
        return out

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
            inputs (Tensor, tuple, Mapping or pytree): predictions to compare.
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
            *Tensor* ``[n_inputs, n_others]`` in [−1, 1]; :meth:`explain` gives the inner
            products and settings too.
        """
        return self.explain(inputs, others, target, other_target, additional_forward_args, layers, steps,
                            train_subset).similarity
