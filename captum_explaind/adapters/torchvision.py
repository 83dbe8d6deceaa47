"""torchvision adapter: importable torchvision on a CPU torch, and the paper's ResNet9.

Importing this module makes ``import torchvision`` work, even on a CPU-only torch: the PyPI
torchvision wheel is a CUDA build whose compiled operators cannot load on CPU torch;
:func:`ensure_torchvision_importable` imports it anyway (pure-Python models, transforms and
datasets work; compiled ops such as ``torchvision.ops.nms`` raise). It is a no-op wherever
torchvision imports cleanly.

torchvision classifiers need nothing else: ``torchvision.models.resnet18(num_classes=...)``
records with :class:`~captum_explaind.TrajectoryRecorder` and is explained by every view on
small inputs (e.g. 3×16×16). Their BatchNorm layers are handled exactly (see ``docs/vision.md``):
the running-statistics change is reported as its own ``buffers`` component, and the data view
differentiates each sample's loss through the statistics of its training batch.

:class:`ResNet9` is the CNN of the ExPLAIND paper's pruning study (the DAWNBench ResNet9 used by
TRAK and ExPLAIND), with a width knob to scale it to a CPU.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._compat import ensure_torchvision_importable

__all__ = ["ensure_torchvision_importable", "ResNet9", "conv_bn"]

if ensure_torchvision_importable() is None:
    raise ImportError("captum_explaind.adapters.torchvision needs torchvision: pip install 'captum-explaind[vision]'")


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 convolution (no bias) → BatchNorm → ReLU, ResNet9's building block."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.res1 = conv_bn(c, c)
        self.res2 = conv_bn(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """The DAWNBench ResNet9 (as in the TRAK and ExPLAIND experiments), width-scalable.

    ``prep`` (w) → ``layer1`` (2w, max-pool, residual) → ``layer2`` (4w, max-pool) →
    ``layer3`` (8w, max-pool, residual) → global max-pool → ``fc`` (no bias) × ``scale``.
    ``width=64`` is the original (6.6 M parameters); ``width=8`` has ~100 k.

    Args:
        num_classes (int): outputs. Default: 2
        width (int): channels of the first block. Default: 64
        in_channels (int): input channels. Default: 3
        scale (float): the logit multiplier of the original. Default: 0.125
    """

    def __init__(self, num_classes: int = 2, width: int = 64, in_channels: int = 3, scale: float = 0.125) -> None:
        super().__init__()
        w = width
        self.prep = conv_bn(in_channels, w)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w))
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(self.pool(h).flatten(1)) * self.scale
