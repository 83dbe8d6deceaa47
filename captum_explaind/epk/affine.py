r"""Evaluating a model at many points of one segment without per-row parameters.

Refinement evaluates rows (inputs) at their own points ``θ(t_r) = θ_0 + t_r Δ`` of the same
segment. Materializing one parameter vector per row and running batched matrix products with
per-row weights is memory bound and slow. But every row shares θ_0 and Δ, and the usual
parameter-consuming operations are linear (or affine) in their weight, so

.. math:: \operatorname{linear}(x, W_0 + t_r ΔW + E) = \operatorname{linear}(x, W_0)
          + t_r \operatorname{linear}(x, ΔW) + \operatorname{linear}(x, E)

with *shared* weights. :class:`AffineParameters` is a ``TorchFunctionMode`` that rewrites
``linear``, ``conv1d/2d/3d``, ``embedding``, ``layer_norm`` and ``group_norm`` this way for the
parameters it knows (by tensor identity); ``E`` is an extra per-parameter term through which
forward-mode tangents and gradients flow. A parameter reaching any other operation marks the
evaluation unsupported; callers then use the generic per-row path (and a probe comparison
guards against silent differences).
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AffineParameters", "Combo"]

_LINEAR_WEIGHT = {F.linear: 1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1}
_NORMS = {F.layer_norm: (2, 3), F.group_norm: (2, 3)}


class Combo(NamedTuple):
    """An extra term ``Σ_j coef_j · dirs_j`` applied one direction at a time.

    ``op(x, Σ_j c_j D_j) = Σ_j c_j op(x, D_j)`` for the linear operations: the directions are
    shared weights, and the derivative by ``coef`` (``grad`` or ``jvp``) is a sum over
    activations — never a per-row weight gradient. So the projections of a row's gradient on a
    few directions, or its derivative along one, cost a few shared-weight operations.

    Attributes:
        coef (Tensor): [K] the coefficients (the differentiated variable).
        dirs (Tensor): [K, *parameter shape] the directions.
    """

    coef: torch.Tensor
    dirs: torch.Tensor


Extra = Union[torch.Tensor, Combo]


class AffineParameters(TorchFunctionMode):
    """Effective parameters ``base + t · delta + extra`` applied through linear structure.

    Args:
        base (dict[str, Tensor]): the tensors ``functional_call`` passes as parameters (θ_0).
        delta (dict[str, Tensor]): Δ per parameter.
        t (Tensor): the row's position on the segment (a scalar; batched under ``vmap``).
        extra (dict[str, Tensor or Combo], optional): an additional term per parameter: a tensor
            (differentiated by ``grad``: the row's gradient) or a :class:`Combo` (its
            coefficients differentiated: directional derivatives); parameters it leaves out get
            none; ``None`` for plain forwards.
        scale (Tensor, optional): a factor ``s`` on the extra term, ``base + t · delta + s · extra``
            (a scalar; batched under ``vmap``): the gradient by ``extra`` of a sum over points
            with their own ``s`` is then the ``s``-weighted sum of their gradients (a quadrature
            rule, one weight per node), formed by the operations' own reductions.
    """

    def __init__(self, base: Dict[str, torch.Tensor], delta: Dict[str, torch.Tensor], t: torch.Tensor,
                 extra: Optional[Dict[str, Extra]] = None, scale: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.names = {id(v): k for k, v in base.items()}
        self.delta = delta
        self.t = t
        self.extra = extra
        self.scale = scale
        self.unsupported: Optional[str] = None

    def _name(self, x: Any) -> Optional[str]:
        return self.names.get(id(x)) if isinstance(x, torch.Tensor) else None

    def _parts(self, name: str):
        extra = None if self.extra is None else self.extra.get(name)  # parameters without one: none
        return self.delta[name], extra

    def _through(self, op: Any, e: Extra) -> torch.Tensor:
        """``s · op(e)`` for an operation linear in ``e``: one direction at a time for a :class:`Combo`."""
        if isinstance(e, Combo):
            out = None
            for j in range(e.dirs.shape[0]):
                term = e.coef[j] * op(e.dirs[j])
                out = term if out is None else out + term
            assert out is not None  # a Combo holds at least one direction
        else:
            out = op(e)
        # the factor on the operation's output (not on e): a scaled copy of e would be a
        # parameter-sized tensor per point, and so would its gradient
        return out if self.scale is None else self.scale * out

    def _dense(self, e: Extra) -> torch.Tensor:
        """``s ·`` the extra term as one tensor (small parameters: biases, norm weights)."""
        out = torch.tensordot(e.coef, e.dirs, dims=1) if isinstance(e, Combo) else e
        return out if self.scale is None else self.scale * out

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        args = list(args)
        if func in _LINEAR_WEIGHT:
            return self._linear_like(func, args, kwargs)
        if func is F.embedding:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self._name(w)
            if name is not None:
                d, e = self._parts(name)
                out = func(*args, **kwargs)
                rest_args = list(args)
                rest_args[1] = d
                out = out + self.t * func(*rest_args, **kwargs)
                if e is not None:
                    def emb(weight: torch.Tensor) -> torch.Tensor:
                        rest_args[1] = weight
                        return func(*rest_args, **kwargs)

                    out = out + self._through(emb, e)
                return out
        if func in _NORMS:
            return self._norm(func, args, kwargs)
        for a in list(args) + list(kwargs.values()):
            if self._name(a) is not None and self.unsupported is None:
                self.unsupported = f"{getattr(func, '__name__', func)} consumes parameter {self._name(a)!r}"
        return func(*args, **kwargs)

    def _linear_like(self, func: Any, args: list, kwargs: dict) -> torch.Tensor:
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        wn, bn = self._name(w), self._name(b)
        if wn is None and bn is None:
            return func(*args, **kwargs)
        x = args[0]
        rest = {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
        tail = args[3:]
        out = func(x, w, b, *tail, **rest)
        if wn is not None:
            d, e = self._parts(wn)
            out = out + self.t * func(x, d, None, *tail, **rest)
            if e is not None:
                out = out + self._through(lambda weight: func(x, weight, None, *tail, **rest), e)
        if bn is not None:
            d, e = self._parts(bn)
            shape = [1] * out.dim()
            ch = 1 if func is not F.linear else out.dim() - 1
            shape[ch] = -1
            out = out + self.t * d.reshape(shape)
            if e is not None:
                out = out + self._dense(e).reshape(shape)
        return out

    def _norm(self, func: Any, args: list, kwargs: dict) -> torch.Tensor:
        wpos, bpos = _NORMS[func]
        key_w, key_b = "weight", "bias"
        w = args[wpos] if len(args) > wpos else kwargs.get(key_w)
        b = args[bpos] if len(args) > bpos else kwargs.get(key_b)
        wn, bn = self._name(w), self._name(b)
        if wn is None and bn is None:
            return func(*args, **kwargs)
        plain_args = list(args)
        for pos in (wpos, bpos):
            if len(plain_args) > pos:
                plain_args[pos] = None
        plain_kwargs = {k: (None if k in (key_w, key_b) else v) for k, v in kwargs.items()}
        y = func(*plain_args, **plain_kwargs)  # normalized, without affine

        def eff(p: Optional[torch.Tensor], name: Optional[str]) -> Optional[torch.Tensor]:
            if p is None:
                return None
            if name is None:
                return p
            d, e = self._parts(name)
            out = p + self.t * d
            return out if e is None else out + self._dense(e)

        we, be = eff(w, wn), eff(b, bn)
        if func is F.group_norm:
            shape = [1, -1] + [1] * (y.dim() - 2)
            we = None if we is None else we.reshape(shape)
            be = None if be is None else be.reshape(shape)
        if we is not None:
            y = y * we
        if be is not None:
            y = y + be
        return y
