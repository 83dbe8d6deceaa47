"""Compatibility shims for the stack this library sits on.

Two problems are solved here, both documented in the project's environment notes:

* The PyPI ``torchvision`` wheel is built against CUDA torch. On a CPU-only torch its C++
  extension cannot load, and ``import torchvision`` then fails while registering fake kernels
  for ``torchvision::nms``. Because ``transformers`` imports torchvision whenever it is
  installed, that also breaks ``from transformers import Trainer``. The lazy import hook in
  ``_captum_explaind_torchvision_hook`` (active from interpreter start through the ``.pth`` file
  this package installs) defines the two missing operator schemas *only after* the normal import
  failed, so it is a no-op wherever torchvision works. :func:`install_torchvision_import_hook`
  activates it in this process (for interpreters started without ``site``);
  :func:`ensure_torchvision_importable` also imports torchvision.
* Forward-mode AD (``torch.func.jvp``) is not implemented for the fused CPU attention kernels
  (flash SDPA, the ``nn.MultiheadAttention`` fast path). :func:`functorch_friendly` switches to
  the math SDPA backend and disables the fast path for the duration of a transform.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

import _captum_explaind_torchvision_hook as _torchvision_hook

__all__ = ["ensure_torchvision_importable", "functorch_friendly", "install_torchvision_import_hook"]


def install_torchvision_import_hook() -> None:
    """Activate the lazy torchvision import hook in this interpreter (idempotent).

    Imports nothing: torchvision is only touched when something imports it, and patched only if
    that import fails because its compiled operators cannot load.
    """
    _torchvision_hook.install()


def ensure_torchvision_importable() -> ModuleType | None:
    """Import torchvision, even when its compiled ops cannot load; ``None`` if it is not installed.

    Also recovers after an earlier failed ``import torchvision`` (or ``transformers`` model
    import) in the same process.
    """
    install_torchvision_import_hook()
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        return None
    import torchvision

    return torchvision


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
                assert fastpath is not None  # previous is only read from an existing fastpath
                fastpath.set_fastpath_enabled(previous)
