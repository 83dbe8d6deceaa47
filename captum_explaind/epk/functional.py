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
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .._compat import functorch_friendly
from .affine import AffineParameters
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
        # None: not probed yet; then whether per-row points can use shared weights (see affine.py)
        self.affine_ok: Optional[bool] = None
        self.affine_reason = ""

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

    # ------------------------------------------------------------------ rows on one segment
    def _affine_call(self, base: Dict[str, torch.Tensor], delta: Dict[str, torch.Tensor], t: torch.Tensor,
                     inputs: Tuple[Any, ...], args: Tuple[Any, ...],
                     extra: Optional[Dict[str, torch.Tensor]] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        params = dict(base)
        params.update(self.fixed)
        with AffineParameters(base, delta, t, extra, scale) as mode:
            out = functional_call(self.module, params, inputs + args)
        if mode.unsupported is not None:
            raise _AffineUnsupported(mode.unsupported)
        return out

    def _segment_dicts(self, theta0: torch.Tensor, delta: torch.Tensor):
        return self.layout.split(theta0), self.layout.split(delta)

    def _rows_affine(self, one: Callable[..., torch.Tensor], t: torch.Tensor, inputs: Tuple[Any, ...],
                     args: Tuple[Any, ...], extra_in: Tuple[Any, ...] = (), extra_dims: Tuple[Any, ...] = ()) -> torch.Tensor:
        n = t.shape[0]
        dx = tuple(0 if _is_batched(v, n) else None for v in inputs)
        da = tuple(0 if _is_batched(v, n) else None for v in args)

        def lift(t_r: torch.Tensor, x: Tuple[Any, ...], a: Tuple[Any, ...], *rest: Any) -> torch.Tensor:
            xb = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(x, dx))
            ab = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(a, da))
            return one(t_r, xb, ab, *rest)

        return vmap(lift, in_dims=(0, dx, da) + extra_dims)(t, inputs, args, *extra_in)

    def _use_affine(self, theta0: torch.Tensor, delta: torch.Tensor, inputs: Tuple[Any, ...], args: Tuple[Any, ...]) -> bool:
        """Probe once whether the shared-weight evaluation is supported and agrees."""
        if self.affine_ok is not None:
            return self.affine_ok
        n = _batch_size(inputs)
        k = min(n, 3)
        rows = torch.arange(k, device=theta0.device)
        x = tuple(v.index_select(0, rows) if _is_batched(v, n) else v for v in inputs)
        a = tuple(v.index_select(0, rows) if _is_batched(v, n) else v for v in args)
        t = torch.tensor([0.25, 0.5, 1.0][:k], dtype=theta0.dtype, device=theta0.device)
        try:
            with functorch_friendly(), torch.no_grad():
                base, dd = self._segment_dicts(theta0, delta)
                fast = self._rows_affine(lambda t_r, xb, ab: self._affine_call(base, dd, t_r, xb, ab)[0], t, x, a)
                ref = self._rowwise(lambda th, xb, ab: self._call(th, xb, ab)[0],
                                    theta0.unsqueeze(0) + t.unsqueeze(1) * delta.unsqueeze(0), x, a)
            scale = float(ref.abs().max()) + 1.0
            diff = float((fast - ref).abs().max())
            self.affine_ok = diff <= 1e3 * torch.finfo(self.dtype).eps * scale
            self.affine_reason = "" if self.affine_ok else f"probe differs by {diff:.3g}"
        except _AffineUnsupported as err:
            self.affine_ok, self.affine_reason = False, str(err)
        except Exception as err:  # any failure: keep the generic path
            self.affine_ok, self.affine_reason = False, f"{type(err).__name__}: {err}"
        return self.affine_ok

    def forward_on_segment(self, theta0: torch.Tensor, delta: torch.Tensor, t: torch.Tensor,
                           inputs: Tuple[Any, ...], args: Tuple[Any, ...] = ()) -> torch.Tensor:
        """``f(θ_0 + t_i Δ; x_i)`` for one point per example: → [n, ...]."""
        if self._use_affine(theta0, delta, inputs, args):
            base, dd = self._segment_dicts(theta0, delta)
            with functorch_friendly(), torch.no_grad():
                return self._rows_affine(lambda t_r, xb, ab: self._affine_call(base, dd, t_r, xb, ab)[0], t, inputs, args)
        return self.forward_rows(theta0.unsqueeze(0) + t.unsqueeze(1) * delta.unsqueeze(0), inputs, args)

    def jvp_on_segment(self, theta0: torch.Tensor, delta: torch.Tensor, t: torch.Tensor, tangents: torch.Tensor,
                       inputs: Tuple[Any, ...], args: Tuple[Any, ...] = ()) -> torch.Tensor:
        """``J_f(θ_0 + t_i Δ; x_i) v`` for each example i and tangent row v: → [n, T, ...]."""
        if self._use_affine(theta0, delta, inputs, args):
            base, dd = self._segment_dicts(theta0, delta)
            tan = self.layout.split(tangents)  # name -> [T, *shape]
            eps0 = torch.zeros((), dtype=theta0.dtype, device=theta0.device)
            one_ = torch.ones((), dtype=theta0.dtype, device=theta0.device)

            def along(v: Dict[str, torch.Tensor]) -> torch.Tensor:
                # d/dε f(θ_0 + tΔ + εv): the direction is shared by all rows, only ε is dual
                def rows_fn(t_r: torch.Tensor, xb: Tuple[Any, ...], ab: Tuple[Any, ...]) -> torch.Tensor:
                    def f(eps: torch.Tensor) -> torch.Tensor:
                        return self._affine_call(base, dd, t_r, xb, ab, v, eps)[0]

                    return jvp(f, (eps0,), (one_,))[1]

                return self._rows_affine(rows_fn, t, inputs, args)

            with functorch_friendly(), torch.no_grad():
                if tangents.shape[0] == 1:
                    return along({k: v[0] for k, v in tan.items()}).unsqueeze(1)
                return vmap(along, out_dims=1)(tan)
        return self.jvp_rows(theta0.unsqueeze(0) + t.unsqueeze(1) * delta.unsqueeze(0), tangents, inputs, args)

    def grads_on_segment(self, theta0: torch.Tensor, delta: torch.Tensor, t: torch.Tensor, inputs: Tuple[Any, ...],
                         args: Tuple[Any, ...], select_one: Callable[[torch.Tensor, Any], torch.Tensor],
                         select_args: torch.Tensor, purpose: str = "target") -> torch.Tensor:
        """Per-example gradients at one point per example: → [n, P]."""
        if self._vmap_grads_ok.get(purpose, True) and self._use_affine(theta0, delta, inputs, args):
            base, dd = self._segment_dicts(theta0, delta)
            zeros = {k: torch.zeros_like(v) for k, v in base.items()}

            def one(t_r: torch.Tensor, xb: Tuple[Any, ...], ab: Tuple[Any, ...], sa: Any) -> torch.Tensor:
                def scalar(extra: Dict[str, torch.Tensor]) -> torch.Tensor:
                    return select_one(self._affine_call(base, dd, t_r, xb, ab, extra), sa)

                g = grad(scalar)(zeros)
                return torch.cat([g[k].reshape(-1) for k in self.layout.names])

            try:
                with functorch_friendly():
                    return self._rows_affine(one, t, inputs, args, (select_args,), (0,))
            except _AffineUnsupported:
                raise
            except Exception:
                pass  # fall through to the generic per-row path (it owns the loop fallback)
        thetas = theta0.unsqueeze(0) + t.unsqueeze(1) * delta.unsqueeze(0)
        return self.selected_grads(thetas, inputs, args, select_one, select_args, purpose)[0]

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


class _AffineUnsupported(RuntimeError):
    """A parameter reached an operation the shared-weight evaluation does not rewrite."""


def _batch_size(inputs: Sequence[Any]) -> int:
    for v in inputs:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("inputs must contain at least one tensor with a batch dimension")


def _is_batched(v: Any, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
