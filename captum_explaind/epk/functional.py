"""A stateless, flat-parameter view of a model for ``torch.func`` transforms.

:class:`FunctionalModel` evaluates ``f(θ; x)`` for a flat trainable-parameter vector θ (frozen
parameters and buffers come from the trajectory), its forward-mode derivative along one or
several tangents (``jvp``; no Jacobian is ever built), and per-example gradients of a selected
scalar output (``vmap(grad)``, with a per-example loop fallback for models ``vmap`` cannot
handle).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .._compat import functorch_friendly
from .layout import ParamLayout

__all__ = ["FunctionalModel", "as_tuple"]


def as_tuple(x: Any) -> Tuple[Any, ...]:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, tuple) else (x,)


class FunctionalModel:
    """Evaluate a copy of ``model`` at arbitrary flat trainable parameters.

    Args:
        model (nn.Module): an instance of the trained architecture; it is deep-copied, moved to
            ``device``/``dtype`` and put in eval mode (the user's model is left untouched).
        layout (ParamLayout): the trainable parameters, in flat order.
        fixed (dict[str, Tensor]): frozen parameters and buffers to use in every call.
        device, dtype: where and in which floating precision to evaluate.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        fixed: Dict[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.layout = layout
        self.fixed = dict(fixed)
        self.device = device
        self.dtype = dtype
        self._vmap_tangents_ok = True
        self._vmap_examples_ok = True
        # vmap support can differ between uses (a loss may not vmap where the model does)
        self._vmap_grads_ok: Dict[str, bool] = {}

    def set_fixed(self, fixed: Dict[str, torch.Tensor]) -> None:
        """Replace some frozen tensors (buffers that changed during training)."""
        self.fixed.update(fixed)

    # ------------------------------------------------------------------ inputs
    def prepare(self, x: Any) -> Any:
        """Move a (tuple of) input tensor(s) to the device; floating tensors take the dtype."""
        if isinstance(x, torch.Tensor):
            x = x.to(self.device)
            return x.to(self.dtype) if x.is_floating_point() else x
        if isinstance(x, tuple):
            return tuple(self.prepare(v) for v in x)
        if isinstance(x, list):
            return [self.prepare(v) for v in x]
        if isinstance(x, dict):
            return {k: self.prepare(v) for k, v in x.items()}
        return x

    def _call(self, flat: torch.Tensor, inputs: Tuple[Any, ...], args: Tuple[Any, ...]) -> torch.Tensor:
        params = self.layout.split(flat)
        params.update(self.fixed)
        out = functional_call(self.module, params, inputs + args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}; the forward function must return a tensor "
                "of outputs [n_inputs, ...] (wrap the model to select the output you want to explain)"
            )
        return out

    # ------------------------------------------------------------------ evaluations
    @torch.no_grad()
    def forward(self, flat: torch.Tensor, inputs: Tuple[Any, ...], args: Tuple[Any, ...] = ()) -> torch.Tensor:
        """``f(θ; inputs)``."""
        with functorch_friendly():
            return self._call(flat, inputs, args)

    def jvp(
        self, flat: torch.Tensor, tangents: torch.Tensor, inputs: Tuple[Any, ...], args: Tuple[Any, ...] = ()
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output and its directional derivatives ``J_f(θ) v`` for each row ``v`` of ``tangents``.

        Args:
            flat (Tensor): θ, shape [P].
            tangents (Tensor): [T, P].

        Returns:
            *tuple[Tensor, Tensor]*: ``f(θ)`` [n, ...] and ``J v`` [T, n, ...].
        """
        fn = lambda th: self._call(th, inputs, args)  # noqa: E731
        with functorch_friendly(), torch.no_grad():
            if tangents.shape[0] == 1:
                out, jv = jvp(fn, (flat,), (tangents[0],))
                return out, jv.unsqueeze(0)
            if self._vmap_tangents_ok:
                try:
                    out, jv = vmap(lambda v: jvp(fn, (flat,), (v,)), out_dims=(None, 0))(tangents)
                    return out, jv
                except Exception as err:  # model not vmappable: fall back to one jvp per tangent
                    self._vmap_tangents_ok = False
                    warnings.warn(
                        f"vmap over tangents failed ({type(err).__name__}: {err}); falling back to one "
                        "jvp per tangent (slower, same result)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            outs = [jvp(fn, (flat,), (v,)) for v in tangents]
            return outs[0][0], torch.stack([o[1] for o in outs])

    def _rowwise(self, one: Callable[..., torch.Tensor], thetas: torch.Tensor, inputs: Tuple[Any, ...],
                 args: Tuple[Any, ...]) -> torch.Tensor:
        """Apply ``one(theta_row, inputs_row, args_row)`` (batch of one) to every row."""
        n = thetas.shape[0]
        dx = tuple(0 if _is_batched(v, n) else None for v in inputs)
        da = tuple(0 if _is_batched(v, n) else None for v in args)

        def lift(th: torch.Tensor, x: Tuple[Any, ...], a: Tuple[Any, ...]) -> torch.Tensor:
            xb = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(x, dx))
            ab = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(a, da))
            return one(th, xb, ab)

        with functorch_friendly(), torch.no_grad():
            if self._vmap_examples_ok:
                try:
                    return vmap(lift, in_dims=(0, dx, da))(thetas, inputs, args)
                except Exception as err:
                    self._vmap_examples_ok = False
                    warnings.warn(
                        f"vmap over examples failed ({type(err).__name__}: {err}); falling back to a "
                        "per-example loop (slower, same result)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            outs = []
            for i in range(n):
                xi = tuple(v[i] if d == 0 else v for v, d in zip(inputs, dx))
                ai = tuple(v[i] if d == 0 else v for v, d in zip(args, da))
                outs.append(lift(thetas[i], xi, ai))
            return torch.stack(outs)

    def forward_rows(self, thetas: torch.Tensor, inputs: Tuple[Any, ...], args: Tuple[Any, ...] = ()) -> torch.Tensor:
        """``f(θ_i; x_i)`` with one parameter point per example: thetas [n, P] → [n, ...]."""
        return self._rowwise(lambda th, x, a: self._call(th, x, a)[0], thetas, inputs, args)

    def jvp_rows(self, thetas: torch.Tensor, tangents: torch.Tensor, inputs: Tuple[Any, ...],
                 args: Tuple[Any, ...] = ()) -> torch.Tensor:
        """``J_f(θ_i; x_i) v`` for each example i and tangent row v: → [n, T, ...]."""

        def one(th: torch.Tensor, x: Tuple[Any, ...], a: Tuple[Any, ...]) -> torch.Tensor:
            fn = lambda p: self._call(p, x, a)[0]  # noqa: E731
            if tangents.shape[0] == 1 or not self._vmap_tangents_ok:
                return torch.stack([jvp(fn, (th,), (v,))[1] for v in tangents])
            return vmap(lambda v: jvp(fn, (th,), (v,))[1])(tangents)

        return self._rowwise(one, thetas, inputs, args)

    def selected_grads(
        self,
        theta: torch.Tensor,
        inputs: Tuple[Any, ...],
        args: Tuple[Any, ...],
        select_one: Callable[[torch.Tensor, Any], torch.Tensor],
        select_args: torch.Tensor,
        purpose: str = "target",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients of a selected scalar output with respect to θ.

        Args:
            theta (Tensor): θ shared by all examples [P], or one point per example [n, P].
            select_one (Callable): ``select_one(output_of_one_example [1, ...], arg) -> scalar``.
            select_args (Tensor): one selection argument per example (dim 0 = examples).
            purpose (str): remembers separately for each purpose whether ``vmap`` works.

        Returns:
            *tuple[Tensor, Tensor]*: gradients [n, P] and the selected values [n].
        """
        n = _batch_size(inputs)
        per_row = theta.dim() == 2
        dx = tuple(0 if _is_batched(v, n) else None for v in inputs)
        da = tuple(0 if _is_batched(v, n) else None for v in args)

        def scalar(th: torch.Tensor, x: Tuple[Any, ...], a: Tuple[Any, ...], sa: Any) -> Tuple[torch.Tensor, torch.Tensor]:
            xb = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(x, dx))
            ab = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(a, da))
            val = select_one(self._call(th, xb, ab), sa)
            return val, val.detach()

        with functorch_friendly():
            if self._vmap_grads_ok.get(purpose, True):
                try:
                    g, val = vmap(grad(scalar, has_aux=True), in_dims=(0 if per_row else None, dx, da, 0))(
                        theta, inputs, args, select_args
                    )
                    return g, val
                except Exception as err:
                    self._vmap_grads_ok[purpose] = False
                    warnings.warn(
                        f"vmap over examples failed ({type(err).__name__}: {err}); falling back to a "
                        "per-example loop (slower, same result)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            grads, vals = [], []
            for i in range(n):
                xi = tuple(v[i : i + 1] if d == 0 else v for v, d in zip(inputs, dx))
                ai = tuple(v[i : i + 1] if d == 0 else v for v, d in zip(args, da))
                th = (theta[i] if per_row else theta).detach().requires_grad_(True)
                with torch.enable_grad():
                    val = select_one(self._call(th, xi, ai), select_args[i])
                    (gi,) = torch.autograd.grad(val, th, allow_unused=True)
                grads.append(torch.zeros_like(th) if gi is None else gi)
                vals.append(val.detach())
            return torch.stack(grads), torch.stack(vals)


def _batch_size(inputs: Sequence[Any]) -> int:
    for v in inputs:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("inputs must contain at least one tensor with a batch dimension")


def _is_batched(v: Any, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
