"""torchvision adapter. Importing it makes ``import torchvision`` work, even on a CPU-only torch.

The PyPI torchvision wheel is a CUDA build whose compiled operators cannot load on CPU torch;
:func:`ensure_torchvision_importable` imports it anyway (pure-Python models, transforms and
datasets work; compiled ops such as ``torchvision.ops.nms`` raise). It is a no-op wherever
torchvision imports cleanly.
"""

from __future__ import annotations

from .._compat import ensure_torchvision_importable

__all__ = ["ensure_torchvision_importable"]

if ensure_torchvision_importable() is None:
    raise ImportError("captum_explaind.adapters.torchvision needs torchvision: pip install 'captum-explaind[vision]'")
