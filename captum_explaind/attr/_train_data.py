"""Access to the training set and per-sample loss gradients for the data view.

Training samples follow Captum's influence convention: ``train_dataset[i]`` is a tuple whose
last element is the label and whose other elements are the model inputs (``model(*batch[:-1])``).
A ``DataLoader`` may be passed instead; its dataset and collate function are used (samples are
fetched by the indices the recorder logged, never by iterating the loader).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from ..epk.functional import FunctionalModel

__all__ = ["TrainingSet", "check_loss_fn", "check_train_batch_size", "sample_chunk"]

# Per-sample gradients are [m, P]; by default they are computed in chunks of about this size so
# peak memory does not grow with the batch (a full-batch run on a large training set).
GRAD_CHUNK_BYTES = 256 * 2**20


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
            samples as fit in ``GRAD_CHUNK_BYTES`` of gradients.
        m (int): distinct samples of the step.
        n_params (int): parameters per gradient.
        dtype (torch.dtype): gradient dtype.

    Returns:
        *int*: the chunk size (≥ 1).
    """
    if train_batch_size is not None:
        return train_batch_size
    per_sample = max(1, n_params * torch.finfo(dtype).bits // 8)
    return max(1, min(m, GRAD_CHUNK_BYTES // per_sample))


class TrainingSet:
    """Random access to training samples by dataset index, collated and on the compute device.

    Args:
        data (Dataset or DataLoader): map-style dataset of ``(*inputs, label)`` samples.
        fm (FunctionalModel): where and in which dtype samples are used.
    """

    def __init__(self, data: Any, fm: FunctionalModel) -> None:
        collate: Callable = default_collate
        if isinstance(data, DataLoader):
            if data.collate_fn is not None:
                collate = data.collate_fn
            data = data.dataset
        if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(
                f"train_dataset must be a map-style dataset (with __getitem__ and __len__) or a DataLoader "
                f"over one, got {type(data).__name__}: samples are fetched by the indices the recorder logged"
            )
        self.dataset: Dataset = data
        self.collate = collate
        self.fm = fm
        self.n = len(data)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: torch.Tensor) -> Tuple[Tuple[Any, ...], Any]:
        """Model inputs (a tuple) and labels of the samples at ``indices``."""
        idx = indices.to("cpu")
        if isinstance(self.dataset, TensorDataset):
            parts = tuple(t[idx] for t in self.dataset.tensors)
        else:
            parts = self.collate([self.dataset[int(i)] for i in idx])
        if isinstance(parts, dict) or not isinstance(parts, (tuple, list)) or len(parts) < 2:
            raise TypeError(
                "each training sample must be a tuple (*inputs, label) — the last element is the label "
                f"(Captum's convention); got a collated batch of type {type(parts).__name__}"
            )
        parts = self.fm.prepare(tuple(parts))
        return tuple(parts[:-1]), parts[-1]


def check_loss_fn(loss_fn: Any, fm: FunctionalModel, theta: torch.Tensor, train: TrainingSet) -> Callable:
    """Validate that ``loss_fn(outputs, labels)`` returns one loss per sample.

    ``None`` means cross-entropy, which is also the NLL of log-probability outputs (log-softmax is
    idempotent), so it fits classifiers returning logits or log-probabilities alike.
    """
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(reduction="none")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is not None and reduction != "none":
        raise ValueError(
            f"loss_fn {type(loss_fn).__name__} has reduction={reduction!r}; the data view needs "
            "per-sample losses: construct it with reduction='none'"
        )
    k = min(2, train.n)
    x, y = train.batch(torch.arange(k))
    with torch.no_grad():
        out = fm.forward(theta, x)
        loss = loss_fn(out, y)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 1 or loss.shape[0] != k:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample (shape [{k}] for {k} samples), got {shape}; "
            "use reduction='none'"
        )
    return loss_fn
