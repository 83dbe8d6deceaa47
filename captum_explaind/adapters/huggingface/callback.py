"""Record a ``transformers.Trainer`` run with one callback: ``Trainer(..., callbacks=[cb])``.

What the callback sees, and from where (public callback arguments only — no private Trainer
attributes, no wrapped model, no replaced optimizer):

* θ_0, every optimizer step, the learning rate of every group, clipping, schedules: a
  :class:`~captum_explaind.TrajectoryRecorder` on the model and (accelerate-wrapped) optimizer the
  Trainer hands to ``on_train_begin``.
* Which dataset rows fed each micro-batch: the train loader's batch sampler is told to note every
  batch of indices it yields (in order), and a forward pre-hook on the model takes the oldest noted
  batch at every *training* forward. Loaders and the Trainer prefetch ahead, but batches reach the
  model in the order they were sampled, so what is logged is what fed the forward; the row count
  of every forward is checked against it.
* The per-sample weights of the Trainer's loss normalization: the hook sees whether
  ``num_items_in_batch`` reached the model, and on the first training forwards compares the loss
  the model returned with its per-sample losses (:class:`.losses.ModelLoss`) to learn whether the
  model's loss honours it (a token-count normalization over the accumulation window) or is a mean
  over the micro-batch (divided by the window's number of micro-batches when the Trainer does so).
  Partial last batches and a short last accumulation window come out of the same rule.
* The RNG state right before every training forward (C1), when the model has active dropout, so
  the data view can replay the masks.
"""

from __future__ import annotations

import collections
import inspect
import os
import warnings
from typing import Any, Deque, Dict, List, Optional, Union

import torch
from torch import nn

from ...errors import TrajectoryError
from ...recording.recorder import TrajectoryRecorder
from ...recording.trajectory import Trajectory
from .losses import ModelLoss

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - transformers missing
    raise ImportError(
        "captum_explaind.adapters.huggingface needs transformers: pip install 'captum-explaind[hf]'"
    ) from err

__all__ = ["TrajectoryCallback"]

# How many training forwards are used to learn the loss normalization (each costs one extra
# per-sample loss on the logits already computed, no backward).
_CHECK_FORWARDS = 4
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _noting_class(cls: type) -> type:
    """A subclass of the batch sampler's class whose iterator notes every yielded batch of indices
    (a plain subclass, so that ``__class__`` can be assigned on the live sampler and restored)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in cls.__iter__(self):
            self._explaind_queue.append([int(i) for i in batch])
            yield batch

    return type(f"Noting{cls.__name__}", (cls,), {"__iter__": __iter__})


def _rows(args: tuple, kwargs: Dict[str, Any]) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return int(t.shape[0])
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def has_active_dropout(model: nn.Module) -> bool:
    """Whether ``model`` holds a dropout module or an attention-dropout probability with p > 0."""
    for module in model.modules():
        if isinstance(module, _DROPOUT) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    for key in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"):
        if float(getattr(config, key, 0.0) or 0.0) > 0:
            return True
    return False


class _MicroBatch:
    __slots__ = ("indices", "count", "num_items", "rng", "cuda_rng")

    def __init__(self, indices: List[int]) -> None:
        self.indices = indices
        self.count: Optional[int] = None
        self.num_items: Optional[float] = None
        self.rng: Optional[torch.Tensor] = None
        self.cuda_rng: Optional[torch.Tensor] = None


class TrajectoryCallback(TrainerCallback):
    r"""Records a ``transformers.Trainer`` run for ExPLAIND: ``Trainer(..., callbacks=[cb])``.

    Args:
        path (str or os.PathLike): directory of the trajectory (see
            :class:`~captum_explaind.TrajectoryRecorder`).
        **recorder_options: passed to :class:`~captum_explaind.TrajectoryRecorder`
            (``store_dtype=torch.bfloat16``, ``overwrite=True``, ``record_rng=...``, ...). Unlike the
            recorder's, the callback's default is ``background=True`` (steps are written by a
            background thread; each completed step is still durable on its own).

    After ``trainer.train()``, ``cb.trajectory`` is the recorded
    :class:`~captum_explaind.Trajectory`; ``cb.loss_normalization`` says how the Trainer normalized
    the loss (``"num_items_in_batch"``, ``"mean"``, ``"outside the model"``). Evaluation, logging and
    checkpointing are unaffected. ``trainer.train(resume_from_checkpoint=...)`` appends to the
    recording at ``path`` when it ends exactly at the checkpoint's step (the recorder checks that the
    loaded model and optimizer state equal its last step); otherwise it is refused with a clear error
    (the recording must start at θ_0 with the optimizer's initial state).

    Example::

        >>> cb = TrajectoryCallback("runs/bert")
        >>> Trainer(model, args, train_dataset=ds, data_collator=collator, callbacks=[cb]).train()
        >>> TrainingDataInfluence(model, cb.trajectory, ds, collate_fn=collator).attribute(enc, target=y)
    """

    def __init__(self, path: Union[str, os.PathLike], **recorder_options: Any) -> None:
        # Bad options are named now, not after the Trainer has started training.
        TrajectoryRecorder.check_options(path, **recorder_options)
        self.path = os.fspath(path)
        self.recorder_options = dict(recorder_options)
        self.recorder: Optional[TrajectoryRecorder] = None
        self.loss_normalization: Optional[str] = None
        self._trajectory: Optional[Trajectory] = None
        self._finished = False  # on_train_end finalized the recording
        self._handles: List[Any] = []
        self._queue: Deque[List[int]] = collections.deque()
        self._sampler: Any = None
        self._sampler_class: Optional[type] = None
        self._window: List[_MicroBatch] = []
        self._current: Optional[_MicroBatch] = None
        self._loss: Optional[ModelLoss] = None
        self._checks = 0
        self._honours_num_items: Optional[bool] = None
        self._rng = False
        self._steps_before = 0
        self._skip = 0
        self._warned: set = set()

    # ------------------------------------------------------------------ public
    @property
    def trajectory(self) -> Trajectory:
        """The recorded trajectory (after ``trainer.train()`` returned)."""
        if self._trajectory is None:
            if self.recorder is None:
                raise RuntimeError("TrajectoryCallback: training has not started; call trainer.train() first")
            if not self._finished:
                raise RuntimeError("TrajectoryCallback: training has not finished (on_train_end was not reached)")
            # opened (and every step file's header verified) on first use, not inside trainer.train()
            self._trajectory = Trajectory.open(self.path)
        return self._trajectory

    # ------------------------------------------------------------------ begin / end
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,  # type: ignore[override]
                       train_dataloader=None, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise TrajectoryError(
                f"TrajectoryCallback records single-process training only (world_size={args.world_size})"
            )
        resume = state.global_step > 0
        if resume:
            self._check_resume(state.global_step)
        if model is None or optimizer is None:
            raise TrajectoryError("TrajectoryCallback: the Trainer passed no model/optimizer to on_train_begin")
        self._reset()
        options = dict(self.recorder_options)
        if "background" in inspect.signature(TrajectoryRecorder.__init__).parameters:
            # Training should not wait for the disk; every completed step is still durable on its own.
            options.setdefault("background", True)
        self._rng = self._resolve_rng(model, options)
        if resume:
            options["resume"] = True
            options.pop("overwrite", None)
        self.recorder = TrajectoryRecorder(model, optimizer, self.path, scheduler=lr_scheduler, **options)
        self._steps_before = self.recorder.num_steps
        # The Trainer skips the batches of the resumed epoch that were already trained on; they are
        # still drawn from the batch sampler (and so noted), but never reach the model.
        self._skip = self._skipped_batches(args, state, train_dataloader) if resume else 0
        try:
            self._loss = ModelLoss(model)
        except ValueError:
            self._loss = None
        self._note_batches(train_dataloader)
        self._check_attention_replay(model)
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        return control

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[override]
        self._detach()
        if self.recorder is not None:
            self._window = []
            self.recorder.finish()
            self._finished = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[override]
        # Batches sampled but never fed (a loader's look-ahead at a stop) belong to no step.
        self._queue.clear()
        return control

    # ------------------------------------------------------------------ steps
    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[override]
        """The window is complete (clipping done, ``optimizer.step()`` next): log its micro-batches."""
        rec = self.recorder
        if rec is None:
            return control
        n_micro = len(self._window)
        for mb in self._window:
            weight = self._weight(mb, n_micro)
            extra: Dict[str, Any] = {}
            if self._rng:
                extra = {"rng_state": mb.rng, "cuda_rng_state": mb.cuda_rng}
            rec.log_batch(mb.indices, [weight] * len(mb.indices), **extra)
        self._window = []
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        rec = self.recorder
        if rec is not None:
            self._steps_before += 1
            if rec.num_steps < self._steps_before:
                # optimizer.step() was skipped (an fp16 overflow): its batches belong to no step.
                rec.discard_batches()
                self._steps_before = rec.num_steps
        return control

    # ------------------------------------------------------------------ hooks
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        if not module.training or self.recorder is None or self._sampler is None:
            return
        if not self._queue:
            raise TrajectoryError(
                "TrajectoryCallback: a training-mode forward of the model ran without a batch from the Trainer's "
                "train loader (no sampled indices left); call model.eval() for extra forwards during training"
            )
        while self._skip and self._queue:
            self._queue.popleft()
            self._skip -= 1
        mb = _MicroBatch(self._queue.popleft())
        n = _rows(args, kwargs)
        if n is not None and n != len(mb.indices):
            raise TrajectoryError(
                f"TrajectoryCallback: the training forward got {n} rows, but the train loader's sampler yielded "
                f"{len(mb.indices)} indices for this batch; the collator must keep one row per sampled example"
            )
        if self._rng:
            mb.rng = torch.get_rng_state()
            dev = next(module.parameters()).device
            if dev.type == "cuda":
                mb.cuda_rng = torch.cuda.get_rng_state(dev)
        num_items = kwargs.get("num_items_in_batch")
        if num_items is not None:
            mb.num_items = float(num_items.sum() if isinstance(num_items, torch.Tensor) else num_items)
        if "labels" in kwargs and self._loss is not None:
            batch = {k: v for k, v in kwargs.items() if k in ("labels", "shift_labels")}
            mb.count = self._loss.count(batch)
        self._current = mb
        self._window.append(mb)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], out: Any) -> None:
        mb, self._current = self._current, None
        if mb is None or not module.training:
            return
        if "labels" not in kwargs:
            self._set_mode("outside the model")
            return
        if self._loss is None:
            self._set_mode("unknown")
            return
        if self._checks < _CHECK_FORWARDS:
            self._check_normalization(mb, kwargs, out)

    def _check_normalization(self, mb: _MicroBatch, kwargs: Dict[str, Any], out: Any) -> None:
        """Compare the model's returned loss with Σ ℓ_k / (window items) and Σ ℓ_k / (batch items)."""
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            loss = out[0] if out[0].dim() == 0 else None
        assert self._loss is not None
        if not isinstance(loss, torch.Tensor):
            return
        batch = {k: v for k, v in kwargs.items() if k in ("labels", "shift_labels")}
        with torch.no_grad():
            total = float(self._loss(out, batch).double().sum())
        value = float(loss.detach().double())
        if total == 0.0 or not mb.count or (mb.num_items is not None and mb.num_items == mb.count):
            return  # nothing to learn: both normalizations give the same weights here
        self._checks += 1
        dtype = getattr(getattr(out, "logits", None), "dtype", torch.float32)
        rtol = max(1e-4, 20 * torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps)

        def close(w: float) -> bool:
            return abs(value - w * total) <= rtol * max(abs(value), 1e-30)

        if mb.num_items is not None and close(1.0 / mb.num_items):
            honours = True
        elif close(1.0 / mb.count):
            honours = False
        else:
            self._warn(
                "normalization",
                f"TrajectoryCallback: the loss {self._loss.model_class} returned ({value:.6g}) is neither the mean "
                "nor the num_items_in_batch-normalized sum of its per-sample "
                f"losses (sum {total:.6g}, {mb.count} items, num_items_in_batch={mb.num_items}); the recorded weights "
                "are the micro-batch mean, and the data view's residual will show the mismatch",
            )
            return
        if self._honours_num_items is not None and self._honours_num_items != honours:
            self._warn("flip", "TrajectoryCallback: the model's loss normalization changed during training")
        self._honours_num_items = honours
        self._set_mode("num_items_in_batch" if honours else "mean")

    # ------------------------------------------------------------------ weights
    def _weight(self, mb: _MicroBatch, n_micro: int) -> float:
        """w_k of every example of ``mb`` (the sum form of ModelLoss), as the Trainer weighted it."""
        if self._honours_num_items and mb.num_items:
            return 1.0 / mb.num_items
        count = mb.count if mb.count else len(mb.indices)
        # The Trainer divides a micro-batch mean by the window's micro-batch count, unless
        # num_items_in_batch reached the model (then it assumes the model normalized already).
        divide = n_micro if mb.num_items is None else 1
        return 1.0 / (max(count, 1) * divide)

    # ------------------------------------------------------------------ helpers
    def _resolve_rng(self, model: nn.Module, options: Dict[str, Any]) -> bool:
        """Resolve ``record_rng`` ("auto": on when dropout is active) and hand the recorder a bool
        (every micro-batch is logged with its own RNG state, captured here right before its forward)."""
        choice = options.pop("record_rng", "auto")
        on = has_active_dropout(model) if choice == "auto" else bool(choice)
        params = inspect.signature(TrajectoryRecorder.__init__).parameters
        if "record_rng" in params:
            options["record_rng"] = on
        elif on:
            self._warn("rng", "TrajectoryCallback: this TrajectoryRecorder cannot store RNG states; dropout masks "
                              "will not be replayable (the data view reports the mismatch as its residual)")
            on = False
        return on

    def _check_resume(self, global_step: int) -> None:
        """Resuming appends only to a recording that ends exactly at the checkpoint's step."""
        try:
            done = Trajectory.open(self.path).num_steps
        except Exception as err:  # noqa: BLE001 - any unreadable/missing recording means: cannot append
            raise TrajectoryError(
                f"TrajectoryCallback: training resumes from a checkpoint at step {global_step}, but {self.path!r} "
                f"holds no readable recording of the steps before it ({type(err).__name__}: {err}); the recording "
                "must start at θ_0 with the optimizer's initial state. Re-run from the start with the callback"
            ) from err
        if done != global_step:
            raise TrajectoryError(
                f"TrajectoryCallback: training resumes from a checkpoint at step {global_step}, but the recording at "
                f"{self.path!r} has {done} steps; it can only be continued from a checkpoint at its last step "
                f"({done}). Resume from checkpoint-{done}, or record the run again from the start"
            )

    @staticmethod
    def _skipped_batches(args: Any, state: Any, loader: Any) -> int:
        """Micro-batches of the resumed epoch the Trainer skips (its ``steps_trained_in_current_epoch``)."""
        if getattr(args, "ignore_data_skip", False):
            return 0
        try:
            n = len(loader)
        except TypeError:
            return 0
        accum = max(1, int(args.gradient_accumulation_steps))
        per_epoch = max(1, n // accum + int(n % accum > 0))
        return (state.global_step % per_epoch) * accum

    def _check_attention_replay(self, model: nn.Module) -> None:
        """Fused attention kernels draw their dropout masks their own way: the analysis (math SDPA
        or eager attention) cannot rebuild them, so say so before training rather than after."""
        config = getattr(model, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        p = max(float(getattr(config, k, 0.0) or 0.0) for k in ("attention_probs_dropout_prob", "attention_dropout",
                                                                "attn_pdrop"))
        device = next(model.parameters()).device
        if self._rng and p > 0 and impl not in (None, "eager") and device.type != "cpu":
            self._warn("attention", f"TrajectoryCallback: attention dropout (p={p}) runs in the fused "
                                    f"attn_implementation={impl!r} kernels on {device.type}, whose masks the analysis "
                                    "cannot replay; the data view's residual will show it. Train with "
                                    "attn_implementation='eager' for exact replay")

    def _note_batches(self, loader: Any) -> None:
        sampler = getattr(loader, "batch_sampler", None)
        dataset = getattr(loader, "dataset", None)
        if sampler is None or isinstance(dataset, torch.utils.data.IterableDataset):
            self._warn("iterable", "TrajectoryCallback: the train loader has no batch sampler over a map-style dataset "
                                   "(an IterableDataset?); dataset indices are not recorded, so the data view cannot "
                                   "be used (the model and training views can)")
            return
        cls = type(sampler)
        sampler._explaind_queue = self._queue
        sampler.__class__ = _noting_class(cls)
        self._sampler, self._sampler_class = sampler, cls

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._sampler is not None and self._sampler_class is not None:
            self._sampler.__class__ = self._sampler_class
            try:
                del self._sampler._explaind_queue
            except AttributeError:  # pragma: no cover
                pass
        self._sampler = self._sampler_class = None

    def _reset(self) -> None:
        self._detach()
        self._queue.clear()
        self._window, self._current, self._trajectory, self._finished = [], None, None, False
        self._checks, self._honours_num_items, self.loss_normalization = 0, None, None

    def _set_mode(self, mode: str) -> None:
        if mode in ("outside the model", "unknown") and self.loss_normalization != mode:
            why = ("the Trainer computed the loss outside the model (compute_loss_func or label smoothing)"
                   if mode == "outside the model" else "the model's loss has no known per-sample form")
            self._warn(mode, f"TrajectoryCallback: {why}; the recorded weights are the micro-batch mean 1/|B|; "
                             "pass the analysis a loss_fn matching training (and check its residual)")
        self.loss_normalization = mode

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
