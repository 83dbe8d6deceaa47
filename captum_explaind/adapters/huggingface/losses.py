"""The per-sample form of a Hugging Face model's own training loss.

Hugging Face models compute their loss inside ``forward`` from ``labels``: a mean over the loss
*items* of the micro-batch (tokens that are not ``-100`` for language models, examples for
classifiers, example × label entries for regression and multi-label heads), or — when the
``Trainer`` passes ``num_items_in_batch`` and the model's loss honours it — a sum over the items
divided by the item count of the whole accumulation window. Both are ``Σ_k w_k ℓ_k`` with

    ``ℓ_k`` = the sum of example k's item losses,   ``w_k`` = 1 / (item count of the normalization)

so :class:`ModelLoss` returns ``ℓ_k`` (one value per example) and the recording's weights carry the
normalization (:class:`~captum_explaind.adapters.huggingface.TrajectoryCallback` measures which one
training used). This is what ``loss_fn=None`` means on a Hugging Face model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["ModelLoss", "loss_kind", "unwrap_model", "is_hf_model"]

IGNORE_INDEX = -100


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (a ``peft`` ``PeftModel`` or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (possibly inside a ``PeftModel``)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers missing
        return False
    return isinstance(unwrap_model(model), PreTrainedModel)


def _mapping_names(name: str) -> set:
    from transformers.models.auto import modeling_auto

    return set(getattr(modeling_auto, name, {}).values())


def loss_kind(model: nn.Module) -> Optional[str]:
    """Which of the model's own losses training used: ``"causal_lm"``, ``"masked_lm"``,
    ``"token_classification"``, ``"sequence_classification"`` or ``None`` (no per-sample form known).
    """
    base = unwrap_model(model)
    loss_type = getattr(base, "loss_type", None)
    cls = type(base).__name__
    table = [
        ("causal_lm", "ForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
        ("sequence_classification", "ForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
        ("token_classification", "ForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
        ("masked_lm", "ForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ]
    for kind, ltype, names in table:
        if loss_type == ltype:
            return kind
    for kind, _, names in table:
        if cls in _mapping_names(names):
            return kind
    return None


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)):
        # return_dict=False with labels: (loss, logits, ...); without: (logits, ...)
        logits = next((t for t in out if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model output {type(out).__name__} has no logits to compute the loss from")
    return logits


class ModelLoss:
    r"""One loss per example, in the form the model's own training loss sums (see module docstring).

    Args:
        model (nn.Module): the trained transformers model (or a ``PeftModel`` around one).

    Call ``loss(outputs, batch)`` with the model output and the collated batch (a Mapping holding
    ``labels``; ``shift_labels`` is honoured for causal LMs) or the labels tensor; it returns
    ``[n]``. ``loss.count(batch)`` is the number of loss items of the batch (a mean's divisor).

    Raises:
        ValueError: the model family has no known per-sample loss form (pass ``loss_fn=``).
    """

    def __init__(self, model: nn.Module) -> None:
        base = unwrap_model(model)
        kind = loss_kind(base)
        if kind is None:
            raise ValueError(
                f"loss_fn=None: no per-sample form of {type(base).__name__}'s own loss is known (supported: causal "
                "LM, masked LM, token and sequence classification heads); pass loss_fn=(outputs, batch) -> [n]"
            )
        self.kind = kind
        self.config = getattr(base, "config", None)
        self.model_class = type(base).__name__

    def __repr__(self) -> str:
        return f"ModelLoss({self.model_class}: {self._problem()} per example, summed over its loss items)"

    # ------------------------------------------------------------------ pieces
    def _problem(self, labels: Optional[torch.Tensor] = None) -> str:
        if self.kind != "sequence_classification":
            return self.kind
        problem = getattr(self.config, "problem_type", None)
        if problem is not None:
            return problem
        num_labels = int(getattr(self.config, "num_labels", 2))
        if num_labels == 1:
            return "regression"
        if labels is None or labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    @staticmethod
    def _labels(batch: Any, key: str = "labels") -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, Mapping) and key in batch:
            return batch[key]
        raise ValueError(f"the training batch holds no {key!r} entry; the model's own loss needs it")

    def _shifted(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping) and "shift_labels" in batch:
            return batch["shift_labels"]
        labels = self._labels(batch)
        return nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]

    # ------------------------------------------------------------------ the loss
    def __call__(self, out: Any, batch: Any) -> torch.Tensor:
        logits = _logits(out)
        n = logits.shape[0]
        if self.kind == "causal_lm":
            labels = self._shifted(batch)
            tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="none")
            return tok.reshape(n, -1).sum(1)
        labels = self._labels(batch)
        if self.kind in ("masked_lm", "token_classification"):
            tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="none")
            return tok.reshape(n, -1).sum(1)
        problem = self._problem(labels)
        if problem == "single_label_classification":
            return nn.functional.cross_entropy(logits.reshape(n, -1), labels.reshape(n),
                                               ignore_index=IGNORE_INDEX, reduction="none")
        target = labels.to(logits.dtype).reshape(n, -1)
        if problem == "regression":
            return (logits.reshape(n, -1) - target).pow(2).sum(1)
        if problem == "multi_label_classification":
            return nn.functional.binary_cross_entropy_with_logits(logits.reshape(n, -1), target,
                                                                  reduction="none").sum(1)
        raise ValueError(f"unknown problem_type {problem!r} of {self.model_class}")

    def count(self, batch: Any) -> int:
        """The number of loss items of ``batch``: the divisor of the model's own mean loss."""
        if self.kind == "causal_lm":
            return int((self._shifted(batch) != IGNORE_INDEX).sum())
        labels = self._labels(batch)
        problem = self._problem(labels)
        if problem in ("regression", "multi_label_classification"):
            return int(labels.numel())
        return int((labels != IGNORE_INDEX).sum())
