"""The files of a trajectory directory that this library writes, and nothing else.

``overwrite=True`` removes exactly these (a user's notes or checkpoints kept in the directory
survive); everything else in the directory is left alone.
"""

from __future__ import annotations

import json
import os
from typing import List

from . import format as fmt
from .lock import LOCK

__all__ = ["library_files", "other_entries", "is_trajectory_dir", "remove_library_files"]

_TOP = (fmt.MANIFEST, fmt.INITIAL)


def _ours_in_steps(name: str) -> bool:
    core = name[: -len(fmt.TMP_SUFFIX)] if name.endswith(fmt.TMP_SUFFIX) else name
    return fmt.parse_step_filename(core) is not None


def library_files(path: str) -> List[str]:
    """Paths of the files in ``path`` that a recorder writes (step, θ_0, manifest, temporaries)."""
    out = []
    for name in _TOP:
        for candidate in (name, name + fmt.TMP_SUFFIX):
            p = os.path.join(path, candidate)
            if os.path.lexists(p) and not os.path.isdir(p):
                out.append(p)
    steps = os.path.join(path, fmt.STEPS_DIR)
    if os.path.isdir(steps) and not os.path.islink(steps):
        for name in sorted(os.listdir(steps)):
            p = os.path.join(steps, name)
            if _ours_in_steps(name) and not os.path.isdir(p):
                out.append(p)
    return out


def other_entries(path: str) -> List[str]:
    """Entries of ``path`` (relative names) that this library did not write."""
    ours = set(library_files(path))
    out: List[str] = []
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if name == LOCK or p in ours:
            continue
        if name == fmt.STEPS_DIR and os.path.isdir(p) and not os.path.islink(p):
            out.extend(os.path.join(name, n) for n in sorted(os.listdir(p)) if os.path.join(p, n) not in ours)
            continue
        out.append(name)
    return out


def is_trajectory_dir(path: str) -> bool:
    """Whether ``path`` holds a manifest written by this library."""
    mpath = os.path.join(path, fmt.MANIFEST)
    try:
        if not os.path.isfile(mpath) or os.path.getsize(mpath) > fmt.MAX_JSON_BYTES:
            return False
        with open(mpath, "r", encoding="utf-8") as fh:
            obj = json.load(fh)
        return isinstance(obj, dict) and obj.get("format") == fmt.FORMAT_NAME
    except (OSError, ValueError, RecursionError):
        return False


def remove_library_files(path: str) -> None:
    """Delete the files this library wrote in ``path`` (the steps folder too, once empty)."""
    for p in library_files(path):
        os.unlink(p)
    steps = os.path.join(path, fmt.STEPS_DIR)
    if os.path.isdir(steps) and not os.path.islink(steps) and not os.listdir(steps):
        os.rmdir(steps)
