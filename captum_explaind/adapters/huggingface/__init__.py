"""Hugging Face adapter: record a ``transformers.Trainer`` run with one callback and analyse it.

* :class:`TrajectoryCallback` — ``Trainer(..., callbacks=[TrajectoryCallback(path)])`` records the
  run (θ_0, every optimizer step, learning rates, clipping, the dataset rows of every micro-batch
  and the weights of the Trainer's loss normalization, RNG states for dropout replay).
* :class:`ModelLoss` — the per-sample form of the model's own loss; what ``loss_fn=None`` means on a
  Hugging Face model in ``TrainingDataInfluence`` / ``PredictionSimilarity`` (registered here with
  :func:`captum_explaind.extensions.register_default_loss`; the core imports this module lazily).
* :func:`layer_groups` — embeddings / blocks / attention vs. MLP / head, for ``layers=``.
* :class:`ModelColumns`, :func:`training_rows` — the training set as the model saw it, and top
  training rows (text, label) of a data-view result.

Everything here only translates; the mathematics is the core's.
"""

from __future__ import annotations

from ...extensions import register_default_loss
from .callback import TrajectoryCallback, has_active_dropout
from .data import ModelColumns, training_rows
from .layers import find_blocks, layer_groups
from .losses import ModelLoss, is_hf_model, loss_kind

__all__ = ["TrajectoryCallback", "ModelLoss", "layer_groups", "find_blocks", "ModelColumns", "training_rows",
           "loss_kind", "is_hf_model", "has_active_dropout"]


def _has_model_loss(model) -> bool:  # type: ignore[no-untyped-def]
    return is_hf_model(model) and loss_kind(model) is not None


register_default_loss(_has_model_loss, ModelLoss)
