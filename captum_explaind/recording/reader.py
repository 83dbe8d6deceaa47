"""Bounded reading of the files of a trajectory directory.

Everything read from disk is treated as hostile until checked: only regular files are opened
(no FIFO, device or directory; a symlink only if it resolves inside the run directory), JSON is
bounded in size and depth, and a safetensors file's header is fully validated — dtypes, shapes,
offsets inside the file, no overlaps — before a single tensor byte is allocated. Tensors are read
with plain ``readinto`` (no mmap of a file that might change) and checked against the checksum the
writer stored (format version 2). Every problem is a :class:`TrajectoryCorruptError` naming the
file and the field.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from ..errors import TrajectoryCorruptError
from . import format as fmt

__all__ = ["open_regular", "read_json", "check_json_depth", "SafeFile", "TensorInfo"]

# safetensors dtype codes -> torch dtypes (what this library writes, and a little more)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
_MAX_DIMS = 16
_SPARSE_MIN_BYTES = 64 << 20  # files this big must have (most of) their blocks on disk


def _inside(path: str, root: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def open_regular(path: str, root: str) -> Tuple[int, os.stat_result]:
    """Open ``path`` for reading if it is a regular file inside ``root`` (after symlinks).

    Returns:
        *(int, os.stat_result)*: an open file descriptor and its ``fstat``.

    Raises:
        TrajectoryCorruptError: a missing file, a FIFO/device/directory, a symlink leaving the run.
    """
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        raise TrajectoryCorruptError(f"{path} is missing") from None
    except OSError as err:
        raise TrajectoryCorruptError(f"{path} cannot be read ({err})") from err
    if not _inside(path, root):
        raise TrajectoryCorruptError(
            f"{path} resolves to {os.path.realpath(path)!r}, outside the trajectory directory {root!r} "
            "(a symlink to another run's file is never followed)"
        )
    try:
        st = os.stat(path) if stat.S_ISLNK(lst.st_mode) else lst
    except OSError as err:
        raise TrajectoryCorruptError(f"{path} is a dangling symlink ({err})") from err
    if not stat.S_ISREG(st.st_mode):
        raise TrajectoryCorruptError(f"{path} is not a regular file (a FIFO, device, socket or directory)")
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, open() cannot hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise TrajectoryCorruptError(f"{path} cannot be opened ({err})") from err
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode):
        os.close(fd)
        raise TrajectoryCorruptError(f"{path} is not a regular file")
    blocks = getattr(fst, "st_blocks", None)
    if blocks is not None and fst.st_size > _SPARSE_MIN_BYTES and blocks * 512 < fst.st_size // 8:
        os.close(fd)
        raise TrajectoryCorruptError(
            f"{path} is a sparse file ({fst.st_size} bytes announced, {blocks * 512} on disk): its tensors "
            "were never written (a recorder writes every byte)"
        )
    return fd, fst


def _read_exact(fd: int, offset: int, n: int, path: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise TrajectoryCorruptError(f"{path} is truncated: {n} bytes expected at offset {offset}, got {len(data)}")
    return data


def check_json_depth(obj: Any, where: str, limit: int = fmt.MAX_JSON_DEPTH) -> None:
    """Raise unless ``obj`` nests at most ``limit`` levels (iteratively: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise TrajectoryCorruptError(f"{where} nests deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def parse_json(text: Any, where: str) -> Any:
    """``json.loads`` with every failure (syntax, encoding, recursion, depth) as a named error."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise TrajectoryCorruptError(f"{where} nests too deeply to be parsed") from None
    except (ValueError, TypeError) as err:
        raise TrajectoryCorruptError(f"{where} is not valid JSON ({err})") from err
    check_json_depth(obj, where)
    return obj


def read_json(path: str, root: str, max_bytes: int = fmt.MAX_JSON_BYTES) -> Any:
    """Parse the JSON file ``path`` (a regular file inside ``root`` of at most ``max_bytes``)."""
    fd, st = open_regular(path, root)
    try:
        if st.st_size > max_bytes:
            raise TrajectoryCorruptError(f"{path} is {st.st_size} bytes, more than the {max_bytes} a manifest may hold")
        data = _read_exact(fd, 0, st.st_size, path)
    finally:
        os.close(fd)
    return parse_json(data, path)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header, validated."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int


def _parse_entry(key: str, entry: Any, data_size: int, where: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise TrajectoryCorruptError(f"{where}: header entry {key!r} is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in _ST_DTYPES:
        raise TrajectoryCorruptError(f"{where}: tensor {key!r} has an unknown dtype {code!r:.40}")
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise TrajectoryCorruptError(f"{where}: tensor {key!r} has an invalid shape {shape!r:.80}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise TrajectoryCorruptError(f"{where}: tensor {key!r} has invalid data_offsets {offsets!r:.80}")
    begin, end = offsets
    dtype = _ST_DTYPES[code]
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if not 0 <= begin <= end <= data_size:
        raise TrajectoryCorruptError(
            f"{where} is truncated or corrupt: tensor {key!r} lies at bytes {begin}..{end} of a data section "
            f"of {data_size} bytes"
        )
    if end - begin != nbytes:
        raise TrajectoryCorruptError(
            f"{where}: tensor {key!r} declares {list(shape)} {dtype} ({nbytes} bytes) but spans {end - begin} bytes"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


class SafeFile:
    """A safetensors file opened for bounded reading; use as a context manager.

    Attributes:
        path (str): the file.
        tensors (dict[str, TensorInfo]): validated header entries.
        metadata (dict[str, str]): the ``__metadata__`` strings.
    """

    def __init__(self, path: str, root: str) -> None:
        self.path = path
        self._fd: Optional[int] = None
        fd, st = open_regular(path, root)
        try:
            self.tensors, self.metadata, self._data_start = self._parse_header(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._checksums: Optional[Dict[str, str]] = None

    def _parse_header(self, fd: int, size: int) -> Tuple[Dict[str, TensorInfo], Dict[str, str], int]:
        where = self.path
        if size < 8:
            raise TrajectoryCorruptError(f"{where} is not a readable safetensors file (shorter than a header)")
        (n,) = struct.unpack("<Q", _read_exact(fd, 0, 8, where))
        if n > fmt.MAX_HEADER_BYTES or n > size - 8:
            raise TrajectoryCorruptError(
                f"{where} is not a readable safetensors file (header length {n} exceeds the file size {size})"
            )
        raw = _read_exact(fd, 8, n, where)
        try:
            header = parse_json(raw.decode("utf-8"), f"{where} (safetensors header)")
        except UnicodeDecodeError as err:
            raise TrajectoryCorruptError(f"{where} is not a readable safetensors file ({err})") from err
        if not isinstance(header, dict):
            raise TrajectoryCorruptError(f"{where}: the safetensors header is a {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TrajectoryCorruptError(f"{where}: __metadata__ is not an object of strings")
        data_size = size - 8 - n
        tensors = {k: _parse_entry(k, v, data_size, where) for k, v in header.items()}
        spans = sorted((t.begin, t.end, k) for k, t in tensors.items() if t.end > t.begin)
        for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise TrajectoryCorruptError(f"{where}: tensors {k0!r} and {k1!r} overlap")
        return tensors, meta, 8 + n

    def __enter__(self) -> "SafeFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover
        self.close()

    def keys(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def checksums(self) -> Optional[Dict[str, str]]:
        """The per-tensor checksums of a version-2 file (``None`` if it has none)."""
        if self._checksums is None and "checksums" in self.metadata:
            obj = parse_json(self.metadata["checksums"], f"{self.path}: metadata 'checksums'")
            if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
                raise TrajectoryCorruptError(f"{self.path}: metadata 'checksums' is not an object of strings")
            self._checksums = obj
        return self._checksums

    def get(self, key: str, *, verify: bool = True) -> torch.Tensor:
        """Read tensor ``key`` (its size is known to lie inside the file) and check its checksum."""
        info = self.tensors.get(key)
        if info is None:
            raise TrajectoryCorruptError(f"{self.path} lacks tensor {key!r}")
        assert self._fd is not None, "file closed"
        n = info.end - info.begin
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            view: Any = buf.numpy()  # readinto the tensor's own memory: no second copy
            got = os.preadv(self._fd, [view], self._data_start + info.begin)
            if got != n:
                raise TrajectoryCorruptError(f"{self.path} is truncated: tensor {key!r} lacks {n - got} bytes")
        t = buf.view(info.dtype).reshape(info.shape)
        sums = self.checksums if verify else None
        if sums is not None:
            if key not in sums:
                raise TrajectoryCorruptError(f"{self.path}: tensor {key!r} has no checksum")
            if fmt.tensor_checksum(t) != sums[key]:
                raise TrajectoryCorruptError(
                    f"{self.path}: tensor {key!r} fails its checksum (its bytes, dtype or shape changed on disk)"
                )
        return t
