"""Read side of a recorded training run: open, validate, iterate steps."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ..errors import MissingOptimizerStateError, TrajectoryCorruptError, TrajectoryError, TrajectoryMismatchError
from . import format as fmt
from .reader import SafeFile, TensorInfo, parse_json, read_json
from .schema import validate_manifest, validate_record

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


def _read_manifest(path: str) -> Dict[str, Any]:
    """The manifest of the trajectory directory ``path``, checked to be one this library reads."""
    mpath = os.path.join(path, fmt.MANIFEST)
    if not os.path.isdir(path):
        raise TrajectoryCorruptError(f"no trajectory at {path!r}: not a directory")
    if not os.path.lexists(mpath):
        raise TrajectoryCorruptError(f"{path!r} is not a trajectory: {fmt.MANIFEST} is missing")
    manifest = read_json(mpath, path)
    if not isinstance(manifest, dict):
        raise TrajectoryCorruptError(f"{mpath} is a JSON {type(manifest).__name__}, not a trajectory manifest")
    if manifest.get("format") != fmt.FORMAT_NAME:
        raise TrajectoryCorruptError(f"{mpath} is not a captum_explaind trajectory manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= fmt.FORMAT_VERSION:
        raise TrajectoryCorruptError(
            f"{mpath} has format version {version!r:.40}; this library reads versions <= {fmt.FORMAT_VERSION}"
        )
    validate_manifest(manifest, mpath)
    if version >= 2:
        if not isinstance(manifest.get("checksum"), str):
            raise TrajectoryCorruptError(f"{mpath}: field 'checksum' is missing (format version {version} has one)")
        if manifest["checksum"] != fmt.manifest_checksum(manifest):
            raise TrajectoryCorruptError(
                f"{mpath}: field 'checksum' does not match the manifest's content (the manifest was edited or "
                "damaged after it was written)"
            )
    return manifest


def _check_initial_file(path: str, manifest: Dict[str, Any]) -> None:
    """Check that θ_0 exists and holds every parameter and buffer of the manifest, with its
    shape and dtype, and nothing else."""
    init = os.path.join(path, fmt.INITIAL)
    if not os.path.lexists(init):
        raise TrajectoryCorruptError(f"{path!r} is truncated: {fmt.INITIAL} (θ_0) is missing")
    with SafeFile(init, path) as fh:
        header = fh.tensors
        expected = {fmt.PARAM_PREFIX + p["name"]: p for p in manifest["model"]["params"]}
        expected.update({fmt.BUFFER_PREFIX + b["name"]: b for b in manifest["model"].get("buffers", [])})
        for key, spec in expected.items():
            what = "parameter" if key.startswith(fmt.PARAM_PREFIX) else "buffer"
            if key not in header:
                raise TrajectoryCorruptError(f"{init} lacks {what} {spec['name']!r}")
            _check_entry(init, key, header[key], tuple(spec["shape"]), fmt.str_to_dtype(spec["dtype"]), what)
        extra = sorted(set(header) - set(expected))
        if extra:
            raise TrajectoryCorruptError(f"{init} holds tensor {extra[0]!r}, which the manifest does not describe")
        if manifest["version"] >= 2 and fh.checksums is None:
            raise TrajectoryCorruptError(f"{init}: metadata 'checksums' is missing")


def _check_entry(where: str, key: str, info: TensorInfo, shape: Tuple[int, ...], dtype: Optional[torch.dtype],
                 what: str) -> None:
    """A header entry must have the shape (and dtype) the manifest gives, before it is read."""
    if info.shape != tuple(shape):
        raise TrajectoryCorruptError(
            f"{where}: {what} {key.split('/', 1)[-1]!r} has shape {list(info.shape)}, the manifest says {list(shape)}"
        )
    if dtype is not None and info.dtype != dtype:
        raise TrajectoryCorruptError(
            f"{where}: {what} {key.split('/', 1)[-1]!r} has dtype {info.dtype}, the manifest says {dtype}"
        )


def _count_steps(path: str) -> int:
    """Number of complete step files in ``path``, which must be numbered 1..n without a gap.

    Files left half-written by an interrupted recording are ignored, with a warning.
    """
    steps_dir = os.path.join(path, fmt.STEPS_DIR)
    found: List[int] = []
    partial: List[str] = []
    if os.path.lexists(steps_dir):
        if not os.path.isdir(steps_dir):
            raise TrajectoryCorruptError(f"{steps_dir} is not a directory")
        real, base = os.path.realpath(steps_dir), os.path.realpath(path)
        if not real.startswith(base.rstrip(os.sep) + os.sep):
            raise TrajectoryCorruptError(
                f"{steps_dir} resolves to {real!r}, outside the trajectory directory (another run's steps?)"
            )
        for name in os.listdir(steps_dir):
            if name.endswith(fmt.TMP_SUFFIX):
                partial.append(name)
                continue
            s = fmt.parse_step_filename(name)
            if s is not None:
                found.append(s)
            elif fmt.looks_like_step_file(name):
                raise TrajectoryCorruptError(
                    f"{os.path.join(steps_dir, name)!r} is named like a step file but not as this library names "
                    f"them (step_<8+ ASCII digits>.safetensors, e.g. {fmt.step_filename(1)})"
                )
    found.sort()
    if partial:
        warnings.warn(
            f"{path!r}: ignoring {len(partial)} incompletely written step file(s) {sorted(partial)[:3]} "
            "(the recording was interrupted while writing them)",
            RuntimeWarning,
            stacklevel=3,  # attributed to the caller of Trajectory.open
        )
    if found and found[-1] != len(found):
        # the first ten gaps, walking the sorted numbers: no range over an untrusted number is built
        missing: List[int] = []
        prev = 0
        for s in found:
            while prev + 1 < s and len(missing) < 10:
                prev += 1
                missing.append(prev)
            prev = s
        raise TrajectoryCorruptError(
            f"{path!r} is missing step(s) {missing}{'...' if len(missing) == 10 else ''} "
            f"(found {len(found)} step files, numbered up to {found[-1]}); a trajectory must hold every step"
        )
    return len(found)


def _check_step_count(path: str, manifest: Dict[str, Any], n: int) -> None:
    """Compare the ``n`` step files with what the manifest declares; warn about unfinished runs."""
    status = manifest.get("status")
    declared = manifest.get("num_steps")
    if status == "closed" and declared is not None and int(declared) != n:
        raise TrajectoryCorruptError(
            f"{path!r} is truncated: its manifest records {declared} steps but only {n} step files exist"
            if int(declared) > n else
            f"{path!r}: its manifest records {declared} steps but {n} step files exist (a step file from "
            "another run?)"
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


_BATCH_DTYPES = {fmt.BATCH_INDEX: torch.int64, fmt.BATCH_WEIGHT: torch.float64, fmt.BATCH_MICRO: torch.int32}
_MAX_RNG_BYTES = 1 << 20


def _rng_slot(key: str) -> Optional[int]:
    """The micro-batch number of an RNG-state tensor name (``None`` for other names)."""
    for prefix in (fmt.BATCH_RNG, fmt.BATCH_CUDA_RNG):
        if key.startswith(prefix):
            digits = key[len(prefix):]
            return int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 10 else -1
    return None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


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
        self._bytes_per_step: Optional[float] = None
        self._buffer_specs = {b["name"]: b for b in manifest["model"].get("buffers", [])}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Union[str, os.PathLike], *, verify: bool = True) -> "Trajectory":
        """Open and validate a trajectory directory.

        Args:
            path (str or os.PathLike): directory written by :class:`TrajectoryRecorder`.
            verify (bool, optional): check every step file's header, size and record against the
                manifest (cheap: no tensor is read), so a truncated, corrupted or edited file is
                reported now, by name. Tensor bytes are checked against their checksums whenever
                they are read (and all at once by :meth:`check_integrity`). Default: True

        Returns:
            *Trajectory*: the run, with ``num_steps`` complete steps.

        Raises:
            TrajectoryCorruptError: not a trajectory, unreadable manifest or files, missing steps,
                a file or field that contradicts the manifest (naming the file and the field).
        """
        path = os.fspath(path)
        manifest = _read_manifest(path)
        _check_initial_file(path, manifest)
        n = _count_steps(path)
        _check_step_count(path, manifest, n)
        traj = cls(path, manifest, n)
        if verify:
            previous: Optional[Dict[str, Any]] = None
            for s in range(1, n + 1):
                record = traj._check_step_file(s)
                traj._check_step_counts(s, previous, record)
                previous = record
        return traj

    def _step_path(self, step: int) -> str:
        return os.path.join(self.path, fmt.STEPS_DIR, fmt.step_filename(step))

    def _check_step_file(self, step: int) -> Dict[str, Any]:
        """Check step ``step``'s header and record against the manifest; return the record."""
        with SafeFile(self._step_path(step), self.path) as fh:
            obj = self._parse_record(fh, step)
            self._check_step_tensors(fh, obj)
        return obj

    def _check_step_tensors(self, fh: SafeFile, obj: Dict[str, Any]) -> None:
        """Every tensor of a step file must be one the manifest describes, with its shape/dtype."""
        where, header = fh.path, fh.tensors
        buffers = {b["name"]: b for b in self.manifest["model"].get("buffers", [])}
        n_micro = obj.get("n_micro") or 0
        for key, info in header.items():
            if key.startswith(fmt.PARAM_PREFIX) and key[len(fmt.PARAM_PREFIX):] in self.trainable:
                spec = self.spec[key[len(fmt.PARAM_PREFIX):]]
                _check_entry(where, key, info, spec.shape, spec.dtype, "parameter")
            elif key.startswith(fmt.STATE_PREFIX) and "/" in key[len(fmt.STATE_PREFIX):]:
                name, skey = key[len(fmt.STATE_PREFIX):].rsplit("/", 1)
                if name not in self.trainable or skey not in self.state_keys:
                    raise TrajectoryCorruptError(f"{where} holds optimizer state {key!r} the manifest does not record")
                _check_entry(where, key, info, self.spec[name].shape, None, "optimizer state")
                if not info.dtype.is_floating_point:
                    raise TrajectoryCorruptError(f"{where}: optimizer state {key!r} has dtype {info.dtype}")
            elif key.startswith(fmt.BUFFER_PREFIX) and key[len(fmt.BUFFER_PREFIX):] in buffers:
                b = buffers[key[len(fmt.BUFFER_PREFIX):]]
                _check_entry(where, key, info, tuple(b["shape"]), fmt.str_to_dtype(b["dtype"]), "buffer")
            elif key in _BATCH_DTYPES:
                n = header[fmt.BATCH_INDEX].shape if fmt.BATCH_INDEX in header else None
                if info.dtype != _BATCH_DTYPES[key] or len(info.shape) != 1 or info.shape != n:
                    raise TrajectoryCorruptError(
                        f"{where}: {key!r} is {list(info.shape)} {info.dtype}; expected a vector of "
                        f"{_BATCH_DTYPES[key]} as long as {fmt.BATCH_INDEX!r}"
                    )
            elif _rng_slot(key) is not None:
                i = _rng_slot(key) or 0
                if info.dtype != torch.uint8 or len(info.shape) != 1 or info.shape[0] > _MAX_RNG_BYTES:
                    raise TrajectoryCorruptError(f"{where}: {key!r} is not an RNG state (a uint8 vector)")
                if not 0 <= i < n_micro:
                    raise TrajectoryCorruptError(f"{where}: {key!r} names micro-batch {i} of {n_micro}")
            else:
                raise TrajectoryCorruptError(f"{where} holds tensor {key!r}, which the manifest does not describe")
        for name in self.trainable:
            if fmt.PARAM_PREFIX + name not in header:
                raise TrajectoryCorruptError(f"{where} lacks trainable parameter {name!r}")
        if self.manifest["version"] >= 2 and fh.checksums is None:
            raise TrajectoryCorruptError(f"{where}: metadata 'checksums' is missing")

    def _check_step_counts(self, step: int, previous: Optional[Dict[str, Any]], record: Dict[str, Any]) -> None:
        """Adam's per-parameter step counts move by one exactly when the parameter had a gradient."""
        if previous is None:
            return
        before, now = previous.get("state_step") or {}, record.get("state_step") or {}
        inactive = set(record.get("inactive") or [])
        for name, count in now.items():
            if name in before:
                expected = before[name] + (0 if name in inactive else 1)
                if count != expected:
                    raise TrajectoryCorruptError(
                        f"{self._step_path(step)}: field 'state_step' gives {name!r} the count {count}, but it was "
                        f"{before[name]} after step {step - 1} (expected {expected})"
                    )

    def _parse_record(self, fh: SafeFile, step: int) -> Dict[str, Any]:
        """The JSON record of ``step`` from its open file, checksum-verified and validated."""
        where = fh.path
        text = fh.metadata.get("record")
        if text is None:
            raise TrajectoryCorruptError(f"{where} lacks its step record metadata")
        if self.manifest["version"] >= 2:
            crc = fh.metadata.get("record_checksum")
            if crc is None:
                raise TrajectoryCorruptError(f"{where}: metadata 'record_checksum' is missing")
            if crc != fmt.text_checksum(text):
                raise TrajectoryCorruptError(
                    f"{where}: the step record fails its checksum (metadata 'record' was edited or damaged)"
                )
        obj = parse_json(text, f"{where}: step record")
        index = fh.tensors.get(fmt.BATCH_INDEX)
        n_entries = index.shape[0] if index is not None and len(index.shape) == 1 else 0
        validate_record(obj, step=step, manifest=self.manifest, trainable=self.trainable, n_entries=n_entries,
                        where=where)
        return obj

    # ------------------------------------------------------------------ description
    def __len__(self) -> int:
        return self.num_steps

    @property
    def bytes_per_step(self) -> float:
        """Mean size on disk of one step file, in bytes (0 for a run without steps)."""
        if self._bytes_per_step is None:
            total = sum(os.path.getsize(self._step_path(s)) for s in range(1, self.num_steps + 1))
            self._bytes_per_step = total / self.num_steps if self.num_steps else 0.0
        return self._bytes_per_step

    def __repr__(self) -> str:
        n_train = sum(self.spec[n].numel for n in self.trainable)
        try:
            size = f", {_human_bytes(self.bytes_per_step)}/step"
        except OSError:  # a step file vanished since open()
            size = ""
        return (
            f"Trajectory({self.path!r}, steps={self.num_steps}, optimizer={self.optimizer_class} "
            f"[{self.family}], trainable={len(self.trainable)} tensors / {n_train} values, "
            f"frozen={len(self.frozen)}{size})"
        )

    def check_integrity(self) -> None:
        """Read every tensor of θ_0 and of every step and verify its checksum (format version 2).

        Raises:
            TrajectoryCorruptError: naming the first file and tensor whose bytes changed.
        """
        for s in range(0, self.num_steps + 1):
            with self._open(s) as fh:
                for key in list(fh.keys()):
                    fh.get(key)

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
        unrecorded = [n for n in mbufs if n not in self._buffer_specs]
        if unrecorded:
            raise TrajectoryMismatchError(
                f"model does not match trajectory {self.path!r}: the model has buffer {unrecorded[0]!r}, "
                "which was not recorded"
            )
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

    def _open(self, step: int) -> SafeFile:
        path = os.path.join(self.path, fmt.INITIAL) if step == 0 else self._step_path(step)
        return SafeFile(path, self.path)

    def _get(self, fh: SafeFile, key: str) -> torch.Tensor:
        """Tensor ``key`` of an open file, its header entry checked against the manifest first."""
        info = fh.tensors.get(key)
        if info is None:
            raise TrajectoryCorruptError(f"cannot read {key!r} from {fh.path}: the file lacks it")
        name = key.split("/", 1)[-1]
        if key.startswith(fmt.PARAM_PREFIX) and name in self.spec:
            _check_entry(fh.path, key, info, self.spec[name].shape, self.spec[name].dtype, "parameter")
        elif key.startswith(fmt.STATE_PREFIX) and name.rsplit("/", 1)[0] in self.spec:
            _check_entry(fh.path, key, info, self.spec[name.rsplit("/", 1)[0]].shape, None, "optimizer state")
        elif key.startswith(fmt.BUFFER_PREFIX) and name in self._buffer_specs:
            b = self._buffer_specs[name]
            _check_entry(fh.path, key, info, tuple(b["shape"]), fmt.str_to_dtype(b["dtype"]), "buffer")
        return fh.get(key)

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
        return {n: self._get(fh, fmt.PARAM_PREFIX + n) for n in names}

    def frozen_params(self, *, device: Any = None, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Parameters the optimizer did not own, as stored with θ_0."""
        with self._open(0) as fh:
            return {n: self._cast(self._get(fh, fmt.PARAM_PREFIX + n), device, dtype) for n in self.frozen}

    def buffers(self, step: int, *, device: Any = None, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Buffers (e.g. BatchNorm statistics) in effect right after ``step``."""
        self._check_step(step)
        changes = self._buffer_change_index()
        out = {}
        for name in self.buffer_names:
            last = max([s for s in changes.get(name, []) if s <= step], default=0)
            with self._open(last) as fh:
                out[name] = self._cast(self._get(fh, fmt.BUFFER_PREFIX + name), device, dtype)
        return out

    def buffer_steps(self) -> List[int]:
        """Steps during which at least one buffer changed."""
        return sorted({s for steps in self._buffer_change_index().values() for s in steps})

    def _buffer_change_index(self) -> Dict[str, List[int]]:
        if self._buffer_changes is None:
            changes: Dict[str, List[int]] = {}
            if self.buffer_names:
                for s in range(1, self.num_steps + 1):
                    with self._open(s) as fh:
                        header = list(fh.keys())
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
                out[n] = self._cast(self._get(fh, k), device, dtype)
        return out

    def record(self, step: int) -> fmt.StepRecord:
        """Per-step scalars and micro-batches of ``step`` (1..num_steps)."""
        self._check_step(step, allow_zero=False)
        with self._open(step) as fh:
            obj, batches = self._read_record_parts(fh, step, set(fh.keys()))
        return self._make_record(step, obj, batches)

    def _read_record_parts(self, fh: SafeFile, step: int, keys: Set[str]) -> Tuple[Dict[str, Any],
                                                                                   List[fmt.MicroBatch]]:
        """The JSON step record and the micro-batches of ``step`` from its open file ``fh``
        (whose tensor names are ``keys``), checked."""
        obj = self._parse_record(fh, step)
        return obj, self._read_batches(fh, obj)

    def _read_batches(self, fh: SafeFile, obj: Dict[str, Any]) -> List[fmt.MicroBatch]:
        """The micro-batches of a step file whose record ``obj`` is validated (``n_micro`` is
        bounded by the file's entries or by ``micro_sizes``)."""
        where, header = fh.path, fh.tensors
        n_micro = obj.get("n_micro") or 0
        if not n_micro:
            return []
        for key, dtype in _BATCH_DTYPES.items():
            info = header.get(key)
            if info is None or info.dtype != dtype or info.shape != header[fmt.BATCH_INDEX].shape:
                raise TrajectoryCorruptError(f"{where}: {key!r} is missing or not a {dtype} vector as long as "
                                             f"{fmt.BATCH_INDEX!r} (the record announces {n_micro} micro-batches)")
        index, weight, micro = (fh.get(k) for k in _BATCH_DTYPES)
        if index.dim() != 1:
            raise TrajectoryCorruptError(f"{where}: {fmt.BATCH_INDEX!r} is not a vector")
        if index.numel() and int(index.min()) < 0:
            raise TrajectoryCorruptError(f"{where}: field {fmt.BATCH_INDEX!r} holds a negative dataset index")
        if not bool(torch.isfinite(weight).all()):
            raise TrajectoryCorruptError(f"{where}: field {fmt.BATCH_WEIGHT!r} holds non-finite weights")
        if micro.numel() and (int(micro.min()) < 0 or int(micro.max()) >= n_micro
                              or bool((micro[1:] < micro[:-1]).any())):
            raise TrajectoryCorruptError(
                f"{where}: field {fmt.BATCH_MICRO!r} is not a non-decreasing micro-batch number below n_micro={n_micro}"
            )
        counts = torch.bincount(micro.to(torch.int64), minlength=n_micro).tolist()
        sizes = obj.get("micro_sizes")
        if sizes is not None and counts != sizes:
            raise TrajectoryCorruptError(f"{where}: field 'micro_sizes' {sizes[:8]} does not match {fmt.BATCH_MICRO!r}")
        rng: Dict[int, torch.Tensor] = {}
        cuda_rng: Dict[int, torch.Tensor] = {}
        for key in header:
            slot = _rng_slot(key)
            if slot is not None:
                if not 0 <= slot < n_micro:
                    raise TrajectoryCorruptError(f"{where}: {key!r} names micro-batch {slot} of {n_micro}")
                (cuda_rng if key.startswith(fmt.BATCH_CUDA_RNG) else rng)[slot] = fh.get(key)
        return fmt.unpack_batches(index, weight, counts, rng, cuda_rng)

    def _make_record(self, step: int, obj: Dict[str, Any], batches: List[fmt.MicroBatch]) -> fmt.StepRecord:
        """The :class:`StepRecord` of ``step`` from its validated parts."""
        return fmt.StepRecord.from_json(obj, batches)

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
