r"""Locating the kinks of piecewise-linear activations along a training step.

Along a step θ(t) = θ_{s−1} + tΔ_s the output of a ReLU network is smooth except where some
activation's input crosses its breakpoint (0 for ReLU). There the integrand ``J_f(θ(t)) Δ``
jumps and every fixed quadrature rule stalls. Their locations are the roots of the
pre-activations ``z_u(t)``, which are smooth between the kinks of earlier layers.

:class:`KinkCapture` is a ``TorchFunctionMode`` that records the inputs of the piecewise-linear
functions a forward pass calls (``relu``, ``leaky_relu``, ``relu6``, ``hardtanh``, ``clamp``,
``abs``, ``hardswish``, ``hardsigmoid`` — module or functional form), shifted by their
breakpoints. :func:`kink_roots` takes those values at a few points of an interval, finds every
sign change between neighbouring points and places the root by cubic interpolation through the
four nearest points, so a step can be split at all its kinks at once.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["KinkCapture", "capture_preactivations", "kink_roots"]


def _breaks_relu(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[float]:
    return [0.0]


def _breaks_relu6(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[float]:
    return [0.0, 6.0]


def _breaks_hard(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[float]:
    return [-3.0, 3.0]


def _breaks_hardtanh(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[float]:
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return [float(lo), float(hi)]


def _breaks_clamp(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Any]:
    lo = kwargs.get("min", args[1] if len(args) > 1 else None)
    hi = kwargs.get("max", args[2] if len(args) > 2 else None)
    return [b for b in (lo, hi) if b is not None]


_BREAKS: Dict[Any, Callable[[Sequence[Any], Dict[str, Any]], List[Any]]] = {}
for _f in (F.relu, torch.relu, torch.Tensor.relu, F.leaky_relu, torch.abs, torch.Tensor.abs):
    _BREAKS[_f] = _breaks_relu
for _f in (F.relu6,):
    _BREAKS[_f] = _breaks_relu6
for _f in (F.hardswish, F.hardsigmoid):
    _BREAKS[_f] = _breaks_hard
_BREAKS[F.hardtanh] = _breaks_hardtanh
for _f in (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip):
    _BREAKS[_f] = _breaks_clamp


class KinkCapture(TorchFunctionMode):
    """Records ``input − breakpoint`` of every piecewise-linear activation called in the context.

    Attributes:
        values (list[Tensor]): one tensor per (call, breakpoint), detached.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: List[torch.Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        rule = _BREAKS.get(func)
        if rule is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            x = args[0].detach()
            for b in rule(args, kwargs):
                self.values.append(x - b)
        return func(*args, **kwargs)


def capture_preactivations(fn: Callable[[], Any], n: int) -> Optional[torch.Tensor]:
    """Run ``fn()`` and return the shifted activation inputs as ``[n, U]`` (None if there are none)."""
    with KinkCapture() as cap:
        fn()
    parts = []
    for v in cap.values:
        if v.dim() == 0 or v.numel() % n != 0:
            continue
        parts.append(v.reshape(n, -1))
    if not parts:
        return None
    return torch.cat(parts, dim=1)


def kink_roots(xs: torch.Tensor, z: torch.Tensor, max_roots: int = 512) -> List[torch.Tensor]:
    """Roots of each row's activation inputs on [xs[0], xs[-1]].

    Args:
        xs (Tensor): ``[K]`` ascending positions (K ≥ 2) where ``z`` was evaluated.
        z (Tensor): ``[m, K, U]`` shifted activation inputs per row, point and unit.
        max_roots (int): keep at most this many roots per row (the sub-intervals multiply).

    Returns:
        *list[Tensor]*: per row, the sorted distinct roots strictly inside the interval.
    """
    m, K, U = z.shape
    sign = torch.sign(z)
    change = (sign[:, :-1] * sign[:, 1:]) < 0  # [m, K-1, U]: a root between points q and q+1
    rows, gaps, units = change.nonzero(as_tuple=True)
    out: List[torch.Tensor] = [xs.new_zeros(0) for _ in range(m)]
    if rows.numel() == 0:
        return out
    # cubic through the 4 points nearest to the gap (fewer when K < 4), Newton from the secant root
    k = min(4, K)
    start = (gaps - (k // 2 - 1)).clamp(0, K - k)
    idx = start.unsqueeze(1) + torch.arange(k, device=xs.device).unsqueeze(0)  # [r, k]
    px = xs[idx]  # [r, k]
    pz = z[rows.unsqueeze(1), idx, units.unsqueeze(1)]  # [r, k]
    lo, hi = xs[gaps], xs[gaps + 1]
    zl = z[rows, gaps, units]
    zh = z[rows, gaps + 1, units]
    t = lo + (hi - lo) * zl / (zl - zh)
    for _ in range(4):
        val, der = _lagrange(px, pz, t)
        step = val / torch.where(der.abs() > 0, der, torch.ones_like(der))
        t = torch.minimum(torch.maximum(t - torch.where(der.abs() > 0, step, torch.zeros_like(step)), lo), hi)
    span = xs[-1] - xs[0]
    for r in range(m):
        roots = t[rows == r]
        if roots.numel() == 0:
            continue
        roots = torch.unique(roots)
        inner = roots[(roots > xs[0] + 1e-12 * span) & (roots < xs[-1] - 1e-12 * span)]
        if inner.numel() > 1:  # merge roots closer than the resolution of t
            keep = torch.ones_like(inner, dtype=torch.bool)
            keep[1:] = (inner[1:] - inner[:-1]) > 1e-12 * span
            inner = inner[keep]
        if inner.numel() > max_roots:
            inner = inner[torch.linspace(0, inner.numel() - 1, max_roots, device=inner.device).round().long()]
        out[r] = inner
    return out


def _lagrange(px: torch.Tensor, pz: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Value and derivative at ``t`` of the polynomial through the points (px, pz), per row."""
    k = px.shape[1]
    val = torch.zeros_like(t)
    der = torch.zeros_like(t)
    for i in range(k):
        li = torch.ones_like(t)
        dli = torch.zeros_like(t)
        for j in range(k):
            if j == i:
                continue
            denom = px[:, i] - px[:, j]
            factor = (t - px[:, j]) / denom
            dli = dli * factor + li / denom
            li = li * factor
        val = val + pz[:, i] * li
        der = der + pz[:, i] * dli
    return val, der
