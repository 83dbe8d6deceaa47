"""Base class of the ExPLAIND attribution views: Captum's ``Attribution`` on an EPK core."""

from __future__ import annotations

import os
from typing import Any, List, Sequence, Tuple, Union

import torch
from captum.attr import Attribution
from torch import nn

from ..epk.engine import ExactPathKernel
from ..recording.trajectory import Trajectory
from ._target import Target, TargetType, resolve_target

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
        **options: the options of :class:`ExactPathKernel` (``quadrature``, ``nodes``,
            ``error_control``, ``rtol``, ``atol``, ``max_depth``, ``dtype``, ``device``,
            ``batch_size``, ``show_progress``).
    """

    def __init__(self, model: nn.Module, trajectory: Union[Trajectory, str, os.PathLike], **options: Any) -> None:
        if "parameters" in options:
            raise TypeError("pass layers=... to attribute() to select parameters")
        super().__init__(model)
        self.model = model
        self.epk = ExactPathKernel(model, trajectory, **options)

    @property
    def trajectory(self) -> Trajectory:
        return self.epk.trajectory

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def _prepare(self, inputs: Any, target: TargetType, additional_forward_args: Any) -> Tuple[Any, Any, int, Target]:
        x, a, n = self.epk.prepare_inputs(inputs, additional_forward_args)
        probe = self.epk.functional.forward(self.epk.theta(0), *_first(x, a, n))
        return x, a, n, resolve_target(target, n, probe.shape[1:])


def _first(x: Tuple[Any, ...], a: Tuple[Any, ...], n: int) -> Tuple[Tuple[Any, ...], Tuple[Any, ...]]:
    def one(v: Any) -> Any:
        return v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

    return tuple(one(v) for v in x), tuple(one(v) for v in a)
