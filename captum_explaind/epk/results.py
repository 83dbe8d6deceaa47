"""Result containers of the EPK core."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict

import torch

__all__ = ["Reconstruction"]


@dataclass
class Reconstruction:
    r"""A prediction rewritten as a sum over the recorded training run.

    All parts have the model's output shape ``[n_inputs, *output_shape]`` (``[n_inputs,
    n_outputs]`` for a classifier) and add up exactly, up to quadrature error::

        final = initial + kernel + regularization + residual + buffers + other + delta

    Attributes:
        initial (Tensor): f(θ_0; x).
        kernel (Tensor): Σ_s Φ_s(x)·(Δ_s − R_s), the gradient-driven part.
        regularization (Tensor): Σ_s Φ_s(x)·R_s, the weight-decay part.
        residual (Tensor): the part of the updates no optimizer model explains (zero in the model
            and training views, filled by the data view).
        buffers (Tensor): jumps caused by buffers that changed without gradients (BatchNorm
            running statistics); zero for models without such buffers.
        other (Tensor): contribution of trainable parameters outside ``parameters=`` (zero when
            every parameter is resolved).
        final (Tensor): f(θ_N; x).
        delta (Tensor): ``final − initial − kernel − regularization − residual − buffers − other``,
            the convergence delta: quadrature plus floating-point error.
        step_error (Tensor): ``[n_steps, n_inputs]``, per step the measured max |integrated −
            exact| change of the outputs.
        evaluations (int): integrand evaluations (forward-mode passes over a batch).
        unconverged (int): (step, input) pairs that missed the tolerance at ``max_depth``.
    """

    initial: torch.Tensor
    kernel: torch.Tensor
    regularization: torch.Tensor
    residual: torch.Tensor
    buffers: torch.Tensor
    other: torch.Tensor
    final: torch.Tensor
    delta: torch.Tensor
    step_error: torch.Tensor
    evaluations: int = 0
    unconverged: int = 0

    def parts(self) -> Dict[str, torch.Tensor]:
        """The additive parts, by name (``initial`` through ``other``)."""
        return {
            "initial": self.initial,
            "kernel": self.kernel,
            "regularization": self.regularization,
            "residual": self.residual,
            "buffers": self.buffers,
            "other": self.other,
        }

    def max_abs_delta(self) -> float:
        return float(self.delta.abs().max()) if self.delta.numel() else 0.0

    def relative_delta(self) -> float:
        """max |delta| / max |final − initial|."""
        scale = float((self.final - self.initial).abs().max()) if self.final.numel() else 0.0
        return self.max_abs_delta() / scale if scale > 0 else self.max_abs_delta()

    def __repr__(self) -> str:
        shape = tuple(self.final.shape)
        def mx(t: torch.Tensor) -> str:
            return f"{float(t.abs().max()):.3g}" if t.numel() else "-"
        return (
            f"Reconstruction(shape={shape}, max|final-initial|={mx(self.final - self.initial)}, "
            f"max|kernel|={mx(self.kernel)}, max|regularization|={mx(self.regularization)}, "
            f"max|residual|={mx(self.residual)}, max|delta|={mx(self.delta)}, "
            f"evaluations={self.evaluations}, unconverged={self.unconverged})"
        )

    def to(self, *args, **kwargs) -> "Reconstruction":
        vals = {}
        for f in fields(self):
            v = getattr(self, f.name)
            vals[f.name] = v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v
        return Reconstruction(**vals)
