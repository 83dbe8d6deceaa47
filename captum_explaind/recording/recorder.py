"""Record a PyTorch training run to disk, step by step, without rewriting the training loop.

Example::

    >>> recorder = TrajectoryRecorder(model, optimizer, "runs/mlp", scheduler=scheduler)
    >>> with recorder:
    ...     for epoch in range(3):
    ...         for x, y in recorder.track(train_loader):      # dataset indices captured here
    ...             optimizer.zero_grad()
    ...             loss_fn(model(x), y).backward()
    ...             optimizer.step()                          # recorded by an optimizer hook
    ...             scheduler.step()
    >>> trajectory = recorder.trajectory
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import distributed
from ..errors import TrajectoryError, TrajectoryWriteError
from . import arguments, directory
from . import format as fmt
from .ddp import FollowerLock, FollowerWriter, gathered
from .indexing import TrackedDataLoader
from .lock import DirectoryLock
from .optim_spec import group_hyperparameters, optimizer_family, unwrap_optimizer
from .resume import check_manifest_compatible, check_state_matches
from .trajectory import Trajectory
from .writer import Snapshot, StepWriter

__all__ = ["TrajectoryRecorder"]

# Optimizer state the EPK core needs later, per family. Adam's first moment is *not* needed:
# the kernel part is re-derived from the recorded updates (model/training views) or from
# replayed per-sample gradients (data view).
_STATE_KEYS = {"adam": ("exp_avg_sq", "max_exp_avg_sq"), "adamw": ("exp_avg_sq", "max_exp_avg_sq")}


# optimizer -> hook handle of the closed recorder watching it for steps after close
_AFTER_CLOSE: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _describe_holder(info: Dict[str, Any]) -> str:
    return f"process {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started_utc', '?')}"


def _remove_empty_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def training_modes(model: nn.Module) -> Dict[str, List[str]]:
    """Modules whose training-mode forward couples samples or draws random numbers.

    Returns:
        *dict*: ``"batch_norm"``: qualified names of batch-normalization modules that normalize
        with batch statistics (in train mode, or without running statistics); ``"dropout"``:
        dropout modules with ``p > 0`` in train mode.
    """
    bn, drop = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            bn.append(name)
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.training and float(m.p) > 0:
            drop.append(name)
    return {"batch_norm": bn, "dropout": drop}


def _first_nonfinite(named: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The first name whose tensor holds a NaN or inf, or None. NaN and inf propagate into a
    norm, so one batched reduction settles every tensor with a finite norm; a tensor whose norm
    overflows (large but finite entries) falls back to the elementwise test."""
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    try:
        norms = torch.stack([v.float().cpu() for v in torch._foreach_norm([t for _, t in named], 2)])
    except (RuntimeError, TypeError):  # pragma: no cover - no foreach norm for these tensors
        norms = torch.stack([torch.linalg.vector_norm(t).float().cpu() for _, t in named])
    for (name, t), ok in zip(named, torch.isfinite(norms).tolist()):
        if not ok and not bool(torch.isfinite(t).all()):
            return name
    return None


def _norms64(grads: List[torch.Tensor]) -> List[float]:
    """2-norms of ``grads``, each accumulated in float64 (the data view divides the recorded
    norm by its replayed one, so it must not carry float32 rounding); one batched call."""
    gs = [g.detach() for g in grads]
    try:
        norms = list(torch._foreach_norm(gs, 2, dtype=torch.float64))
    except (RuntimeError, TypeError):  # pragma: no cover - builds without foreach norm dtype=
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in gs]
    return [float(v) for v in torch.stack([v.cpu() for v in norms]).tolist()]


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0 for m in model.modules())


def _rng_states(model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``torch.get_rng_state()`` and, for a model on CUDA, the state of its device's generator."""
    cuda = None
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        cuda = torch.cuda.get_rng_state(p.device)
    return torch.get_rng_state(), cuda


def _library_version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


class TrajectoryRecorder:
    r"""Records θ_0 on creation and every ``optimizer.step()`` after it, to ``path``.

    The recorder registers optimizer step hooks, so the training loop only has to tell it which
    training samples formed each step: either pass the loader through :meth:`track` (dataset
    indices are captured automatically), or call :meth:`log_batch` for every (micro-)batch whose
    gradient feeds the next ``optimizer.step()``.

    Per step it stores: the trainable parameters after the step (parameters the optimizer does
    not own are stored once, in θ_0), the learning rate and hyperparameters each parameter group
    actually used (read in the step pre-hook, i.e. before ``scheduler.step()``), the optimizer
    state later views need (Adam(W): ``exp_avg_sq``, ``max_exp_avg_sq`` and per-parameter step
    counts), the squared norm of each parameter's gradient as the optimizer saw it (after
    clipping, loss scaling and accumulation, so the applied global scale can be *measured* at
    replay), which parameters had no gradient, buffers that changed (BatchNorm statistics), and
    the indices and weights of every micro-batch.

    Args:
        model (nn.Module): the model being trained.
        optimizer (torch.optim.Optimizer): its optimizer; wrappers exposing ``.optimizer`` (such as
            accelerate's ``AcceleratedOptimizer``) are unwrapped.
        path (str or os.PathLike): directory to create. It must not exist (or be empty) unless
            ``overwrite=True`` or ``resume=True``. A lock file (``.lock``) keeps a second recorder
            (in this process or another) out while this one records.
        scheduler (optional): the learning-rate scheduler, recorded for reference. Learning rates
            are always read from the optimizer right before each step, so any scheduler, stepped
            at any point of the loop, is recorded correctly.
        overwrite (bool, optional): replace an existing *trajectory* at ``path`` (never another
            directory): only the files this library wrote are removed. Default: False
        resume (bool or int, optional): append to the recording at ``path`` (interrupted, or
            closed), after checking that the model's parameters and buffers and the optimizer's
            recorded state equal (as stored) those of its last complete step. An int ``k``
            continues after step ``k`` instead (training resumed from an earlier checkpoint, as
            ``Trainer(resume_from_checkpoint=...)`` does): the recorded steps after ``k`` are
            removed, last first, once the state matches step ``k``. Default: False
        store_dtype (torch.dtype, optional): dtype parameters and optimizer state are stored in;
            ``None`` keeps each tensor's own dtype. ``torch.float64`` is useful when training in
            float64 for exactness studies. Default: None
        record_optimizer_state (bool, optional): store Adam's ``exp_avg_sq`` (needed by the data
            view and by the regularization part of Adam with L2 decay). Default: True
        reduction (str, optional): how :meth:`log_batch` weights samples when no weights are
            given: ``"mean"`` (each of n samples weighs 1/n, as ``loss.mean()``) or ``"sum"``
            (weight 1). A global factor (``loss / accumulation_steps``, loss scaling, clipping) is
            measured at replay and needs no weights. Default: "mean"
        check_finite (bool, optional): warn as soon as a step produces NaN/inf parameters.
            Default: True
        record_rng ("auto", True or False, optional): store the RNG state(s) right before each
            micro-batch's training forward (``MicroBatch.rng_state``/``cuda_rng_state``), so that
            dropout masks can be replayed exactly. ``"auto"``: when the model has a dropout module
            with ``p > 0``. A forward pre-hook on the model captures the state at the first
            training-mode forward of each logged micro-batch (whether ``log_batch`` is called
            before or after it), unless ``log_batch`` was given ``rng_state``. Default: "auto"
        background (bool, optional): write step files in a background thread, so training does
            not wait for the disk; a step counts (``num_steps``) once its file is durably in
            place, :meth:`close` waits for every pending write, and a failed write is raised at
            the next step or at close. The training thread only copies the step's gradients,
            parameters and optimizer state into reused host buffers (a snapshot); the float64
            gradient norms, the finite check, checksums, serialization, write and fsync run in the
            writer thread, so the records are bit-identical to a synchronous recording's.
            Default: False
        max_pending (int, optional): background mode: how many steps may wait for the disk, each
            holding its snapshot in host memory (the trainable parameters, the optimizer state and
            the gradients: ~1.5 × :meth:`bytes_per_step` for float32 Adam); the pre-hook of a step
            beyond that waits for the oldest write before the optimizer moves (backpressure).
            Default: 2
        ddp (bool, optional): record a ``DistributedDataParallel`` run: every rank creates a
            recorder (same ``path``) and logs its own micro-batches; rank 0 writes, with the
            micro-batches of all ranks gathered at each step (weights ÷ world size, as DDP averages
            the ranks' gradients). ``None``: on inside an initialized process group of more than one
            rank; ``False`` records this process alone (e.g. only on rank 0). Default: None
        keep_every (int, optional): store the parameters of every ``keep_every``-th optimizer
            step only (and of the last one, at close): each stored "step" of the trajectory is then
            a macro-step through ``keep_every`` optimizer steps, holding all their micro-batches and
            the summed regularization part of their updates, so the model and training views stay
            exact along the polyline through the kept checkpoints. The data view needs every step
            and refuses such a trajectory. Supported for decoupled weight decay (AdamW) and coupled
            decay without momentum (plain SGD); Adam's L2 decay and SGD momentum with decay carry
            the regularization through momentum and are refused. Default: 1

    Any failed write stops the recording (fail closed): later ``optimizer.step()`` calls raise
    :class:`TrajectoryWriteError` naming the first failure, and the manifest marks the run
    aborted at that step, so no later step can be recorded under a wrong number.
    """

    @classmethod
    def check_options(cls, path: Union[str, os.PathLike], **options: Any) -> None:
        """Refuse, by name, options the recorder does not take or whose values are invalid — before
        any model or optimizer exists (e.g. when a training callback is created, not when training
        has started).

        Args:
            path (str or os.PathLike): the trajectory directory.
            **options: keyword arguments of :class:`TrajectoryRecorder` (besides model, optimizer, path).

        Raises:
            TypeError: an option the recorder does not take, or a flag that is not a bool.
            ValueError: an option value the recorder would refuse.
        """
        params = inspect.signature(cls.__init__).parameters
        takes = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(takes))
        if unknown:
            raise TypeError(f"TrajectoryRecorder takes no option(s) {unknown}; its options are {takes}")
        values = {n: options.get(n, params[n].default) for n in
                  ("reduction", "store_dtype", "record_rng", "resume", "overwrite", "background",
                   "check_finite", "record_optimizer_state", "max_pending")}
        arguments.check_values(path, **values)

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        path: Union[str, os.PathLike],
        *,
        scheduler: Any = None,
        overwrite: bool = False,
        resume: Union[bool, int] = False,
        store_dtype: Optional[torch.dtype] = None,
        record_optimizer_state: bool = True,
        reduction: str = "mean",
        check_finite: bool = True,
        record_rng: Union[str, bool] = "auto",
        background: bool = False,
        max_pending: int = 2,
        ddp: Optional[bool] = None,
        keep_every: int = 1,
    ) -> None:
        arguments.check_options(model, path, reduction=reduction, store_dtype=store_dtype, record_rng=record_rng,
                       resume=resume, overwrite=overwrite, background=background, check_finite=check_finite,
                       record_optimizer_state=record_optimizer_state, max_pending=max_pending)
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer)
        self.path = os.fspath(path)
        self.scheduler = scheduler
        self.store_dtype = store_dtype
        self.reduction = reduction
        self.check_finite = check_finite
        self.family = optimizer_family(self.optimizer)
        self.state_keys = _STATE_KEYS.get(self.family, ()) if record_optimizer_state else ()
        # "auto": any dropout with p > 0, whatever the mode now (models often start in eval mode)
        self.record_rng = _has_dropout(model) if record_rng == "auto" else bool(record_rng)
        self._names = self._name_parameters()
        self._buffers = dict(model.named_buffers())

        self._step = 0  # steps handed to the writer (the number the next step gets is _step + 1)
        self._durable = 0  # steps whose files are durably written (the complete prefix)
        self._pending: List[fmt.MicroBatch] = []
        self._awaiting_rng = False  # the last logged micro-batch waits for its forward's RNG state
        self._unclaimed_rng: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._pre: Optional[Dict[str, Any]] = None
        self._closed = False
        self._handles: List[Any] = []
        self._nonfinite_warned = False
        self._nonfinite: Optional[Tuple[int, str]] = None  # (step, parameter) of the first NaN/inf
        self._snap: Optional[Snapshot] = None  # background: the snapshot of the step being taken
        self._grad_bufs: List[Tuple[str, torch.Tensor]] = []  # its gradients (norms taken by the writer)
        self._training_modes: Optional[Dict[str, List[str]]] = None
        self._initial_groups = group_hyperparameters(self.optimizer)
        self._history: Dict[str, Any] = {}  # manifest keys kept across writes (resumes, warnings)
        self._failure: Optional[Tuple[int, str]] = None  # (step, message) of the first failed write
        self._refused = 0  # optimizer steps refused after the failure
        self._unbatched: List[int] = []  # steps recorded without a logged batch
        self._writer: Union[StepWriter, FollowerWriter] = StepWriter(background, max_pending)
        self._failure_reported = False
        self._closed_versions: Dict[str, int] = {}
        self._steps_after_close = 0

        self._lock: Union[DirectoryLock, FollowerLock] = DirectoryLock(self.path)
        # Under DDP (torchrun) rank 0 writes; the other ranks only hand it their micro-batches.
        self._ddp = distributed.active() if ddp is None else bool(ddp) and distributed.active()
        self._keep = arguments.check_keep_every(keep_every, self.optimizer, self.family)
        self._inner = 0  # optimizer steps folded into the macro-step being collected
        self._macro_reg: Dict[str, torch.Tensor] = {}  # summed regularization part R of those steps
        self._held_pre: Optional[Dict[str, Any]] = None
        if self._keep > 1:
            self._history["keep_every"] = self._keep
        self._follower = self._ddp and not distributed.is_writer()
        if self._follower:
            self._writer.close()
            self._writer, self._lock = FollowerWriter(), FollowerLock()
        created = False if self._follower else self._open_directory(overwrite, resume is not False)
        try:
            if self._follower:
                pass
            elif resume is not False:
                self._resume(None if resume is True else int(resume))
            else:
                self._write_initial()
                self._write_manifest(status="recording")
        except BaseException:
            self._abandon(created)
            raise
        if self._lock.stale:
            warnings.warn(
                f"{self.path!r}: took over the stale lock of {_describe_holder(self._lock.stale)}, which died "
                f"while recording there; {'resuming' if resume is not False else 'replacing'} its recording",
                RuntimeWarning,
                stacklevel=2,
            )
        self._last_buffers = {k: v.detach().to("cpu", copy=True) for k, v in self._buffers.items()}
        self._versions = self._param_versions()
        # a closed recorder's "step after close" watch ends when a new recorder takes over
        old_watch = _AFTER_CLOSE.pop(self.optimizer, None)
        if old_watch is not None:
            old_watch.remove()
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
        ]
        if self.record_rng:
            self._handles.append(model.register_forward_pre_hook(self._capture_rng))
        if self._ddp:
            distributed.barrier()  # θ_0 and the manifest are on disk before any rank trains

    # ------------------------------------------------------------------ set-up
    def _name_parameters(self) -> Dict[int, str]:
        """Map the optimizer's parameters to model names; trainable = owned by the optimizer."""
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        self._group_of: Dict[str, int] = {}
        names: Dict[int, str] = {}
        for g, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in by_id:
                    raise TrajectoryError(
                        f"optimizer parameter group {g} holds a tensor of shape {tuple(p.shape)} that "
                        "is not a parameter of the model; record the model the optimizer trains"
                    )
                name = by_id[id(p)]
                if name in self._group_of:
                    raise TrajectoryError(f"parameter {name!r} appears in more than one optimizer group")
                self._group_of[name] = g
                names[id(p)] = name
        if not names:
            raise TrajectoryError("the optimizer owns no parameters of the model")
        # Parameters frozen with requires_grad_(False) never get a gradient, so torch never moves
        # them even when the optimizer holds them: store them once, like the others it lacks.
        self._frozen_in_optimizer = [
            n for n, p in self.model.named_parameters() if n in self._group_of and not p.requires_grad
        ]
        for n in self._frozen_in_optimizer:
            del self._group_of[n]
        if not self._group_of:
            raise TrajectoryError("the optimizer owns no parameter of the model that requires grad")
        # Fixed order: the model's own parameter order.
        self.trainable = [n for n, _ in self.model.named_parameters() if n in self._group_of]
        self.frozen = [n for n, _ in self.model.named_parameters() if n not in self._group_of]
        self._params = dict(self.model.named_parameters())
        return names

    # ------------------------------------------------------------------ directory
    def _open_directory(self, overwrite: bool, resume: bool) -> bool:
        """Create ``path`` if needed, take its lock, and clear it for a new recording (or check
        that there is one to resume). Returns whether the directory was created here."""
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise FileExistsError(f"trajectory path {self.path!r} exists and is not a directory")
        created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        try:
            self._lock.acquire()
        except BaseException:
            if created:
                _remove_empty_dir(self.path)
            raise
        try:
            self._check_directory(overwrite, resume)
        except BaseException:
            self._abandon(created)
            raise
        os.makedirs(os.path.join(self.path, fmt.STEPS_DIR), exist_ok=True)
        return created

    def _check_directory(self, overwrite: bool, resume: bool) -> None:
        stale = self._lock.stale
        died = (f" Its previous recorder ({_describe_holder(stale)}) died without closing it (stale lock)."
                if stale else "")
        others = directory.other_entries(self.path)
        ours = directory.library_files(self.path)
        if resume:
            if not directory.is_trajectory_dir(self.path):
                raise FileNotFoundError(
                    f"resume=True, but {self.path!r} holds no trajectory to resume (no captum_explaind "
                    "manifest.json); start a new recording without resume=True"
                )
        elif ours or others:
            if not directory.is_trajectory_dir(self.path):
                raise FileExistsError(
                    f"refusing to record into {self.path!r}: it is not empty and is not a trajectory recorded by "
                    f"this library (no captum_explaind manifest.json; it holds {others[:5]}); choose another path"
                )
            if not overwrite:
                raise FileExistsError(
                    f"trajectory path {self.path!r} already holds a recording.{died} Pass resume=True to continue "
                    "an interrupted recording from its last complete step (the model and optimizer must be in "
                    "that step's state), overwrite=True to replace it (only the files this library wrote are "
                    "removed), or choose another path"
                )
            directory.remove_library_files(self.path)

    def _abandon(self, created: bool) -> None:
        """Undo a failed construction: release the lock (and drop a directory created here)."""
        self._writer.close()
        self._lock.release(keep_stale=True)
        if created:
            _remove_empty_dir(os.path.join(self.path, fmt.STEPS_DIR))
            _remove_empty_dir(self.path)

    def _resume(self, at: Optional[int]) -> None:
        """Continue the recording at ``path`` after its last step (or step ``at``), once the model
        and optimizer are checked to be in that step's state."""
        steps = os.path.join(self.path, fmt.STEPS_DIR)
        for name in os.listdir(steps):  # files a killed writer left half-written
            if name.endswith(fmt.TMP_SUFFIX) and fmt.parse_step_filename(name[: -len(fmt.TMP_SUFFIX)]):
                os.unlink(os.path.join(steps, name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not closed", "aborted": expected of what is resumed
            traj = Trajectory.open(self.path)
        old = traj.manifest
        check_manifest_compatible(old, self._manifest("recording"), self.path)
        step = traj.num_steps if at is None else at
        if step > traj.num_steps:
            raise TrajectoryError(
                f"cannot resume {self.path!r} after step {step}: it holds only {traj.num_steps} complete steps"
            )
        check_state_matches(traj, self.model, self.optimizer, self._stored, self.trainable, step=step)
        for s in range(traj.num_steps, step, -1):  # last first: a crash here still leaves a prefix
            os.unlink(os.path.join(steps, fmt.step_filename(s)))
        self._step = self._durable = step
        self._created = old.get("created_utc")
        self._initial_groups = old["optimizer"].get("groups", self._initial_groups)
        self._training_modes = old.get("training_modes")
        for key in ("resumed", "modified_outside_step", "steps_without_batch"):
            if key in old:
                self._history[key] = old[key]
        self._history.setdefault("resumed", []).append(
            {"at_step": step, "utc": _now(), "dropped_steps": traj.num_steps - step})
        self._write_manifest(status="recording")

    def _check_alive(self) -> None:
        """Before a step: refuse after a failure; detect a lost directory or a replaced layer."""
        if self._failure is None and self._writer.error is not None:
            self._fail_from_writer()
        if self._failure is not None:
            self._refused += 1
            self._failure_reported = True
            step, message = self._failure
            raise TrajectoryWriteError(
                f"recording to {self.path!r} failed at step {step} ({message}); it holds the complete steps "
                f"1..{step - 1} and records nothing more, so no later step can take a wrong number. This "
                "optimizer step was not taken. Fix the cause, then resume=True from a checkpoint of step "
                f"{step - 1}, or record anew"
            )
        try:
            self._lock.check()
            for name in (() if self._follower else (fmt.MANIFEST, fmt.INITIAL, fmt.STEPS_DIR)):
                if not os.path.exists(os.path.join(self.path, name)):
                    raise TrajectoryError(f"{os.path.join(self.path, name)!r} was deleted while recording")
            now = dict(self.model.named_parameters())
            for name, p in self._params.items():
                if now.get(name) is not p:
                    raise TrajectoryError(
                        f"the model's parameter {name!r} is no longer the tensor being recorded (a layer was "
                        "replaced or removed after the recorder was created); record the model as it trains: "
                        "start a new recording after changing the model"
                    )
        except TrajectoryError as err:
            self._fail(self._step + 1, err)
            self._failure_reported = True
            raise

    def _fail_from_writer(self) -> None:
        """Fail closed at the step whose (background) write failed."""
        assert self._writer.error is not None
        failed = os.path.basename(self._writer.failed_path or "")
        self._fail(fmt.parse_step_filename(failed) or self._durable + 1, self._writer.error)

    def _fail(self, step: int, err: BaseException) -> None:
        """Fail closed: remember the first failure, drop its partial file, mark the run aborted."""
        if self._failure is not None:
            return
        self._failure = (step, f"{type(err).__name__}: {err}")
        target = os.path.join(self.path, fmt.STEPS_DIR, fmt.step_filename(step))
        for p in (target, target + fmt.TMP_SUFFIX):
            try:
                os.unlink(p)
            except OSError:
                pass
        try:
            self._write_manifest(status="closed", extra=self._aborted_info())
        except Exception:  # noqa: BLE001 - the disk may be full; open() then says "not closed"
            pass

    def _aborted_info(self) -> Dict[str, Any]:
        assert self._failure is not None
        step, message = self._failure
        return {"aborted": f"write of step {step} failed: {message}", "aborted_at_step": step,
                "closed_utc": _now()}

    def _stored(self, tensor: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """``tensor`` as it is stored (store dtype, on CPU); ``copy=False`` may return the live
        memory itself (only for a write that finishes before the tensor changes)."""
        out = tensor.detach()
        if self.store_dtype is not None and out.is_floating_point():
            out = out.to(self.store_dtype)
        return out.to("cpu", copy=copy)

    def _write_initial(self) -> None:
        tensors = {fmt.PARAM_PREFIX + n: self._stored(p) for n, p in self.model.named_parameters()}
        tensors.update({fmt.BUFFER_PREFIX + n: self._stored(b) for n, b in self._buffers.items()})
        fmt.write_safetensors(os.path.join(self.path, fmt.INITIAL), tensors)

    def _manifest(self, status: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        def dt(t: torch.Tensor) -> str:
            if self.store_dtype is not None and t.is_floating_point():
                return fmt.dtype_to_str(self.store_dtype)
            return fmt.dtype_to_str(t.dtype)

        params = []
        for n, p in self.model.named_parameters():
            params.append(
                {
                    "name": n,
                    "shape": list(p.shape),
                    "dtype": dt(p),
                    "model_dtype": fmt.dtype_to_str(p.dtype),
                    "trainable": n in self._group_of,
                    "group": self._group_of.get(n),
                }
            )
        opt = self.optimizer
        manifest = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "status": status,
            "num_steps": self._durable if status != "recording" else None,
            "created_utc": getattr(self, "_created", None) or _now(),
            "library_version": _library_version(),
            "torch_version": torch.__version__,
            "model": {
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "params": params,
                "buffers": [
                    {"name": n, "shape": list(b.shape), "dtype": dt(b)} for n, b in self._buffers.items()
                ],
            },
            "optimizer": {
                "class": type(opt).__qualname__,
                "module": type(opt).__module__,
                "family": self.family,
                "n_groups": len(opt.param_groups),
                "groups": self._initial_groups,
                "state_keys": list(self.state_keys),
            },
            "scheduler": None if self.scheduler is None else type(self.scheduler).__qualname__,
            "recording": {
                "store_dtype": None if self.store_dtype is None else fmt.dtype_to_str(self.store_dtype),
                "reduction": self.reduction,
                "optimizer_state": bool(self.state_keys),
                "rng": self.record_rng,
            },
        }
        self._created = manifest["created_utc"]
        if self._training_modes is not None:
            manifest["training_modes"] = self._training_modes
        manifest.update(self._history)
        if extra:
            manifest.update(extra)
        return manifest

    def _write_manifest(self, status: str, extra: Optional[Dict[str, Any]] = None) -> None:
        if self._follower:
            return
        fmt.write_manifest(os.path.join(self.path, fmt.MANIFEST), self._manifest(status, extra))

    # ------------------------------------------------------------------ batches
    def log_batch(
        self,
        indices: Any,
        weights: Any = None,
        *,
        rng_state: Optional[torch.Tensor] = None,
        cuda_rng_state: Optional[torch.Tensor] = None,
    ) -> None:
        """Log one (micro-)batch whose gradient feeds the next ``optimizer.step()``.

        Call it once per backward pass; with gradient accumulation, once per micro-batch.

        Args:
            indices (Tensor, ndarray or sequence of int): dataset indices of the samples (repeats
                allowed: a duplicated sample counts twice).
            weights (Tensor, ndarray or sequence of float, optional): weight of each sample in
                the loss that was differentiated, so that the gradient is Σ w_k ∇L_k up to one
                global factor per step (which is measured at replay). ``None`` uses the
                recorder's ``reduction`` (mean: 1/len(indices)). Default: None
            rng_state (Tensor, optional): ``torch.get_rng_state()`` taken right before this
                micro-batch's forward; ``None`` lets the recorder capture it (``record_rng``).
            cuda_rng_state (Tensor, optional): ``torch.cuda.get_rng_state(device)`` likewise.
        """
        if self._closed:
            raise RuntimeError(f"this recorder of {self.path!r} is closed")
        idx = arguments.as_indices(indices)
        if weights is None:
            w = torch.full((idx.numel(),), 1.0 / max(idx.numel(), 1) if self.reduction == "mean" else 1.0,
                           dtype=torch.float64)
        else:
            w = arguments.as_weights(weights, idx.numel())
        mb = fmt.MicroBatch(indices=idx.clone(), weights=w.clone())
        if rng_state is not None or cuda_rng_state is not None:
            mb.rng_state = None if rng_state is None else arguments.as_rng_state(rng_state, "rng_state")
            mb.cuda_rng_state = (None if cuda_rng_state is None
                                 else arguments.as_rng_state(cuda_rng_state, "cuda_rng_state"))
        elif self.record_rng and self._unclaimed_rng is not None:
            # its forward already ran (log_batch called after backward): that forward's state
            mb.rng_state, mb.cuda_rng_state = self._unclaimed_rng
            self._unclaimed_rng = None
        else:
            self._awaiting_rng = self.record_rng
        self._pending.append(mb)

    def _capture_rng(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: the RNG state(s) right before a training forward, for its micro-batch."""
        if self._closed or not module.training:
            return
        if self._awaiting_rng and self._pending:
            self._pending[-1].rng_state, self._pending[-1].cuda_rng_state = _rng_states(module)
            self._awaiting_rng = False
        elif self._unclaimed_rng is None:
            # log_batch comes after this forward: keep the state for it
            self._unclaimed_rng = _rng_states(module)

    def discard_batches(self) -> None:
        """Forget the micro-batches logged since the last step.

        Use it when a step is skipped without calling ``optimizer.step()`` (for example by
        ``torch.amp.GradScaler`` after an overflow), so that its batches are not attributed to
        the next step.
        """
        self._pending = []
        self._awaiting_rng = False
        self._unclaimed_rng = None

    def track(self, loader: torch.utils.data.DataLoader) -> TrackedDataLoader:
        """Wrap ``loader`` so that the dataset indices of each yielded batch are logged.

        The returned object iterates exactly like ``loader`` (same sampler order, collate
        function and workers). Each batch's indices are logged with the default weights of
        ``reduction`` when the batch is handed to the loop.

        Args:
            loader (DataLoader): a loader over a map-style dataset.

        Returns:
            *TrackedDataLoader*: iterate it instead of ``loader``.
        """
        return TrackedDataLoader(loader, self.log_batch)

    # ------------------------------------------------------------------ hooks
    def _param_versions(self) -> Dict[str, int]:
        # torch bumps a tensor's version at every in-place change: optimizer.step(), but also
        # p.mul_(), load_state_dict, ... — so a change between steps is seen without a copy.
        return {n: p._version for n, p in self._params.items()}

    def _check_versions(self, step: int) -> None:
        changed = [n for n, v in self._param_versions().items() if v != self._versions.get(n)]
        if not changed:
            return
        first = "modified_outside_step" not in self._history
        self._history.setdefault("modified_outside_step", []).append(step)
        if first:
            warnings.warn(
                f"{self.path!r}: parameters {changed[:5]} changed outside optimizer.step() before step {step} "
                "(an in-place edit, load_state_dict, ...); the recorded update of that step includes the "
                "change, so explanations of it will not match the optimizer's rule (its residual shows it)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        self._check_alive()
        self._check_versions(self._step + 1)
        for name in self._frozen_in_optimizer:
            if self._params[name].grad is not None:
                # The optimizer would move it, but the trajectory stores it only at θ_0.
                raise TrajectoryError(
                    f"parameter {name!r} had requires_grad=False when recording started but has a "
                    "gradient now; unfreezing mid-run is not supported: start a new recording after unfreezing"
                )
        grads, names, inactive = [], [], []
        for name in self.trainable:
            p = self._params[name]
            if p.grad is None:
                inactive.append(name)
            else:
                if p.grad.is_sparse:
                    raise TrajectoryError(f"parameter {name!r} has a sparse gradient; sparse updates are not supported")
                grads.append(p.grad)
                names.append(name)
        self._report_nonfinite()
        self._grad_bufs = []
        if self._keep == 1 and self._writer.background and getattr(self._writer, "running", False):
            # Background: the gradients join the step's snapshot (the optimizer or the next
            # backward may change them) and their norms are taken in the writer thread. Waiting
            # for a free snapshot happens here, before the optimizer moves.
            if self._snap is None:  # else: a step that raised between the hooks left it
                self._snap = self._writer.snapshot()
            snap = self._snap
            if snap is not None:
                self._grad_bufs = [(n, snap.take("grad/" + n, g)) for n, g in zip(names, grads)]
                snap.copy()
        grad_sq = {} if self._grad_bufs or not grads else {n: v ** 2 for n, v in zip(names, _norms64(grads))}
        if self._step == 0:
            self._first_modes = training_modes(self.model)
        hyper = group_hyperparameters(optimizer)
        lrs = [float(h.pop("lr")) for h in hyper]
        self._pre = {"lr": lrs, "groups": hyper, "inactive": inactive, "grad_sq": grad_sq}
        if self._keep > 1:
            self._add_regularization(optimizer, lrs, set(inactive))

    def _take(self, snap: Optional[Snapshot], key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as stored: in ``snap``'s buffer (background; filled by ``snap.copy()``), or the
        live memory itself (a synchronous write is done before the step returns), or a copy (a
        background writer already closed)."""
        if snap is not None:
            dtype = self.store_dtype if self.store_dtype is not None and tensor.is_floating_point() else None
            return snap.take(key, tensor, dtype)
        return self._stored(tensor, copy=self._writer.background)

    def _collect_step(
        self, step: int, optimizer: torch.optim.Optimizer, snap: Optional[Snapshot] = None
    ) -> Tuple[Dict[str, torch.Tensor], Any]:
        """The tensors and metadata of step ``step``'s file: the large ones in ``snap`` (background
        mode; the metadata is then a function the writer thread calls), the others copied off the
        live model."""
        assert self._pre is not None
        tensors: Dict[str, torch.Tensor] = {}
        state_step: Dict[str, int] = {}
        for name in self.trainable:
            p = self._params[name]
            tensors[fmt.PARAM_PREFIX + name] = self._take(snap, fmt.PARAM_PREFIX + name, p)
            state = optimizer.state.get(p, {})
            for key in self.state_keys:
                if key in state and isinstance(state[key], torch.Tensor):
                    k = f"{fmt.STATE_PREFIX}{name}/{key}"
                    tensors[k] = self._take(snap, k, state[key])
            if "step" in state:
                state_step[name] = int(float(state["step"]))
        if snap is not None:
            snap.copy()  # the snapshot: from here on training may change the live tensors
        stored = [(n, tensors[fmt.PARAM_PREFIX + n]) for n in self.trainable]
        for name, buf in self._buffers.items():
            now = buf.detach().to("cpu", copy=True)
            if not torch.equal(now, self._last_buffers[name]):
                self._last_buffers[name] = now
                tensors[fmt.BUFFER_PREFIX + name] = self._stored(buf)
        record = fmt.StepRecord(step=step, state_step=state_step, batches=self._pending, **self._pre)
        tensors.update(fmt.pack_batches(self._pending))
        for name, reg in self._macro_reg.items():
            tensors[fmt.REG_PREFIX + name] = self._stored(reg)
        self._macro_reg = {}
        obj = record.to_json()
        obj["family"] = self.family
        if snap is None:
            self._check_finite(step, stored)
            self._report_nonfinite()
            return tensors, {"record": json.dumps(obj)}
        grad_bufs, self._grad_bufs = self._grad_bufs, []

        def metadata() -> Dict[str, str]:
            # runs in the writer thread, on the snapshot: the gradients' float64 norms, the finite check
            if grad_bufs:
                obj["grad_sq"] = {n: v ** 2 for n, v in zip([n for n, _ in grad_bufs],
                                                            _norms64([b for _, b in grad_bufs]))}
            self._check_finite(step, stored)
            return {"record": json.dumps(obj)}

        return tensors, metadata

    def _check_finite(self, step: int, stored: List[Tuple[str, torch.Tensor]]) -> None:
        """Note the first step that stores a NaN/inf parameter (warned by :meth:`_report_nonfinite`)."""
        if self.check_finite and self._nonfinite is None:
            name = _first_nonfinite(stored)
            if name is not None:
                self._nonfinite = (step, name)

    def _report_nonfinite(self) -> None:
        """Warn (once) about a non-finite step: right after it (synchronous writes), or at the
        next step or close (background: the check runs in the writer thread)."""
        if self._nonfinite is not None and not self._nonfinite_warned:
            self._nonfinite_warned = True
            step, name = self._nonfinite
            warnings.warn(
                f"step {step}: parameter {name!r} is not finite (NaN/inf); the step is "
                "recorded, but the trajectory cannot be explained past it",
                RuntimeWarning,
                stacklevel=4,
            )

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed or self._pre is None:
            return
        if self._keep > 1 and not self._end_of_macro_step():
            return
        step = self._step + 1
        if self._ddp:
            self._pending = gathered(self._pending)
        if not self._pending:
            self._warn_unbatched(step)
        path = os.path.join(self.path, fmt.STEPS_DIR, fmt.step_filename(step))
        # background: the snapshot taken at the pre-hook, or a free one (waits while max_pending
        # steps are unwritten)
        snap, self._snap = self._snap, None
        if snap is None:
            snap = self._writer.snapshot()
        try:
            tensors, metadata = self._collect_step(step, optimizer, snap)
        except BaseException:
            self._writer.release(snap)
            raise
        try:
            self._writer.submit(path, tensors, metadata, self._step_written, snap)
        except BaseException as err:
            self._failure_reported = True
            if self._writer.background and self._writer.error is not None and self._failure is None:
                # an earlier step's background write failed after this step's pre-hook looked
                self._fail_from_writer()
                failed, message = self._failure or (step, "")
                raise TrajectoryWriteError(
                    f"recording to {self.path!r} failed at step {failed} ({message}); it holds the complete "
                    f"steps 1..{failed - 1} and records nothing more. The failure surfaced while step {step} "
                    "was being taken, so the model has moved past the recording: resume=True from a "
                    f"checkpoint of step {failed - 1}, or record anew"
                ) from err
            self._fail(step, err)
            raise
        # Numbers advance only here: a failed step keeps its number and stops the recording.
        self._step = step
        self._versions = self._param_versions()
        self._pending = []
        self._pre = None
        self._awaiting_rng = False
        self._unclaimed_rng = None
        if step == 1:
            # how the model normalized and dropped out while training (read at the first step)
            self._training_modes = self._first_modes
            self._write_manifest(status="recording")

    def _step_written(self) -> None:
        """Called (possibly by the writer thread) once a step file is durably in place."""
        self._durable += 1

    def _add_regularization(self, optimizer: torch.optim.Optimizer, lrs: List[float], inactive: set) -> None:
        """keep_every: add this step's regularization part ``R_s = −η_s λ θ_{s−1}`` (decoupled decay,
        or coupled decay without momentum; θ_{s−1} is live before the step)."""
        for gi, group in enumerate(optimizer.param_groups):
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            if not wd:
                continue
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is None or name in inactive or name not in self.trainable:
                    continue  # torch skips a parameter without gradient: no decay either
                r = (-lrs[gi] * wd) * p.detach().to("cpu", torch.float64)
                prev = self._macro_reg.get(name)
                self._macro_reg[name] = r if prev is None else prev + r

    def _end_of_macro_step(self) -> bool:
        """keep_every: whether this optimizer step closes a macro-step; otherwise it is folded into
        the next one (its micro-batches stay pending, its parameters are not stored)."""
        self._inner += 1
        if self._inner >= self._keep:
            self._inner, self._held_pre = 0, None
            return True
        self._held_pre, self._pre = self._pre, None
        self._versions = self._param_versions()
        self._awaiting_rng = False
        self._unclaimed_rng = None
        return False

    def _warn_unbatched(self, step: int) -> None:
        self._unbatched.append(step)
        if len(self._unbatched) == 1:
            warnings.warn(
                f"{self.path!r}: step {step} was taken with no logged batch (call recorder.log_batch(indices) "
                "for each micro-batch, or iterate recorder.track(loader)); the data view cannot attribute "
                "such steps to training samples",
                RuntimeWarning,
                stacklevel=4,
            )

    def _after_close(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Post-hook left in place by close(): a step now is not recorded, so say so (once)."""
        self._steps_after_close += 1
        if self._steps_after_close == 1:
            warnings.warn(
                f"optimizer.step() was called after the recorder of {self.path!r} was closed: this step is not "
                f"recorded, so the model no longer matches the trajectory's last step θ_{self._durable}; "
                "explanations of the model as it is now will not be complete",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ lifecycle
    @property
    def num_steps(self) -> int:
        """Number of optimizer steps recorded so far (durably written; see ``background``)."""
        return self._durable

    @property
    def writer_cpu_seconds(self) -> float:
        """CPU seconds the background writer thread has spent so far (checksums, serialization,
        write, fsync); 0 for a synchronous recorder, whose writes run in the training thread."""
        return float(getattr(self._writer, "cpu_seconds", 0.0))

    def bytes_per_step(self) -> int:
        """Approximate size on disk of one recorded step (parameters + optimizer state)."""
        total = 0
        for name in self.trainable:
            p = self._params[name]
            itemsize = (torch.empty(0, dtype=self.store_dtype).element_size()
                        if self.store_dtype is not None and p.is_floating_point() else p.element_size())
            total += p.numel() * itemsize * (1 + len([k for k in self.state_keys if k != "max_exp_avg_sq"]))
        return total

    def modified_since_close(self) -> List[str]:
        """Parameters changed in place since :meth:`close` (e.g. by a later ``optimizer.step()``),
        so that the model no longer equals the trajectory's last step."""
        if not self._closed:
            return []
        return [n for n, v in self._param_versions().items() if v != self._closed_versions.get(n)]

    def finish(self) -> None:
        """Stop recording, wait for pending writes and finalize the manifest: :meth:`close` without
        opening the trajectory (opening verifies every step file's header, ~10 ms a step for a
        2M-parameter model; a caller that opens it later pays that then).

        Raises:
            TrajectoryWriteError: a step failed to be written (the run is marked aborted at it).
        """
        if not self._closed:
            self._close(status="closed")
        self._raise_unreported()

    def close(self) -> Trajectory:
        """Stop recording, wait for pending writes, finalize the manifest and return the trajectory.

        Returns:
            *Trajectory*: the recorded run, opened and validated.

        Raises:
            TrajectoryWriteError: a step failed to be written (the run is marked aborted at it).
        """
        self.finish()
        return Trajectory.open(self.path)

    def _raise_unreported(self) -> None:
        """Raise a write failure the training loop has not seen yet (a background write's)."""
        if self._failure is not None and not self._failure_reported:
            self._failure_reported = True
            step, message = self._failure
            raise TrajectoryWriteError(
                f"recording to {self.path!r} failed at step {step} ({message}); the trajectory holds the "
                f"complete steps 1..{step - 1} and is marked aborted at step {step}"
            )

    def _close(self, status: str, extra: Optional[Dict[str, Any]] = None) -> None:
        if self._keep > 1 and self._held_pre is not None and self._failure is None:
            # the optimizer steps since the last kept checkpoint end in the live parameters: keep them
            self._pre, self._held_pre, self._inner = self._held_pre, None, self._keep
            self._post_step(self.optimizer, (), {})
        for h in self._handles:
            h.remove()
        self._closed = True
        self._writer.release(self._snap)  # a step that raised between its hooks
        self._snap, self._grad_bufs = None, []
        self._writer.close()
        self._report_nonfinite()
        if self._failure is None and self._writer.error is not None:
            self._fail_from_writer()
        self._closed_versions = self._param_versions()
        self._steps_after_close = 0
        self._handles = [self.optimizer.register_step_post_hook(self._after_close)]
        _AFTER_CLOSE[self.optimizer] = self._handles[0]
        try:
            self._finish(status, extra)
        finally:
            self._lock.release()
        if self._ddp:
            distributed.barrier()  # every rank's trajectory is rank 0's, complete

    def _finish(self, status: str, extra: Optional[Dict[str, Any]]) -> None:
        """Warnings and the final manifest of a recording that stops now."""
        if self._pending:
            warnings.warn(
                f"{len(self._pending)} logged micro-batch(es) were not followed by an optimizer "
                "step and are not part of the trajectory",
                RuntimeWarning,
                stacklevel=4,
            )
            self._pending = []
        info = dict(extra or {})
        info["closed_utc"] = _now()
        if self._failure is not None:
            step, message = self._failure
            info.update(self._aborted_info())
            if self._refused:
                info["aborted"] += f"; {self._refused} later optimizer step(s) were refused"
            warnings.warn(
                f"{self.path!r}: the recording failed at step {step} ({message}); it holds the complete steps "
                f"1..{step - 1}"
                + (f" and refused {self._refused} later optimizer step(s)" if self._refused else ""),
                RuntimeWarning,
                stacklevel=4,
            )
        elif self._exists():
            changed = self._changed_frozen()
            if changed:
                info["frozen_changed"] = changed
                warnings.warn(
                    f"parameters not owned by the optimizer changed during training: {changed}; "
                    "the trajectory stores them only at θ_0, so explanations will not be complete",
                    RuntimeWarning,
                    stacklevel=4,
                )
            stale = [n for n, b in self._buffers.items()
                     if not torch.equal(b.detach().to("cpu"), self._last_buffers[n])]
            if stale:
                info["buffers_changed_after_last_step"] = stale
                warnings.warn(
                    f"buffers {stale[:5]} changed after the last recorded step (a training-mode forward after "
                    "it?); the trajectory holds their values as of that step",
                    RuntimeWarning,
                    stacklevel=4,
                )
        if self._unbatched:
            info["steps_without_batch"] = len(self._unbatched)
        if self._exists():
            self._write_manifest(status=status, extra=info)

    def _exists(self) -> bool:
        """Whether this recorder's directory and lock are still there (not deleted under it)."""
        if self._follower:
            return False  # rank 0's to check and finalize
        try:
            self._lock.check()
            return True
        except TrajectoryError:
            return False

    def _changed_frozen(self) -> List[str]:
        if not self.frozen:
            return []
        from safetensors import safe_open

        changed = []
        with safe_open(os.path.join(self.path, fmt.INITIAL), framework="pt", device="cpu") as fh:
            for name in self.frozen:
                now = self._stored(self._params[name])
                if not torch.equal(fh.get_tensor(fmt.PARAM_PREFIX + name), now):
                    changed.append(name)
        return changed

    @property
    def trajectory(self) -> Trajectory:
        """The recorded trajectory (closes the recorder if it is still open)."""
        return self.close()

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._closed:
            return
        if exc_type is None:
            self._close(status="closed")
            self._raise_unreported()
        else:
            # Training failed: keep every completed step and say so in the manifest.
            self._failure_reported = True  # the training loop's own exception says what happened
            self._close(status="closed", extra={"aborted": f"{exc_type.__name__}: {exc}"})

    def __del__(self) -> None:  # pragma: no cover - best effort, never raise in GC
        try:
            if not self._closed:
                for h in self._handles:
                    h.remove()
                self._writer.close()
                self._lock.release()
        except Exception:
            pass
