"""The training side of the data and similarity views: samples by index, their per-sample losses.

Training samples are fetched by the dataset indices the recorder logged (never by iterating a
loader). ``train_dataset[i]`` is either

* a tuple ``(*inputs, label)`` — Captum's convention: ``model(*inputs)``, and
  ``loss_fn(outputs, labels)``; or
* a Mapping (a tokenized row of a ``datasets.Dataset``, a dict from a torch ``Dataset``) — the
  collated batch is passed to the model **by keyword**, without its label entries
  (``label_keys``, default ``labels``/``label``/``label_ids``), and ``loss_fn(outputs, batch)``
  receives the whole collated batch (so ``batch["labels"]`` is there).

``collate_fn`` rebuilds each recorded micro-batch from its items (e.g. the padding collator
training used; default: the ``DataLoader``'s, else ``torch.utils.data.default_collate``).
``loss_fn`` returns one loss per example, weighted as training weighted it: the recorder's
weights ``w_{i,k}`` multiply these per-sample losses. For a per-example mean over tokens (every
sample weighs ``1/|B|``) return each example's mean; for token-count normalization (the batch
loss is a sum over all tokens divided by the batch's token count, as Hugging Face's
``num_items_in_batch``) return each example's token *sum* and record the weights
``1/num_tokens_in_batch`` with ``log_batch(indices, weights)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from ..recording.format import StepRecord
from .augmentation import warn_if_random
from .batch import Batch, to_pytree
from .functional import FunctionalModel
from .outputs import default_output_fn

__all__ = ["TrainingSet", "check_loss_fn", "check_train_batch_size", "sample_chunk", "step_samples",
           "LABEL_KEYS", "per_sample_loss_grads", "measured_grad_scale"]

#: Mapping entries that hold the training target, not a model input.
LABEL_KEYS: Tuple[str, ...] = ("labels", "label", "label_ids")

# Per-sample gradients are [m, P]: a step whose m × P exceed this takes the forward-mode path
# (.train_jvp) unless told otherwise, so that memory does not grow with the batch.
GRAD_CHUNK_BYTES = 256 * 2**20
# ... and the per-sample path computes them in calls of about this size: below the 32 MiB up to
# which a sweep's heap is reused (.allocator), not mapped and faulted in again on every step. Fig. 4
# of the Grokking study at p = 113 (4,000 training pairs, decoder gradients, 120 MB per step in one
# call at 256 MiB): 346.9 → 299.7 s, same numbers to round-off.
GRAD_CALL_BYTES = 24 * 2**20


def check_train_batch_size(train_batch_size: Any) -> Optional[int]:
    """``train_batch_size`` as given, or a ``ValueError`` naming it unless it is ``None`` or an int ≥ 1."""
    if train_batch_size is not None and (
        isinstance(train_batch_size, bool) or not isinstance(train_batch_size, int) or train_batch_size < 1
    ):
        raise ValueError(f"train_batch_size must be a positive int, got {train_batch_size!r}")
    return train_batch_size


def sample_chunk(train_batch_size: Optional[int], m: int, n_params: int, dtype: torch.dtype) -> int:
    """Training samples per per-sample-gradient call.

    Args:
        train_batch_size (int or None): the caller's choice; ``None``: as many of the ``m``
            samples as fit in ``GRAD_CALL_BYTES`` of gradients.
        m (int): distinct samples of the step.
        n_params (int): parameters per gradient.
        dtype (torch.dtype): gradient dtype.

    Returns:
        *int*: the chunk size (≥ 1).
    """
    if train_batch_size is not None:
        return train_batch_size
    per_sample = max(1, n_params * torch.finfo(dtype).bits // 8)
    return max(1, min(m, GRAD_CALL_BYTES // per_sample))


def step_samples(
    rec: StepRecord, what: str, device: torch.device, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The distinct training indices of step ``rec`` and their summed batch weights.

    Raises:
        TrajectoryError: the step has no recorded samples.
    """
    from ..errors import TrajectoryError

    if not rec.batches:
        raise TrajectoryError(
            f"step {rec.step} has no recorded training samples (log_batch()/track() was not used for it); "
            f"the {what} needs the samples of every step"
        )
    idx = torch.cat([b.indices for b in rec.batches])
    wts = torch.cat([b.weights for b in rec.batches])
    uniq, inv = torch.unique(idx, return_inverse=True)
    weights = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, wts)
    return uniq, weights.to(device=device, dtype=dtype)


class TrainingSet:
    """Random access to training samples by dataset index, collated and on the compute device.

    Args:
        data (Dataset, DataLoader or sequence): map-style dataset of ``(*inputs, label)`` tuples or
            of Mappings (see the module docstring).
        fm (FunctionalModel): where and in which dtype samples are used.
        collate_fn (Callable, optional): builds a batch from a list of items. Default: the
            ``DataLoader``'s collate function, else ``torch.utils.data.default_collate``.
        label_keys (sequence of str, optional): Mapping entries that are targets, not model
            inputs. Default: ``("labels", "label", "label_ids")``
    """

    def __init__(self, data: Any, fm: FunctionalModel, collate_fn: Optional[Callable] = None,
                 label_keys: Sequence[str] = LABEL_KEYS) -> None:
        collate: Callable = default_collate
        if isinstance(data, DataLoader):
            if data.collate_fn is not None:
                collate = data.collate_fn
            data = data.dataset
        if collate_fn is not None:
            if not callable(collate_fn):
                raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
            collate = collate_fn
        if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(
                f"train_dataset must be a map-style dataset (with __getitem__ and __len__) or a DataLoader "
                f"over one, got {type(data).__name__}: samples are fetched by the indices the recorder logged"
            )
        from ..extensions import training_view_for

        # e.g. a Hugging Face model: only the columns its forward takes, as the Trainer fed them
        data = training_view_for(fm.module, data)
        self.dataset: Dataset = data
        # random augmentation cannot be replayed: say so by name (the residual reports what it costs)
        self.random_transforms = warn_if_random(data)
        self.collate = collate
        self.custom_collate = collate_fn is not None
        self.fm = fm
        self.label_keys = tuple(label_keys)
        self.n = len(data)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def _collated(self, indices: torch.Tensor) -> Any:
        idx = indices.to("cpu")
        if isinstance(self.dataset, TensorDataset) and not self.custom_collate:
            return tuple(t[idx] for t in self.dataset.tensors)
        return self.collate([self.dataset[int(i)] for i in idx])

    def batch(self, indices: torch.Tensor) -> Tuple[Batch, Any]:
        """The model inputs and the loss target of the samples at ``indices``.

        Returns:
            *tuple[Batch, Any]*: the forward call's batch, and the labels tensor (tuple items)
            or the whole collated Mapping (Mapping items), on the compute device.
        """
        parts = self._collated(indices)
        fm, m = self.fm, len(indices)
        if isinstance(parts, Mapping):
            full = to_pytree(parts, fm.device, fm.dtype)
            inputs = {k: v for k, v in full.items() if k not in self.label_keys}
            if not inputs:
                raise TypeError(f"the collated training batch holds only label entries {list(full)}; no model inputs")
            batch = Batch.from_inputs(inputs, device=fm.device, dtype=fm.dtype, what="training batch")
            target: Any = full
        elif isinstance(parts, (tuple, list)) and len(parts) >= 2:
            parts = to_pytree(tuple(parts), fm.device, fm.dtype)
            x = parts[:-1]
            batch = Batch.from_inputs(x if len(x) > 1 else x[0], device=fm.device, dtype=fm.dtype,
                                      what="training batch")
            target = parts[-1]
            if not isinstance(target, torch.Tensor):
                raise TypeError(f"training labels must be tensors, got {type(target).__name__}")
        else:
            raise TypeError(
                "each training sample must be a tuple (*inputs, label) — the last element is the label "
                f"(Captum's convention) — or a Mapping of model inputs and labels; got a collated batch of type "
                f"{type(parts).__name__}"
            )
        if batch.n != m:
            raise ValueError(f"the collated training batch holds {batch.n} examples for {m} indices")
        return batch, target


def per_sample_loss_grads(fm: FunctionalModel, train: TrainingSet, loss_fn: Callable, theta: torch.Tensor,
                          indices: torch.Tensor) -> torch.Tensor:
    """``∇_θ loss_fn(f(θ; x_k), y_k)`` for the samples at ``indices``: ``[m, P]``."""
    batch, target = train.batch(indices)

    def scalar(raw: Any, y: Any) -> torch.Tensor:
        return loss_fn(raw, y).sum()

    return fm.selected_grads(theta, batch, scalar, target, purpose="loss")[0]


def weighted_param_grads(fm: FunctionalModel, train: TrainingSet, loss_fn: Callable, theta: torch.Tensor,
                         indices: torch.Tensor, weights: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
    """``∇_θ w_k loss_fn(f(θ; x_k), y_k)`` for the samples at ``indices`` with weights ``weights``,
    per trainable parameter (``name → [m, numel]``; the weight inside the loss, so no weighted
    copy is made); None where per-sample ``vmap`` is off (:meth:`FunctionalModel.param_grads`)."""
    batch, target = train.batch(indices)

    def scalar(raw: Any, tw: Any) -> torch.Tensor:
        y, w = tw
        return (w * loss_fn(raw, y)).sum()

    return fm.param_grads(theta, batch, scalar, (target, weights), purpose="loss")


def measured_grad_scale(rec: StepRecord, replayed: torch.Tensor, active: torch.Tensor) -> float:
    """The global gradient scale ``c_i`` of step ``rec`` (clipping, loss scaling, accumulation):
    the recorded norm of the gradient the optimizer saw over the replayed ``Σ_k w_k ∇L_k``."""
    norm = float(torch.linalg.vector_norm(replayed * active))
    return rec.grad_norm / norm if norm > 0 else 0.0


class _DefaultLoss:
    """Cross-entropy of the explained output (``.logits`` of a ``ModelOutput``), per sample.

    Also the NLL of log-probability outputs (log-softmax is idempotent), so it fits classifiers
    returning logits or log-probabilities alike.
    """

    reduction = "none"

    def __call__(self, out: Any, y: Any) -> torch.Tensor:
        if isinstance(y, Mapping):
            y = next((y[k] for k in LABEL_KEYS if k in y), None)
            if y is None:
                raise ValueError("the default loss needs a 'labels' entry in Mapping training items; pass loss_fn=")
        return nn.functional.cross_entropy(default_output_fn(out), y, reduction="none")

    def __repr__(self) -> str:
        return "cross_entropy(reduction='none')"


def _per_sample(loss_fn: Any) -> Any:
    """A loss module with ``reduction='sum'`` or ``'mean'`` as its per-sample (``'none'``) copy."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None or reduction == "none":
        return loss_fn
    if reduction not in ("sum", "mean") or not isinstance(loss_fn, nn.Module):
        raise ValueError(
            f"loss_fn {type(loss_fn).__name__} has reduction={reduction!r}; the data view needs per-sample "
            "losses: construct it with reduction='none'"
        )
    per: Any = copy.copy(loss_fn)  # an nn.Module; Any: Module.__setattr__ is typed for tensors and modules only
    per.reduction = "none"
    warnings.warn(
        f"loss_fn {type(loss_fn).__name__}(reduction={reduction!r}) is used per sample (reduction='none'): the "
        "batch weighting comes from the recording (log_batch weights and the measured gradient scale), so "
        "the scores are the same as TracInCP's convention of a summed loss up to that weighting",
        UserWarning,
        stacklevel=4,
    )
    return per


def check_loss_fn(loss_fn: Any, fm: FunctionalModel, theta: torch.Tensor, train: TrainingSet) -> Callable:
    """Validate that ``loss_fn(outputs, target)`` returns one loss per sample.

    ``None`` means the default an adapter registered for the model's family
    (:func:`captum_explaind.extensions.default_loss_for`; e.g. the per-sample form of a Hugging
    Face model's own loss), else cross-entropy of the explained output. A ``torch.nn`` loss with
    ``reduction="sum"`` or ``"mean"`` (what ``TracInCP`` users pass) is used per sample, with a note.
    """
    if loss_fn is None:
        from ..extensions import default_loss_for

        loss_fn = default_loss_for(fm.module) or _DefaultLoss()
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    loss_fn = _per_sample(loss_fn)
    k = min(2, train.n)
    batch, target = train.batch(torch.arange(k))
    with torch.no_grad():
        loss = loss_fn(fm.raw(theta, batch), target)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 1 or loss.shape[0] != k:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample (shape [{k}] for {k} samples), got {shape}; "
            "use reduction='none'"
        )
    return loss_fn
