"""Writing step files: in the training thread, or in one background thread that keeps order.

Either way each file is written to a temporary name, fsync-ed and renamed into place
(:func:`format.write_safetensors`), so a crash leaves a readable prefix of the run: the
background thread writes files one at a time, in the order they were submitted, and a step
counts as *complete* only once its file is durably in place. The first failure stops the
writer: later submissions are refused, so no later step can take a failed step's number.

Background mode splits a step in two. The training thread only takes a *snapshot*: it copies
the step's parameters and optimizer state into the host buffers of a free :class:`Snapshot`
(allocated at the first step, then reused, so no step allocates or page-faults fresh memory).
The writer thread does everything else — CRC-32 checksums, the safetensors header, the write,
fsync and the rename (``zlib.crc32`` and file I/O release the GIL) — and hands the snapshot
back. There are ``max_pending`` snapshots: when all of them wait for the disk, the next step
waits for one (backpressure), so host memory stays bounded at ``max_pending`` steps.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import format as fmt

__all__ = ["StepWriter", "Snapshot"]

_Meta = Union[Dict[str, str], Callable[[], Dict[str, str]]]
_Job = Tuple[str, Dict[str, torch.Tensor], _Meta, Callable[[], None], Optional["Snapshot"]]

# Background writers still running: a script that ends without close() still gets its steps.
_LIVE: "weakref.WeakSet[StepWriter]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for writer in list(_LIVE):
        try:
            writer.flush()
        except Exception:
            pass


class Snapshot:
    """Reusable host buffers for one step's large tensors (background mode).

    :meth:`take` queues a copy of a tensor into its buffer (allocated the first time a key is
    seen, or when its shape or dtype changed); :meth:`copy` runs the queued copies, batched.
    """

    def __init__(self) -> None:
        self._buffers: Dict[str, torch.Tensor] = {}
        self._dst: List[torch.Tensor] = []
        self._src: List[torch.Tensor] = []

    def take(self, key: str, tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The buffer that will hold ``tensor`` (converted to ``dtype``) once :meth:`copy` ran."""
        src = tensor.detach()
        want = src.dtype if dtype is None else dtype
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != want:
            buf = torch.empty(src.shape, dtype=want, device="cpu")
            self._buffers[key] = buf
        self._dst.append(buf)
        self._src.append(src)
        return buf

    def copy(self) -> None:
        """Copy every queued tensor into its buffer (blocking, so the live tensors may change after)."""
        dst, src = self._dst, self._src
        self._dst, self._src = [], []
        if not dst:
            return
        try:
            torch._foreach_copy_(dst, src)
        except (RuntimeError, TypeError):  # pragma: no cover - builds without a foreach copy for these
            for d, s in zip(dst, src):
                d.copy_(s)

    @property
    def nbytes(self) -> int:
        """Host memory held by this snapshot's buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class StepWriter:
    """Writes safetensors files in submission order and remembers the first failure.

    Args:
        background (bool): write in a daemon thread (training goes on while a step is written);
            otherwise :meth:`submit` writes before returning.
        max_pending (int): background mode: how many steps may be held in host memory, not yet
            durably on disk (each in its own :class:`Snapshot`); :meth:`snapshot` blocks beyond that.
    """

    def __init__(self, background: bool = False, max_pending: int = 2) -> None:
        self.background = background
        self.max_pending = max(1, int(max_pending))
        self.error: Optional[BaseException] = None
        self.failed_path: Optional[str] = None
        #: CPU seconds the writer thread spent writing (checksums, serialization, write, fsync)
        self.cpu_seconds = 0.0
        #: wall seconds the training thread waited for a free snapshot (backpressure)
        self.wait_seconds = 0.0
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._free: "queue.Queue[Snapshot]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        if background:
            for _ in range(self.max_pending):
                self._free.put(Snapshot())
            self._thread = threading.Thread(target=self._run, name="captum_explaind-step-writer", daemon=True)
            self._thread.start()
            _LIVE.add(self)

    def snapshot(self) -> Optional[Snapshot]:
        """Background mode: a free snapshot for the next step (waits while all ``max_pending`` are
        pending); ``None`` in synchronous mode (the write reads the live tensors before returning)."""
        if self._thread is None:
            return None
        try:
            return self._free.get_nowait()
        except queue.Empty:
            t0 = time.perf_counter()
            snap = self._free.get()
            self.wait_seconds += time.perf_counter() - t0
            return snap

    def release(self, snap: Optional[Snapshot]) -> None:
        """Give back a snapshot that will not be submitted (the step failed before its write)."""
        if snap is not None:
            self._free.put(snap)

    @property
    def running(self) -> bool:
        """Whether the background thread is running (background mode, not closed)."""
        return self._thread is not None

    def submit(self, path: str, tensors: Dict[str, torch.Tensor], metadata: _Meta,
               on_done: Callable[[], None], snap: Optional[Snapshot] = None) -> None:
        """Write ``tensors`` to ``path`` (now, or queued) and call ``on_done`` once it is durable.

        ``metadata``: the file's metadata, or a function returning it, called by the thread that
        writes (work on the snapshot that can leave the training thread). ``snap``: the snapshot
        holding (some of) ``tensors``; it is handed back once written.

        Raises:
            BaseException: synchronous mode: whatever the write raised (the writer is then failed).
            RuntimeError: the writer failed earlier (``snap`` is handed back).
        """
        if self.error is not None:
            self.release(snap)
            raise RuntimeError(f"the step writer failed earlier writing {self.failed_path}") from self.error
        if self._thread is None:
            self._write((path, tensors, metadata, on_done, None))
            if self.error is not None:
                raise self.error
        else:
            self._queue.put((path, tensors, metadata, on_done, snap))

    def _write(self, job: _Job) -> None:
        path, tensors, metadata, on_done, snap = job
        try:
            if self.error is not None:
                return  # after a failure nothing more reaches the disk
            try:
                fmt.write_safetensors(path, tensors, metadata() if callable(metadata) else metadata)
            except BaseException as err:  # noqa: BLE001 - any failure fails the recording closed
                self.error, self.failed_path = err, path
                return
            on_done()
        finally:
            tensors.clear()  # drop the references to the snapshot's buffers before reusing them
            self.release(snap)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                c0 = time.thread_time()
                self._write(job)
                self.cpu_seconds += time.thread_time() - c0
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every submitted file is written (or the writer failed)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Flush and stop the background thread (idempotent)."""
        if self._thread is not None:
            self.flush()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
