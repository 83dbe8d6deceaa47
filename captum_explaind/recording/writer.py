"""Writing step files: in the training thread, or in one background thread that keeps order.

Either way each file is written to a temporary name, fsync-ed and renamed into place
(:func:`format.write_safetensors`), so a crash leaves a readable prefix of the run: the
background thread writes files one at a time, in the order they were submitted, and a step
counts as *complete* only once its file is durably in place. The first failure stops the
writer: later submissions are refused, so no later step can take a failed step's number.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

from . import format as fmt

__all__ = ["StepWriter"]

_Job = Tuple[str, Dict[str, torch.Tensor], Dict[str, str], Callable[[], None]]


class StepWriter:
    """Writes safetensors files in submission order and remembers the first failure.

    Args:
        background (bool): write in a daemon thread (training goes on while a step is written);
            otherwise :meth:`submit` writes before returning.
        max_pending (int): background mode: how many submitted files may wait (each holds a copy
            of the step's tensors in host memory); :meth:`submit` blocks beyond that.
    """

    def __init__(self, background: bool = False, max_pending: int = 2) -> None:
        self.background = background
        self.error: Optional[BaseException] = None
        self.failed_path: Optional[str] = None
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue(maxsize=max(1, max_pending))
        self._thread: Optional[threading.Thread] = None
        if background:
            self._thread = threading.Thread(target=self._run, name="captum_explaind-step-writer", daemon=True)
            self._thread.start()

    def submit(self, path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
               on_done: Callable[[], None]) -> None:
        """Write ``tensors`` to ``path`` (now, or queued) and call ``on_done`` once it is durable.

        Raises:
            BaseException: synchronous mode: whatever the write raised (the writer is then failed).
        """
        if self.error is not None:
            raise RuntimeError(f"the step writer failed earlier writing {self.failed_path}") from self.error
        if self._thread is None:
            self._write((path, tensors, metadata, on_done))
            if self.error is not None:
                raise self.error
        else:
            self._queue.put((path, tensors, metadata, on_done))

    def _write(self, job: _Job) -> None:
        path, tensors, metadata, on_done = job
        if self.error is not None:
            return  # after a failure nothing more reaches the disk
        try:
            fmt.write_safetensors(path, tensors, metadata)
        except BaseException as err:  # noqa: BLE001 - any failure fails the recording closed
            self.error, self.failed_path = err, path
            return
        on_done()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._write(job)
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
