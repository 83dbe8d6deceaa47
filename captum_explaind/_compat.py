"""Compatibility shims for the stack this library sits on.

Two problems are solved here, both documented in the project's environment notes:

* The PyPI ``torchvision`` wheel is built against CUDA torch. On a CPU-only torch its C++
  extension cannot load, and ``import torchvision`` then fails while registering fake kernels
  for ``torchvision::nms``. Because ``transformers`` imports torchvision whenever it is
  installed, that also breaks ``from transformers import Trainer``. :func:`ensure_torchvision_importable`
  defines the two missing operator schemas *only after* the normal import failed, so it is a
  no-op wherever torchvision works.
* Forward-mode AD (``torch.func.jvp``) is not implemented for the fused CPU attention kernels
  (flash SDPA, the ``nn.MultiheadAttention`` fast path). :func:`functorch_friendly` switches to
  the math SDPA backend and disables the fast path for the duration of a transform.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Iterator

import torch

__all__ = ["ensure_torchvision_importable", "functorch_friendly"]


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work even when its compiled ops cannot load.

    Does nothing when torchvision is not installed or imports cleanly.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    # A failed import leaves half-initialised modules behind; drop them before retrying.
    for name in [m for m in list(sys.modules) if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for op in ("nms", "qnms"):  # the only unconditional fake-kernel registrations in 0.28
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(
                f"torchvision::{op}",
                "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            )
    import torchvision  # noqa: F401


@contextlib.contextmanager
def functorch_friendly() -> Iterator[None]:
    """Context in which every attention implementation supports ``jvp``/``vmap``.

    Uses the math scaled-dot-product-attention backend and turns off the
    ``nn.MultiheadAttention`` inference fast path; both are restored on exit.
    """
    stack = contextlib.ExitStack()
    with stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # pragma: no cover - older torch
            pass
        fastpath = getattr(torch.backends, "mha", None)
        previous = None
        if fastpath is not None and hasattr(fastpath, "get_fastpath_enabled"):
            previous = fastpath.get_fastpath_enabled()
            fastpath.set_fastpath_enabled(False)
        try:
            yield
        finally:
            if previous is not None:
                fastpath.set_fastpath_enabled(previous)
