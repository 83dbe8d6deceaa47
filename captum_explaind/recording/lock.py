"""One recorder per trajectory directory: a lock file held for the whole recording.

The lock is ``<run>/.lock``, an ``flock``-ed file naming its holder (process id, host, start
time). The kernel releases an ``flock`` when its process dies, so a lock file whose lock can be
taken is *stale*: the process that recorded there was killed before it could close. Two
recorders of the same directory — in one process or in two — cannot both hold it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import stat
import threading
import uuid
from typing import Any, Dict, Optional

from ..errors import TrajectoryError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: exclusive creation + pid check only
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK", "TrajectoryLockError", "DirectoryLock"]

LOCK = ".lock"

# Directories locked by recorders of this process (realpath -> holder description).
_HELD: Dict[str, str] = {}
# Reentrant: a garbage-collected recorder's __del__ may release its lock while this thread is
# inside acquire() (the GC runs at any allocation) — a plain Lock deadlocked there.
_HELD_GUARD = threading.RLock()


class TrajectoryLockError(TrajectoryError):
    """Another recorder holds (or a dead one left) the lock of a trajectory directory."""


def _describe(info: Dict[str, Any]) -> str:
    return (f"process {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"(recording since {info.get('started_utc', '?')})")


def _read_info(fd: int) -> Optional[Dict[str, Any]]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else None
        return info if isinstance(info, dict) else ({"pid": "?"} if raw.strip() else None)
    except (OSError, ValueError):
        return {"pid": "?"}


class DirectoryLock:
    """The lock of one trajectory directory, held from :meth:`acquire` to :meth:`release`.

    Args:
        path (str): the trajectory directory (must exist).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = os.path.join(path, LOCK)
        self._key = os.path.realpath(path)
        self._fd: Optional[int] = None
        self._ino: Optional[tuple] = None
        self.stale: Optional[Dict[str, Any]] = None  # holder of a stale lock found by acquire()

    def acquire(self) -> None:
        """Take the lock; :attr:`stale` then describes a dead holder's lock taken over, if any.

        Raises:
            TrajectoryLockError: another recorder (in this process or another) holds it.
        """
        with _HELD_GUARD:
            if self._key in _HELD:
                raise TrajectoryLockError(
                    f"{self.path!r} is already being recorded by another TrajectoryRecorder in this process "
                    f"({_HELD[self._key]}); close it first (or record to another path)"
                )
            for _ in range(10):  # the file may be unlinked by its holder between open and flock
                # never follow a symlink (it could point at a file we would truncate) nor block on a FIFO
                flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                try:
                    fd = os.open(self.file, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
                except OSError as err:
                    raise TrajectoryLockError(
                        f"cannot open the lock file {self.file!r} ({err}); it must be a regular file "
                        "(not a symlink): remove it"
                    ) from None
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise TrajectoryLockError(f"the lock file {self.file!r} is not a regular file; remove it")
                try:
                    self._lock_fd(fd)
                except BaseException:
                    os.close(fd)
                    raise
                st = os.fstat(fd)
                try:
                    now = os.stat(self.file)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                    break
                os.close(fd)
            else:  # pragma: no cover - a lock file recreated ten times in a row
                raise TrajectoryLockError(f"cannot take the lock {self.file!r}: it keeps being replaced")
            self.stale = _read_info(fd)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "token": uuid.uuid4().hex,
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode("utf-8"))
            os.fsync(fd)
            self._fd, self._ino = fd, (st.st_ino, st.st_dev)
            _HELD[self._key] = _describe(info)

    def _lock_fd(self, fd: int) -> None:
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_info(fd) or {}
            raise TrajectoryLockError(
                f"{self.path!r} is being recorded by another TrajectoryRecorder: {_describe(holder)} holds its "
                f"lock {LOCK!r}. Two recorders writing one directory would mix their runs; wait for it to "
                "finish, stop it, or record to another path"
            ) from None

    def check(self) -> None:
        """Raise :class:`TrajectoryError` unless the directory still holds this lock file."""
        try:
            st = os.stat(self.file)
            ok = (st.st_ino, st.st_dev) == self._ino
        except OSError:
            ok = False
        if not ok:
            raise TrajectoryError(
                f"the trajectory directory {self.path!r} was removed, moved or replaced while recording "
                f"(its lock file {LOCK!r} is gone or not this recorder's)"
            )

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, keep_stale: bool = False) -> None:
        """Remove the lock file and release the lock (idempotent).

        Args:
            keep_stale (bool): put back the dead holder's lock found by :meth:`acquire` instead
                of removing the file (a recorder that gave up leaves the evidence in place).
        """
        if self._fd is None:
            return
        with _HELD_GUARD:
            try:
                st = os.stat(self.file)
                if (st.st_ino, st.st_dev) == self._ino:
                    if keep_stale and self.stale:
                        os.ftruncate(self._fd, 0)
                        os.lseek(self._fd, 0, os.SEEK_SET)
                        os.write(self._fd, json.dumps(self.stale).encode("utf-8"))
                    else:
                        os.unlink(self.file)
            except OSError:
                pass
            try:
                os.close(self._fd)  # releases the flock
            except OSError:  # pragma: no cover
                pass
            self._fd = None
            _HELD.pop(self._key, None)
