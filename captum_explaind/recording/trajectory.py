"""Read side of a recorded training run: open, validate, iterate steps."""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from safetensors import safe_open
from torch import nn

from ..errors import MissingOptimizerStateError, TrajectoryCorruptError, TrajectoryError, TrajectoryMismatchError
from . import format as fmt

__all__ = ["Trajectory", "ParamSpec", "StepData"]


@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and dtypes of one model parameter as recorded."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype  # dtype on disk
    model_dtype: torch.dtype  # dtype of the parameter in the trained model
    trainable: bool
    group: Optional[int]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class StepData:
    """What one recorded step holds, read by :meth:`Trajectory.step_data` in one file opening.

    Attributes:
        step (int): the step, 1..num_steps.
        record (StepRecord): its per-step scalars and micro-batches, as :meth:`Trajectory.record`.
        params (dict[str, Tensor]): the trainable parameters θ_step by name, as
            :meth:`Trajectory.params`.
        state (dict[str, dict[str, Tensor]]): each requested optimizer state key mapped to its
            tensors by parameter, as :meth:`Trajectory.state` (parameters without it are absent).
    """

    step: int
    record: fmt.StepRecord
    params: Dict[str, torch.Tensor]
    state: Dict[str, Dict[str, torch.Tensor]]


def _read_header(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Parse a safetensors header and check that the file holds all the bytes it announces."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise TrajectoryCorruptError(f"{path} is not a readable safetensors file ({err})") from err
    meta = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise TrajectoryCorruptError(
            f"{path} is truncated: it announces {8 + n + end} bytes but holds {size}"
        )
    return header, meta


def _read_manifest(path: str) -> Dict[str, Any]:
    """The manifest of the trajectory directory ``path``, checked to be one this library reads."""
    mpath = os.path.join(path, fmt.MANIFEST)
    if not os.path.isdir(path):
        raise TrajectoryCorruptError(f"no trajectory at {path!r}: not a directory")
    if not os.path.exists(mpath):
        raise TrajectoryCorruptError(f"{path!r} is not a trajectory: {fmt.MANIFEST} is missing")
    try:
        with open(mpath, "r", encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as err:
        raise TrajectoryCorruptError(f"{mpath} is not valid JSON ({err})") from err
    if manifest.get("format") != fmt.FORMAT_NAME:
        raise TrajectoryCorruptError(f"{mpath} is not a captum_explaind trajectory manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= fmt.FORMAT_VERSION:
        raise TrajectoryCorruptError(
            f"{mpath} has format version {version!r}; this library reads versions <= {fmt.FORMAT_VERSION}"
        )
    for key in ("model", "optimizer"):
        if key not in manifest:
            raise TrajectoryCorruptError(f"{mpath} lacks the {key!r} section")
    return manifest


def _check_initial_file(path: str, manifest: Dict[str, Any]) -> None:
    """Check that θ_0 exists and holds every parameter of the manifest, with its shape."""
    init = os.path.join(path, fmt.INITIAL)
    if not os.path.exists(init):
        raise TrajectoryCorruptError(f"{path!r} is truncated: {fmt.INITIAL} (θ_0) is missing")
    header, _ = _read_header(init)
    for p in manifest["model"]["params"]:
        key = fmt.PARAM_PREFIX + p["name"]
        if key not in header:
            raise TrajectoryCorruptError(f"{init} lacks parameter {p['name']!r}")
        if list(header[key]["shape"]) != list(p["shape"]):
            raise TrajectoryCorruptError(
                f"{init}: parameter {p['name']!r} has shape {header[key]['shape']}, manifest says {p['shape']}"
            )


def _count_steps(path: str) -> int:
    """Number of complete step files in ``path``, which must be numbered 1..n without a gap.

    Files left half-written by an interrupted recording are ignored, with a warning.
    """
    steps_dir = os.path.join(path, fmt.STEPS_DIR)
    found: List[int] = []
    partial: List[str] = []
    if os.path.isdir(steps_dir):
        for name in os.listdir(steps_dir):
            if name.endswith(fmt.TMP_SUFFIX):
                partial.append(name)
                continue
            s = fmt.parse_step_filename(name)
            if s is not None:
                found.append(s)
    found.sort()
    if partial:
        warnings.warn(
            f"{path!r}: ignoring {len(partial)} incompletely written step file(s) {sorted(partial)[:3]} "
            "(the recording was interrupted while writing them)",
            RuntimeWarning,
            stacklevel=3,  # attributed to the caller of Trajectory.open
        )
    if found and found[0] < 1:
        raise TrajectoryCorruptError(f"{path!r}: invalid step file number {found[0]}")
    expected = list(range(1, len(found) + 1))
    if found != expected:
        missing = sorted(set(range(1, found[-1] + 1)) - set(found))
        raise TrajectoryCorruptError(
            f"{path!r} is missing step(s) {missing[:10]}{'...' if len(missing) > 10 else ''} "
            f"(found {len(found)} step files up to step {found[-1]}); a trajectory must hold every step"
        )
    return len(found)


def _check_step_count(path: str, manifest: Dict[str, Any], n: int) -> None:
    """Compare the ``n`` step files with what the manifest declares; warn about unfinished runs."""
    status = manifest.get("status")
    declared = manifest.get("num_steps")
    if status == "closed" and declared is not None and int(declared) != n:
        raise TrajectoryCorruptError(
            f"{path!r} is truncated: its manifest records {declared} steps but only {n} step files exist"
        )
    # stacklevel=3: the warnings are attributed to the caller of Trajectory.open
    if status != "closed":
        warnings.warn(
            f"{path!r} was not closed (the recording was interrupted or is still running); "
            f"using its {n} complete step(s)",
            RuntimeWarning,
            stacklevel=3,
        )
    if manifest.get("aborted"):
        warnings.warn(
            f"{path!r}: the recording was interrupted ({manifest['aborted']}); using its {n} "
            "complete step(s)",
            RuntimeWarning,
            stacklevel=3,
        )


class Trajectory:
    r"""A training run recorded by :class:`TrajectoryRecorder`: θ_0, every step, and its metadata.

    Open one with :meth:`Trajectory.open`. Steps are numbered ``1..num_steps``; ``params(0)`` is
    θ_0. Nothing is loaded until asked for, so opening a long run is cheap.

    Attributes:
        path (str): the trajectory directory.
        num_steps (int): number of complete recorded steps.
        params_spec (list[ParamSpec]): every model parameter, in model order.
        trainable (list[str]): names of the parameters the optimizer owned (they move).
        frozen (list[str]): names of the other parameters (stored once, in θ_0).
        family (str): optimizer family, one of ``"sgd"``, ``"adam"``, ``"adamw"``, ``"other"``.
    """

    def __init__(self, path: str, manifest: Dict[str, Any], num_steps: int) -> None:
        self.path = path
        self.manifest = manifest
        self.num_steps = num_steps
        self.params_spec = [
            ParamSpec(
                name=p["name"],
                shape=tuple(p["shape"]),
                dtype=fmt.str_to_dtype(p["dtype"]),
                model_dtype=fmt.str_to_dtype(p.get("model_dtype", p["dtype"])),
                trainable=bool(p["trainable"]),
                group=p.get("group"),
            )
            for p in manifest["model"]["params"]
        ]
        self.spec = {p.name: p for p in self.params_spec}
        self.trainable = [p.name for p in self.params_spec if p.trainable]
        self.frozen = [p.name for p in self.params_spec if not p.trainable]
        self.buffer_names = [b["name"] for b in manifest["model"].get("buffers", [])]
        opt = manifest["optimizer"]
        self.family: str = opt["family"]
        self.optimizer_class: str = opt["class"]
        self.n_groups: int = int(opt["n_groups"])
        self.state_keys: List[str] = list(opt.get("state_keys", []))
        self._buffer_changes: Optional[Dict[str, List[int]]] = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Union[str, os.PathLike], *, verify: bool = True) -> "Trajectory":
        """Open and validate a trajectory directory.

        Args:
            path (str or os.PathLike): directory written by :class:`TrajectoryRecorder`.
            verify (bool, optional): check every step file's header and size (cheap: no tensor is
                read), so a truncated or corrupted file is reported now, by name. Default: True

        Returns:
            *Trajectory*: the run, with ``num_steps`` complete steps.

        Raises:
            TrajectoryCorruptError: not a trajectory, unreadable manifest or files, missing steps.
        """
        path = os.fspath(path)
        manifest = _read_manifest(path)
        _check_initial_file(path, manifest)
        n = _count_steps(path)
        _check_step_count(path, manifest, n)
        traj = cls(path, manifest, n)
        if verify:
            for s in range(1, n + 1):
                traj._check_step_file(s)
        return traj

    def _step_path(self, step: int) -> str:
        return os.path.join(self.path, fmt.STEPS_DIR, fmt.step_filename(step))

    def _check_step_file(self, step: int) -> None:
        path = self._step_path(step)
        header, meta = _read_header(path)
        if "record" not in meta:
            raise TrajectoryCorruptError(f"{path} lacks its step record metadata")
        for name in self.trainable:
            key = fmt.PARAM_PREFIX + name
            if key not in header:
                raise TrajectoryCorruptError(f"{path} lacks trainable parameter {name!r}")
            if tuple(header[key]["shape"]) != self.spec[name].shape:
                raise TrajectoryCorruptError(f"{path}: parameter {name!r} has the wrong shape {header[key]['shape']}")

    # ------------------------------------------------------------------ description
    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        n_train = sum(self.spec[n].numel for n in self.trainable)
        return (
            f"Trajectory({self.path!r}, steps={self.num_steps}, optimizer={self.optimizer_class} "
            f"[{self.family}], trainable={len(self.trainable)} tensors / {n_train} values, "
            f"frozen={len(self.frozen)})"
        )

    @property
    def status(self) -> str:
        return str(self.manifest.get("status"))

    @property
    def groups_initial(self) -> List[Dict[str, Any]]:
        """Hyperparameters of each optimizer group when recording started."""
        return self.manifest["optimizer"].get("groups", [])

    def has_state(self, key: str) -> bool:
        """Whether optimizer state ``key`` (e.g. ``"exp_avg_sq"``) was recorded."""
        return key in self.state_keys

    # ------------------------------------------------------------------ validation
    def validate(self, model: nn.Module, *, check_dtype: bool = True) -> None:
        """Check that ``model`` has exactly the recorded parameters and buffers.

        Args:
            model (nn.Module): an instance of the trained architecture.
            check_dtype (bool, optional): also compare parameter dtypes. Default: True

        Raises:
            TrajectoryMismatchError: naming the first parameter (or buffer) that differs.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        mparams = dict(model.named_parameters())
        for spec in self.params_spec:
            if spec.name not in mparams:
                raise TrajectoryMismatchError(
                    f"model does not match trajectory {self.path!r}: the model has no parameter "
                    f"{spec.name!r} (recorded with shape {list(spec.shape)})"
                )
            p = mparams[spec.name]
            if tuple(p.shape) != spec.shape:
                raise TrajectoryMismatchError(
                    f"model does not match trajectory {self.path!r}: parameter {spec.name!r} has shape "
                    f"{list(p.shape)} in the model but {list(spec.shape)} in the trajectory"
                )
            if check_dtype and p.dtype != spec.model_dtype:
                raise TrajectoryMismatchError(
                    f"model does not match trajectory {self.path!r}: parameter {spec.name!r} has dtype "
                    f"{p.dtype} in the model but was trained in {spec.model_dtype} (use dtype=... to "
                    "compute in another precision instead of converting the model)"
                )
        extra = [n for n in mparams if n not in self.spec]
        if extra:
            raise TrajectoryMismatchError(
                f"model does not match trajectory {self.path!r}: the model has parameter {extra[0]!r}, "
                "which was not recorded"
            )
        mbufs = dict(model.named_buffers())
        for b in self.manifest["model"].get("buffers", []):
            if b["name"] not in mbufs:
                raise TrajectoryMismatchError(
                    f"model does not match trajectory {self.path!r}: the model has no buffer {b['name']!r}"
                )
            if list(mbufs[b["name"]].shape) != list(b["shape"]):
                raise TrajectoryMismatchError(
                    f"model does not match trajectory {self.path!r}: buffer {b['name']!r} has shape "
                    f"{list(mbufs[b['name']].shape)} in the model but {b['shape']} in the trajectory"
                )

    # ------------------------------------------------------------------ loading
    def _check_step(self, step: int, allow_zero: bool = True) -> None:
        lo = 0 if allow_zero else 1
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not lo <= step <= self.num_steps:
            raise TrajectoryError(f"step {step} is outside the trajectory (valid: {lo}..{self.num_steps})")

    def _open(self, step: int):
        path = os.path.join(self.path, fmt.INITIAL) if step == 0 else self._step_path(step)
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as err:  # safetensors raises several error types
            raise TrajectoryCorruptError(f"cannot read {path}: {err}") from err

    @staticmethod
    def _get(fh: Any, key: str, where: str) -> torch.Tensor:
        try:
            return fh.get_tensor(key)
        except Exception as err:
            raise TrajectoryCorruptError(f"cannot read {key!r} from {where}: {err}") from err

    def params(
        self,
        step: int,
        names: Optional[Sequence[str]] = None,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        """Trainable parameters θ_step (``step=0``: θ_0), by name.

        Args:
            step (int): 0..num_steps.
            names (sequence of str, optional): subset of trainable names. Default: all
            device, dtype (optional): where and in which floating dtype to return them.

        Returns:
            *dict[str, Tensor]*
        """
        self._check_step(step)
        names = list(self.trainable if names is None else names)
        with self._open(step) as fh:
            out = self._read_params(fh, step, names)
        return {n: self._cast(t, device, dtype) for n, t in out.items()}

    def _read_params(self, fh: Any, step: int, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Parameters ``names`` of ``step`` from its open file ``fh``, as stored (not cast)."""
        where = fmt.INITIAL if step == 0 else fmt.step_filename(step)
        return {n: self._get(fh, fmt.PARAM_PREFIX + n, where) for n in names}

    def frozen_params(self, *, device: Any = None, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Parameters the optimizer did not own, as stored with θ_0."""
        with self._open(0) as fh:
            return {n: self._cast(self._get(fh, fmt.PARAM_PREFIX + n, fmt.INITIAL), device, dtype) for n in self.frozen}

    def buffers(self, step: int, *, device: Any = None, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Buffers (e.g. BatchNorm statistics) in effect right after ``step``."""
        self._check_step(step)
        changes = self._buffer_change_index()
        out = {}
        for name in self.buffer_names:
            last = max([s for s in changes.get(name, []) if s <= step], default=0)
            where = fmt.INITIAL if last == 0 else fmt.step_filename(last)
            with self._open(last) as fh:
                out[name] = self._cast(self._get(fh, fmt.BUFFER_PREFIX + name, where), device, dtype)
        return out

    def buffer_steps(self) -> List[int]:
        """Steps during which at least one buffer changed."""
        return sorted({s for steps in self._buffer_change_index().values() for s in steps})

    def _buffer_change_index(self) -> Dict[str, List[int]]:
        if self._buffer_changes is None:
            changes: Dict[str, List[int]] = {}
            if self.buffer_names:
                for s in range(1, self.num_steps + 1):
                    header, _ = _read_header(self._step_path(s))
                    for key in header:
                        if key.startswith(fmt.BUFFER_PREFIX):
                            changes.setdefault(key[len(fmt.BUFFER_PREFIX):], []).append(s)
            self._buffer_changes = changes
        return self._buffer_changes

    def state(
        self,
        step: int,
        key: str,
        names: Optional[Sequence[str]] = None,
        *,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        """Optimizer state ``key`` right after ``step`` (e.g. ``"exp_avg_sq"``), by parameter.

        Parameters that had no state yet (never received a gradient) are absent.

        Raises:
            MissingOptimizerStateError: if ``key`` was not recorded.
        """
        self._check_step(step, allow_zero=False)
        self._check_state_key(key)
        names = list(self.trainable if names is None else names)
        with self._open(step) as fh:
            return self._read_state(fh, step, key, names, set(fh.keys()), device, dtype)

    def _check_state_key(self, key: str) -> None:
        """Raise :class:`MissingOptimizerStateError` unless optimizer state ``key`` was recorded."""
        if key not in self.state_keys:
            raise MissingOptimizerStateError(
                f"trajectory {self.path!r} was recorded without optimizer state {key!r} "
                f"(recorded: {self.state_keys or 'none'}); record with record_optimizer_state=True"
            )

    def _read_state(self, fh: Any, step: int, key: str, names: Sequence[str], keys: Set[str], device: Any,
                    dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        """Optimizer state ``key`` of ``step`` from its open file ``fh`` (whose tensor names are
        ``keys``), cast; parameters without that state are absent."""
        out = {}
        for n in names:
            k = f"{fmt.STATE_PREFIX}{n}/{key}"
            if k in keys:
                out[n] = self._cast(self._get(fh, k, fmt.step_filename(step)), device, dtype)
        return out

    def record(self, step: int) -> fmt.StepRecord:
        """Per-step scalars and micro-batches of ``step`` (1..num_steps)."""
        self._check_step(step, allow_zero=False)
        with self._open(step) as fh:
            obj, batches = self._read_record_parts(fh, step, set(fh.keys()))
        return self._make_record(step, obj, batches)

    def _read_record_parts(self, fh: Any, step: int, keys: Set[str]) -> Tuple[Dict[str, Any], List[fmt.MicroBatch]]:
        """The JSON step record and the micro-batches of ``step`` from its open file ``fh``
        (whose tensor names are ``keys``)."""
        where = self._step_path(step)
        meta = fh.metadata() or {}
        if "record" not in meta:
            raise TrajectoryCorruptError(f"{where} lacks its step record metadata")
        try:
            obj = json.loads(meta["record"])
        except ValueError as err:
            raise TrajectoryCorruptError(f"{where}: step record is not valid JSON ({err})") from err
        n_micro = int(obj.get("n_micro", 0))
        if n_micro and fmt.BATCH_INDEX in keys:
            rng = {i: self._get(fh, f"{fmt.BATCH_RNG}{i}", where) for i in range(n_micro)
                   if f"{fmt.BATCH_RNG}{i}" in keys}
            cuda_rng = {i: self._get(fh, f"{fmt.BATCH_CUDA_RNG}{i}", where) for i in range(n_micro)
                        if f"{fmt.BATCH_CUDA_RNG}{i}" in keys}
            batches = fmt.unpack_batches(
                self._get(fh, fmt.BATCH_INDEX, where),
                self._get(fh, fmt.BATCH_WEIGHT, where),
                self._get(fh, fmt.BATCH_MICRO, where),
                n_micro,
                rng,
                cuda_rng,
            )
        else:
            batches = []
        return obj, batches

    def _make_record(self, step: int, obj: Dict[str, Any], batches: List[fmt.MicroBatch]) -> fmt.StepRecord:
        """The :class:`StepRecord` of ``step`` from its parts, checked against this trajectory."""
        where = self._step_path(step)
        rec = fmt.StepRecord.from_json(obj, batches)
        if rec.step != step:
            raise TrajectoryCorruptError(f"{where} holds the record of step {rec.step}, not {step}")
        if len(rec.lr) != self.n_groups:
            raise TrajectoryCorruptError(f"{where}: {len(rec.lr)} learning rates for {self.n_groups} parameter groups")
        return rec

    def records(self) -> Iterator[fmt.StepRecord]:
        """Iterate over the records of steps 1..num_steps."""
        for s in range(1, self.num_steps + 1):
            yield self.record(s)

    def step_data(
        self,
        step: int,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        state_keys: Sequence[str] = (),
    ) -> StepData:
        """Record, trainable parameters and optimizer state of ``step``, read in one opening of
        its step file.

        The same as :meth:`record`, :meth:`params` and :meth:`state` of ``step`` (each of which
        opens the file again), for a sweep that needs all of them at every step. Errors are
        theirs: a corrupt file raises the same :class:`TrajectoryCorruptError`.

        Args:
            step (int): 1..num_steps (θ_0 has no record: use :meth:`params` for step 0).
            device, dtype (optional): where and in which floating dtype to return the parameters
                and state tensors (as in :meth:`params`). Default: as stored, on CPU
            state_keys (sequence of str, optional): optimizer states to read (e.g.
                ``("exp_avg_sq",)``). Default: none

        Returns:
            *StepData*: with ``params`` as ``params(step, device=device, dtype=dtype)`` and
            ``state[key]`` as ``state(step, key, device=device, dtype=dtype)``.

        Raises:
            MissingOptimizerStateError: if one of ``state_keys`` was not recorded.
            TrajectoryCorruptError: if the step file cannot be read.
            TypeError: if ``state_keys`` is a single string.
        """
        self._check_step(step, allow_zero=False)
        if isinstance(state_keys, str):  # list("exp_avg_sq") would ask for one key per letter
            raise TypeError(f"state_keys must be a sequence of state names, got the string {state_keys!r}")
        state_keys = list(state_keys)
        for key in state_keys:
            self._check_state_key(key)
        with self._open(step) as fh:
            keys = set(fh.keys())
            obj, batches = self._read_record_parts(fh, step, keys)
            params = self._read_params(fh, step, self.trainable)
            state = {key: self._read_state(fh, step, key, self.trainable, keys, device, dtype) for key in state_keys}
        return StepData(
            step=step,
            record=self._make_record(step, obj, batches),
            params={n: self._cast(t, device, dtype) for n, t in params.items()},
            state=state,
        )

    @staticmethod
    def _cast(t: torch.Tensor, device: Any, dtype: Optional[torch.dtype]) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t
