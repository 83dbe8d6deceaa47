"""Base class of the ExPLAIND attribution views: Captum's ``Attribution`` on an EPK core."""

from __future__ import annotations

import os
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr import Attribution
from torch import nn

from ..epk.batch import Batch
from ..epk.engine import ExactPathKernel
from ..epk.options import EPKOptions
from ..epk.outputs import OutputFn
from ..epk.target import Target, TargetType, resolve_target
from ..recording.trajectory import Trajectory

__all__ = ["EPKAttribution", "parse_components"]


def parse_components(component: Union[str, Sequence[str]], allowed: Sequence[str]) -> Tuple[List[str], bool]:
    """Components as a list, and whether a single one was asked for (no dict around results)."""
    if isinstance(component, str):
        comps, single = [component], True
    else:
        comps, single = list(component), False
        if not comps:
            raise ValueError("component is empty")
    for c in comps:
        if c not in allowed:
            raise ValueError(f"unknown component {c!r}; choose from {tuple(allowed)}")
    if len(set(comps)) != len(comps):
        raise ValueError(f"component lists {comps} twice")
    return comps, single


class EPKAttribution(Attribution):
    """Captum ``Attribution`` whose explanations come from an :class:`ExactPathKernel`.

    Args:
        model (nn.Module): an instance of the trained architecture (``forward_func``).
        trajectory (Trajectory or path): the recorded training run.
        options (EPKOptions or str, optional): how to compute (a preset name: ``"exact"``,
            ``"balanced"``, ``"fast"``). Default: "exact"
        output_fn (Callable, optional): raw model output → explained tensor (see
            :class:`ExactPathKernel`). Default: tensor, ``.logits`` or first tuple element.
        **overrides: individual options (``nodes``, ``rtol``, ``dtype``, ``batch_size``,
            ``per_sample``, ``show_progress``, ...; see :class:`EPKOptions`).
    """

    def __init__(self, model: nn.Module, trajectory: Union[Trajectory, str, os.PathLike],
                 options: Union[EPKOptions, str, None] = None, *, output_fn: Optional[OutputFn] = None,
                 **overrides: Any) -> None:
        if "parameters" in overrides:
            raise TypeError("pass layers=... to attribute() to select parameters")
        super().__init__(model)
        self.model = model
        self.epk = ExactPathKernel(model, trajectory, options, output_fn=output_fn, **overrides)

    @property
    def trajectory(self) -> Trajectory:
        return self.epk.trajectory

    @property
    def options(self) -> EPKOptions:
        """The validated options every call of this explainer uses."""
        return self.epk.options

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def _note_buffers(self, buffers: Optional[torch.Tensor], change: torch.Tensor) -> None:
        """Say (once per explainer) that buffers moved the prediction outside the attributions.

        Buffers that change without gradients (BatchNorm running statistics) move the output
        between steps; that part belongs to no parameter, step or training sample. It is reported
        as the ``buffers`` component of :meth:`explain`'s result and is neither in the returned
        attributions nor in the convergence delta (``change = Σ scores + buffers + delta``).
        """
        if buffers is None or getattr(self, "_buffers_noted", False) or buffers.numel() == 0:
            return
        size, scale = float(buffers.abs().max()), float(change.abs().max())
        if size <= 1e3 * torch.finfo(buffers.dtype).eps * max(scale, 1.0):
            return
        self._buffers_noted = True
        warnings.warn(
            f"buffers that changed without gradients (BatchNorm running statistics) moved the target output by "
            f"up to {size:.3g} (largest change {scale:.3g}); that part is the `buffers` component of explain(...) "
            "and is neither in these attributions nor in the convergence delta: "
            "change = sum(attributions) + buffers + delta",
            UserWarning,
            stacklevel=3,
        )

    def _prepare(self, inputs: Any, target: TargetType, additional_forward_args: Any,
                 what: str = "inputs") -> Tuple[Batch, Target]:
        batch = self.epk.prepare_inputs(inputs, additional_forward_args, what=what)
        return batch, resolve_target(target, batch.n, self.epk.output_shape(batch))
