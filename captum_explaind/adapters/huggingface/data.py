"""Training data as the Trainer saw it, and data-view results mapped back to dataset rows."""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .losses import unwrap_model

__all__ = ["ModelColumns", "training_rows"]

_LABELS = ("labels", "label", "label_ids", "shift_labels")


class ModelColumns(torch.utils.data.Dataset):
    """A view of a dataset that keeps only the columns the model's ``forward`` accepts (and the
    labels), as the Trainer's ``remove_unused_columns`` does, so that rows with extra columns
    (``text``, ``idx``) can be the data view's training set. Row ``i`` is the dataset's row ``i``.

    Args:
        dataset: a map-style dataset of Mappings (a ``datasets.Dataset``, a list of dicts).
        model (nn.Module): the model (or ``PeftModel``) trained on it.
        keep (sequence of str, optional): extra columns to keep. Default: ()
    """

    def __init__(self, dataset: Any, model: nn.Module, keep: Sequence[str] = ()) -> None:
        self.dataset = dataset
        forward = unwrap_model(model).forward
        self.columns = set(inspect.signature(forward).parameters) | set(_LABELS) | set(keep)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        row = self.dataset[int(i)]
        return {k: v for k, v in row.items() if k in self.columns}


def training_rows(result: Any, dataset: Any, k: int = 5, columns: Optional[Sequence[str]] = None,
                  proponents: bool = True) -> List[List[Dict[str, Any]]]:
    """The ``k`` most influential training rows of every explained input, with their columns.

    Args:
        result: a :class:`~captum_explaind.epk.results.DataDecomposition` (``explain()`` of
            ``TrainingDataInfluence``) or a score tensor ``[n_inputs, n_train]`` over all rows.
        dataset: the training dataset the indices refer to (e.g. the untokenized
            ``datasets.Dataset`` with its ``text`` and ``label`` columns).
        k (int, optional): rows per input. Default: 5
        columns (sequence of str, optional): columns to copy from each row; ``None``: all but
            token-level columns (``input_ids``, ``attention_mask``, ``token_type_ids``). Default: None
        proponents (bool, optional): most positive (True) or most negative scores. Default: True

    Returns:
        *list[list[dict]]*: per input, ``k`` dicts with ``index`` (dataset row), ``score`` and the columns.
    """
    if isinstance(result, torch.Tensor):
        flat = result.reshape(result.shape[0], result.shape[1], -1).sum(-1)
        vals, pos = torch.topk(flat, min(k, flat.shape[1]), dim=1, largest=proponents)
        index_of = torch.arange(flat.shape[1])
    else:
        pos, vals = result.top(min(k, result.scores.shape[1]), proponents=proponents)
        index_of = result.train_indices if result.train_indices is not None else torch.arange(result.scores.shape[1])
    hidden = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    out: List[List[Dict[str, Any]]] = []
    for r in range(pos.shape[0]):
        rows = []
        for j in range(pos.shape[1]):
            index = int(index_of[int(pos[r, j])])
            row = dataset[index]
            keep = columns if columns is not None else [c for c in row if c not in hidden]
            rows.append({"index": index, "score": float(vals[r, j]), **{c: row[c] for c in keep}})
        out.append(rows)
    return out
