"""Lazy import hook that lets ``import torchvision`` work on a CPU-only torch.

The PyPI ``torchvision`` wheel is built against CUDA torch. On a CPU-only torch its C++ extension
cannot load, and ``import torchvision`` then fails while registering fake kernels::

    RuntimeError: operator torchvision::nms does not exist

``transformers`` imports torchvision whenever it is installed, so ``from transformers import
BertForSequenceClassification`` fails the same way. This module installs a ``sys.meta_path``
finder that only acts when ``torchvision`` itself is imported: it runs the normal import and,
*only if that fails with the error above*, defines the two missing operator schemas
(``torchvision::nms`` and ``torchvision::qnms``) and runs torchvision's ``__init__`` again. Where
torchvision imports cleanly (a matching CPU or CUDA build) the hook changes nothing.

``captum-explaind`` ships ``captum_explaind_torchvision_hook.pth``, which calls :func:`install`
at interpreter start, so torchvision, transformers and captum_explaind can be imported in any
order. This module imports only ``sys`` until torchvision is imported (no torch at start-up), and
it is a top-level module so that importing it does not run ``captum_explaind/__init__.py``.
"""

from __future__ import annotations

import sys

__all__ = ["install", "uninstall", "is_installed", "defined_ops"]

#: Operator schemas this hook had to define (empty where torchvision imported cleanly).
defined_ops: list[str] = []

# Only torchvision 0.28's unconditional ``register_fake`` targets; both share this schema.
_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _is_missing_ops_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "torchvision::" in str(err) and "does not exist" in str(err)


def _drop_submodules() -> None:
    # A failed import leaves half-initialised submodules behind (``torchvision.extension``, ...).
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]


def _define_missing_ops() -> bool:
    import torch

    added = False
    for op, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", schema)
            defined_ops.append(f"torchvision::{op}")
            added = True
    return added


class _RetryingLoader:
    """Wraps torchvision's own loader for the duration of one ``exec_module``."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_resource_reader, get_data, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            try:
                self._loader.exec_module(module)
            except RuntimeError as err:
                if not _is_missing_ops_error(err):
                    raise
                _drop_submodules()
                if not _define_missing_ops():  # the schemas exist: the error has another cause
                    raise
                self._loader.exec_module(module)
        finally:
            # Leave no trace: the module reports torchvision's real loader.
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader


class TorchvisionImportHook:
    """``sys.meta_path`` finder for ``torchvision`` only; every other name passes through."""

    _captum_explaind_torchvision_hook = True  # marker: recognised across module copies

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        for finder in list(sys.meta_path):
            if getattr(finder, "_captum_explaind_torchvision_hook", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RetryingLoader(spec.loader)
                return spec
        return None

    def invalidate_caches(self) -> None:
        pass


def is_installed() -> bool:
    """Whether a torchvision import hook is active in this interpreter."""
    return any(getattr(f, "_captum_explaind_torchvision_hook", False) for f in sys.meta_path)


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (idempotent; imports nothing)."""
    if not is_installed():
        sys.meta_path.insert(0, TorchvisionImportHook())


def uninstall() -> None:
    """Remove the hook from ``sys.meta_path`` (an already imported torchvision stays as it is)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_captum_explaind_torchvision_hook", False)]
