"""On-disk format of a recorded trajectory.

A trajectory is a directory::

    manifest.json                    versioned description (model, optimizer, recording options)
    initial.safetensors              θ_0: every parameter (trainable and frozen) and every buffer
    steps/step_00000001.safetensors  one file per optimizer step s = 1, 2, ...

Each step file holds the trainable parameters right after the step (``param/<name>``), the
optimizer state later views need (``state/<name>/<key>``), buffers that changed during the step
(``buffer/<name>``), the training samples that formed the step (``batch/index``,
``batch/weight``, ``batch/micro``) and, in its safetensors metadata under ``"record"``, a JSON
object with the per-step scalars (learning rate and hyperparameters per parameter group, which
parameters had no gradient, the squared norms of the gradients the optimizer saw, Adam step
counts). Nothing on the load path is pickled.

Every file is written to a temporary name, flushed to disk and then renamed into place, so a
crash leaves either a complete step file or none: a readable prefix of the run.

Integrity (format version 2): each safetensors file's metadata holds ``"checksums"``, a JSON
object mapping every tensor to the CRC-32 of its dtype, shape and bytes, and step files also
``"record_checksum"``, the CRC-32 of the record's JSON text; ``manifest.json`` holds
``"checksum"``, the CRC-32 of its other keys (canonical JSON). Readers verify each tensor as it
is read. Version-1 recordings have no checksums and are read without that verification.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

FORMAT_NAME = "captum_explaind.trajectory"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
INITIAL = "initial.safetensors"
STEPS_DIR = "steps"
TMP_SUFFIX = ".tmp"

# Bounds on what a reader parses (far above anything a recording of a real model needs).
MAX_JSON_BYTES = 64 << 20  # manifest.json (a 100k-tensor model needs ~20 MB)
MAX_HEADER_BYTES = 32 << 20  # a safetensors header (a step of a 10k-tensor model needs ~2 MB)
MAX_EMPTY_MICRO = 1024  # micro-batches without samples a step may log (log_batch([]))
MAX_JSON_DEPTH = 64
CHECKSUM = "crc32"

PARAM_PREFIX = "param/"
BUFFER_PREFIX = "buffer/"
STATE_PREFIX = "state/"
#: keep_every: summed regularization part of a macro-step's updates, by parameter
REG_PREFIX = "reg/"
BATCH_INDEX = "batch/index"
BATCH_WEIGHT = "batch/weight"
BATCH_MICRO = "batch/micro"
EXTRA_PREFIX = "extra/"  # tensors a later addition stores per step; readers that do not know them skip them
BATCH_RNG = "batch/rng_state/"  # + micro-batch number: torch.get_rng_state() before its forward
BATCH_CUDA_RNG = "batch/cuda_rng_state/"  # + micro-batch number: torch.cuda.get_rng_state(device)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MicroBatch",
    "StepRecord",
    "step_filename",
    "parse_step_filename",
    "looks_like_step_file",
    "tensor_checksum",
    "text_checksum",
    "manifest_checksum",
    "write_manifest",
    "atomic_write_bytes",
    "atomic_write_json",
    "write_safetensors",
    "dtype_to_str",
    "str_to_dtype",
]


def step_filename(step: int) -> str:
    """File name of step ``step`` (1-based) inside ``steps/``."""
    return f"step_{step:08d}.safetensors"


_STEP_RE = re.compile(r"step_([0-9]{8,18})\.safetensors", re.ASCII)


def parse_step_filename(name: str) -> Optional[int]:
    """Inverse of :func:`step_filename`; ``None`` for names that are not (canonical) step files.

    Only ASCII digits are accepted and the number must be written exactly as
    :func:`step_filename` writes it, so one step cannot have two file names.
    """
    m = _STEP_RE.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step >= 1 and step_filename(step) == name else None


def looks_like_step_file(name: str) -> bool:
    """A name a step file could be mistaken for (``step_*.safetensors``)."""
    return name.startswith("step_") and name.endswith(".safetensors")


def tensor_checksum(tensor: torch.Tensor) -> str:
    """CRC-32 (hex) of a CPU tensor's dtype, shape and bytes."""
    t = tensor.detach().contiguous()
    return _checksum(t, _bytes_of(t) if t.numel() else None)


def _bytes_of(t: torch.Tensor) -> Any:
    """Zero-copy buffer of a contiguous CPU tensor's bytes."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _checksum(t: torch.Tensor, data: Any) -> str:
    """:func:`tensor_checksum` of ``t`` whose bytes ``data`` (or None when empty) are at hand."""
    crc = zlib.crc32(f"{dtype_to_str(t.dtype)}{list(t.shape)}".encode("ascii"))
    if data is not None:
        crc = zlib.crc32(data, crc)  # releases the GIL for large buffers
    return f"{crc:08x}"


def text_checksum(text: str) -> str:
    """CRC-32 (hex) of a string's UTF-8 bytes."""
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """CRC-32 of a manifest's keys other than ``"checksum"``, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return text_checksum(json.dumps(body, sort_keys=True, separators=(",", ":")))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: Any) -> None:
    """Write ``data`` (bytes, or a list of buffers written one after the other) to ``path`` so
    that readers see the old file, or the whole new one."""
    tmp = path + TMP_SUFFIX
    try:  # a leftover (or planted) temporary, possibly a symlink: never write through it
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as fh:
        for part in (data if isinstance(data, list) else [data]):
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def write_manifest(path: str, manifest: Dict[str, Any]) -> None:
    """Atomically write ``manifest`` with its checksum."""
    atomic_write_json(path, dict(manifest, checksum=manifest_checksum(manifest)))


_ST_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}


def write_safetensors(
    path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None
) -> None:
    """Atomically write ``tensors`` (on CPU) as one safetensors file, with the checksum of every
    tensor (and of the ``"record"`` metadata) in its metadata.

    The tensors' bytes are written straight from their memory (no serialized copy of the whole
    file is built); the layout is safetensors' own: an 8-byte header length, the JSON header
    padded to 8 bytes, then the tensors back to back, largest element size first.
    """
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # one zero-copy view of each tensor's bytes, checksummed and written (few calls per tensor:
    # this runs in the background writer thread, and every call is a GIL hand-off)
    views = {k: (_bytes_of(v) if v.numel() else None) for k, v in flat.items()}
    meta = dict(metadata or {})
    meta["checksums"] = json.dumps({k: _checksum(v, views[k]) for k, v in flat.items()}, sort_keys=True)
    if "record" in meta:
        meta["record_checksum"] = text_checksum(meta["record"])
    header: Dict[str, Any] = {"__metadata__": meta}
    parts: List[Any] = []
    offset = 0
    for key in sorted(flat, key=lambda k: (-flat[k].element_size(), k)):
        t = flat[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        if n:
            parts.append(views[key])
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(path, [struct.pack("<Q", len(text)), text, *parts])


_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def str_to_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError as err:
        raise ValueError(f"unknown dtype {name!r} in trajectory") from err


@dataclass
class MicroBatch:
    """Training samples that fed one backward pass of a step.

    Attributes:
        indices (Tensor): dataset indices (int64, may repeat).
        weights (Tensor): each entry's weight ``a`` in the loss whose gradient was taken, so that
            the step's gradient is ``Σ a_k ∇L_k`` up to the global scale measured at replay.
        rng_state (Tensor, optional): ``torch.get_rng_state()`` (uint8, CPU) taken right before the
            micro-batch's training forward, so that its dropout masks can be replayed.
        cuda_rng_state (Tensor, optional): ``torch.cuda.get_rng_state(device)`` likewise, when
            the model was on CUDA.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    rng_state: Optional[torch.Tensor] = None
    cuda_rng_state: Optional[torch.Tensor] = None


@dataclass
class StepRecord:
    """Per-step scalars of a recorded optimizer step (parsed from the step file's metadata).

    Attributes:
        step (int): 1-based optimizer step.
        lr (list[float]): learning rate of each parameter group, read just before the step.
        groups (list[dict]): the other hyperparameters of each group at that step.
        inactive (list[str]): trainable parameters whose ``.grad`` was ``None`` (skipped by torch).
        grad_sq (dict[str, float]): squared 2-norm of each parameter's gradient as the optimizer
            saw it (after clipping and loss scaling), computed in float64.
        state_step (dict[str, int]): per-parameter Adam step counts after the step.
        batches (list[MicroBatch]): the micro-batches logged for this step.
    """

    step: int
    lr: List[float]
    groups: List[Dict[str, Any]]
    inactive: List[str] = field(default_factory=list)
    grad_sq: Dict[str, float] = field(default_factory=dict)
    state_step: Dict[str, int] = field(default_factory=dict)
    batches: List[MicroBatch] = field(default_factory=list)

    @property
    def grad_norm(self) -> float:
        """Global 2-norm of the gradient the optimizer saw."""
        return float(sum(self.grad_sq.values())) ** 0.5

    def to_json(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "lr": self.lr,
            "groups": self.groups,
            "inactive": self.inactive,
            "grad_sq": self.grad_sq,
            "state_step": self.state_step,
            "n_micro": len(self.batches),
            "micro_sizes": [int(b.indices.numel()) for b in self.batches],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], batches: List[MicroBatch]) -> "StepRecord":
        return cls(
            step=int(obj["step"]),
            lr=[float(x) for x in obj["lr"]],
            groups=[dict(g) for g in obj["groups"]],
            inactive=list(obj.get("inactive", [])),
            grad_sq={k: float(v) for k, v in obj.get("grad_sq", {}).items()},
            state_step={k: int(v) for k, v in obj.get("state_step", {}).items()},
            batches=batches,
        )


def pack_batches(batches: List[MicroBatch]) -> Dict[str, torch.Tensor]:
    """Concatenate micro-batches into the flat tensors stored in a step file (three, plus one
    per recorded RNG state)."""
    if not batches:
        return {
            BATCH_INDEX: torch.zeros(0, dtype=torch.int64),
            BATCH_WEIGHT: torch.zeros(0, dtype=torch.float64),
            BATCH_MICRO: torch.zeros(0, dtype=torch.int32),
        }
    out = {
        BATCH_INDEX: torch.cat([b.indices.to(torch.int64) for b in batches]),
        BATCH_WEIGHT: torch.cat([b.weights.to(torch.float64) for b in batches]),
        BATCH_MICRO: torch.cat(
            [torch.full((len(b.indices),), i, dtype=torch.int32) for i, b in enumerate(batches)]
        ),
    }
    for i, b in enumerate(batches):
        if b.rng_state is not None:
            out[f"{BATCH_RNG}{i}"] = b.rng_state
        if b.cuda_rng_state is not None:
            out[f"{BATCH_CUDA_RNG}{i}"] = b.cuda_rng_state
    return out


def unpack_batches(
    index: torch.Tensor,
    weight: torch.Tensor,
    sizes: List[int],
    rng: Optional[Mapping[int, torch.Tensor]] = None,
    cuda_rng: Optional[Mapping[int, torch.Tensor]] = None,
) -> List[MicroBatch]:
    """Inverse of :func:`pack_batches`: split the entries into micro-batches of ``sizes``;
    ``rng``/``cuda_rng`` map micro-batch numbers to their RNG states."""
    rng, cuda_rng = rng or {}, cuda_rng or {}
    return [
        MicroBatch(indices=i.clone(), weights=w.clone(), rng_state=rng.get(j), cuda_rng_state=cuda_rng.get(j))
        for j, (i, w) in enumerate(zip(torch.split(index, sizes), torch.split(weight, sizes)))
    ]
