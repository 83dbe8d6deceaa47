"""A stateless, flat-parameter view of a model for ``torch.func`` transforms.

:class:`FunctionalModel` evaluates ``f(θ; batch)`` for a flat trainable-parameter vector θ (frozen
parameters and buffers come from the trajectory), its forward-mode derivative along one or
several tangents (``jvp``; no Jacobian is ever built), and per-example gradients of a selected
scalar (``vmap(grad)``, or a per-example loop for models ``vmap`` cannot handle — see
``per_sample`` in :class:`~captum_explaind.epk.options.EPKOptions`). Inputs are
:class:`~captum_explaind.epk.batch.Batch` objects; the explained tensor is
``output_fn(raw model output)``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .._compat import functorch_friendly
from .affine import AffineParameters, Combo, Extra
from .batch import Batch, batched_dims, lift_rows, take_rows
from .layout import ParamLayout
from .outputs import OutputFn, default_output_fn, explained_output

__all__ = ["FunctionalModel", "restrict_columns"]

#: (model class, "examples" | "tangents") for which ``vmap`` was found not to work
#: (``per_sample="auto"``), with the reason: the fallback is decided once per process and said once,
#: not on every call, explainer or purpose (what breaks ``vmap`` over examples — data-dependent
#: control flow on a batched mask — breaks it for every per-example use; tangents are separate).
_VMAP_FAILED: Dict[Tuple[type, str], str] = {}


def _vmap_key(kind: type, purpose: str) -> Tuple[type, str]:
    return (kind, "tangents" if purpose == "tangents" else "examples")

class FunctionalModel:
    """Evaluate a copy of ``model`` at arbitrary flat trainable parameters.

    Args:
        model (nn.Module): an instance of the trained architecture; it is deep-copied, moved to
            ``device``/``dtype`` and put in eval mode (the user's model is left untouched).
        layout (ParamLayout): the trainable parameters, in flat order.
        fixed (dict[str, Tensor]): frozen parameters and buffers to use in every call.
        device, dtype: where and in which floating precision to evaluate.
        output_fn (Callable, optional): raw model output → the explained tensor ``[n, ...]``.
            Default: :func:`~captum_explaind.epk.outputs.default_output_fn`
        per_sample (str, optional): ``"auto"``, ``"vmap"`` or ``"loop"`` for per-example
            evaluations. Default: "auto"
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        fixed: Dict[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        output_fn: OutputFn = default_output_fn,
        per_sample: str = "auto",
    ) -> None:
        self.module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.layout = layout
        self.fixed = dict(fixed)
        self.device = device
        self.dtype = dtype
        self.output_fn = output_fn
        self.per_sample = per_sample
        self._kind = type(model)
        # None: not probed yet; then whether per-row points can use shared weights (see affine.py)
        self.affine_ok: Optional[bool] = None
        self.affine_reason = ""
        # whether a rule's nodes as a batch inside each example failed (integrated_grads_on_segment)
        self.rule_failed = False

    def set_fixed(self, fixed: Dict[str, torch.Tensor]) -> None:
        """Replace some frozen tensors (buffers that changed during training)."""
        self.fixed.update(fixed)

    # ------------------------------------------------------------------ vmap or loop
    def use_vmap(self, purpose: str) -> bool:
        """Whether per-example work for ``purpose`` runs under ``vmap``."""
        if self.per_sample == "loop" and purpose != "tangents":
            return False
        return _vmap_key(self._kind, purpose) not in _VMAP_FAILED or (
            self.per_sample == "vmap" and purpose != "tangents")

    def vmap_failed(self, purpose: str, err: Exception) -> None:
        """Remember (and say once) that ``vmap`` does not work for ``purpose``; re-raise under
        ``per_sample="vmap"``, where falling back was not asked for."""
        if self.per_sample == "vmap" and purpose != "tangents":
            raise err
        key = _vmap_key(self._kind, purpose)
        if key not in _VMAP_FAILED:
            _VMAP_FAILED[key] = f"{purpose}: {type(err).__name__}: {err}"
            warnings.warn(
                f"vmap ({purpose}) does not work for {self._kind.__name__} ({type(err).__name__}: "
                f"{str(err)[:200]}); using a per-example loop from now on (slower, same result; "
                "per_sample='loop' skips the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ calls
    def _params(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        params = self.layout.split(flat)
        params.update(self.fixed)
        return params

    def raw(self, flat: torch.Tensor, batch: Batch) -> Any:
        """The model's raw output (tensor, tuple, ``ModelOutput``) at θ = ``flat``."""
        return batch.call(self.module, self._params(flat))

    def explain(self, raw: Any, n: int) -> torch.Tensor:
        """``output_fn(raw)``, checked to be ``[n, ...]``."""
        return explained_output(self.output_fn, raw, n)

    def _call(self, flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.explain(self.raw(flat, batch), batch.n)

    # ------------------------------------------------------------------ evaluations
    @torch.no_grad()
    def forward(self, flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``f(θ; batch)``: the explained output."""
        with functorch_friendly():
            return self._call(flat, batch)

    def jvp(self, flat: torch.Tensor, tangents: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output and its directional derivatives ``J_f(θ) v`` for each row ``v`` of ``tangents``.

        Args:
            flat (Tensor): θ, shape [P].
            tangents (Tensor): [T, P].
            batch (Batch): the inputs.

        Returns:
            *tuple[Tensor, Tensor]*: ``f(θ)`` [n, ...] and ``J v`` [T, n, ...].
        """
        fn = lambda th: self._call(th, batch)  # noqa: E731
        with functorch_friendly(), torch.no_grad():
            if tangents.shape[0] == 1:
                # jvp is typed as returning 2 or 3 values (3 with has_aux=True); here it is 2
                res = jvp(fn, (flat,), (tangents[0],))
                return res[0], res[1].unsqueeze(0)
            if self.use_vmap("tangents"):
                try:
                    # out_dims entries may be None (output not batched); torch's out_dims_t annotation omits that
                    vmapped = vmap(lambda v: jvp(fn, (flat,), (v,)), out_dims=(None, 0))  # type: ignore[arg-type]
                    res = vmapped(tangents)
                    return res[0], res[1]
                except Exception as err:  # model not vmappable: one jvp per tangent
                    self.vmap_failed("tangents", err)
            outs = [jvp(fn, (flat,), (v,)) for v in tangents]
            return outs[0][0], torch.stack([o[1] for o in outs])

    def _rowwise(self, one: Callable[..., torch.Tensor], thetas: torch.Tensor, batch: Batch,
                 purpose: str = "rows") -> torch.Tensor:
        """Apply ``one(theta_row, batch_of_one)`` to every example (its own parameter point)."""
        with functorch_friendly(), torch.no_grad():
            if self.use_vmap(purpose):
                try:
                    return vmap(batch.per_row(lambda b, th: one(th, b)), in_dims=batch.dims + (0,))(
                        batch.args, batch.kwargs, thetas)
                except Exception as err:
                    self.vmap_failed(purpose, err)
            return torch.stack([one(thetas[i], batch.row(i)) for i in range(batch.n)])

    def forward_rows(self, thetas: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``f(θ_i; x_i)`` with one parameter point per example: thetas [n, P] → [n, ...]."""
        return self._rowwise(lambda th, b: self._call(th, b)[0], thetas, batch)

    def jvp_rows(self, thetas: torch.Tensor, tangents: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``J_f(θ_i; x_i) v`` for each example i and tangent row v: → [n, T, ...]."""
        vmap_tangents = self.use_vmap("tangents")

        def one(th: torch.Tensor, b: Batch) -> torch.Tensor:
            fn = lambda p: self._call(p, b)[0]  # noqa: E731
            if tangents.shape[0] == 1 or not vmap_tangents:
                return torch.stack([jvp(fn, (th,), (v,))[1] for v in tangents])
            return vmap(lambda v: jvp(fn, (th,), (v,))[1])(tangents)

        return self._rowwise(one, thetas, batch)

    # ------------------------------------------------------------------ rows on one segment
    def _affine_raw(self, base: Dict[str, torch.Tensor], delta: Dict[str, torch.Tensor], t: torch.Tensor,
                    batch: Batch, extra: Optional[Dict[str, Extra]] = None, scale: Optional[torch.Tensor] = None
                    ) -> Any:
        params = dict(base)
        params.update(self.fixed)
        with AffineParameters(base, delta, t, extra, scale) as mode:
            out = batch.call(self.module, params)
        if mode.unsupported is not None:
            raise _AffineUnsupported(mode.unsupported)
        return out

    def _affine_call(self, base: Dict[str, torch.Tensor], delta: Dict[str, torch.Tensor], t: torch.Tensor,
                     batch: Batch, extra: Optional[Dict[str, Extra]] = None) -> torch.Tensor:
        return self.explain(self._affine_raw(base, delta, t, batch, extra), batch.n)

    def _rows_affine(self, one: Callable[..., torch.Tensor], t: torch.Tensor, batch: Batch,
                     extra_in: Tuple[Any, ...] = (), extra_dims: Tuple[Any, ...] = ()) -> torch.Tensor:
        """``vmap`` of ``one(t_row, batch_of_one, *extra_row)`` over examples."""
        return vmap(batch.per_row(lambda b, t_r, *rest: one(t_r, b, *rest)),
                    in_dims=batch.dims + (0,) + extra_dims)(batch.args, batch.kwargs, t, *extra_in)

    def _use_affine(self, theta0: torch.Tensor, delta: torch.Tensor, batch: Batch) -> bool:
        """Probe once whether the shared-weight evaluation is supported and agrees."""
        if self.affine_ok is not None:
            return self.affine_ok
        if not self.use_vmap("rows"):
            self.affine_ok, self.affine_reason = False, "vmap over examples is off"
            return False
        k = min(batch.n, 3)
        probe = batch.rows(torch.arange(k))
        t = torch.tensor([0.25, 0.5, 1.0][:k], dtype=theta0.dtype, device=theta0.device)
        try:
            with functorch_friendly(), torch.no_grad():
                base, dd = self.layout.split(theta0), self.layout.split(delta)
                fast = self._rows_affine(lambda t_r, b: self._affine_call(base, dd, t_r, b)[0], t, probe)
                ref = torch.stack([self._call(theta0 + t[i] * delta, probe.row(i))[0] for i in range(k)])
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
                           batch: Batch) -> torch.Tensor:
        """``f(θ_0 + t_i Δ; x_i)`` for one point per example: → [n, ...]."""
        if self._use_affine(theta0, delta, batch):
            base, dd = self.layout.split(theta0), self.layout.split(delta)
            with functorch_friendly(), torch.no_grad():
                return self._rows_affine(lambda t_r, b: self._affine_call(base, dd, t_r, b)[0], t, batch)
        return self.forward_rows(theta0.unsqueeze(0) + t.unsqueeze(1) * delta.unsqueeze(0), batch)

    def jvp_on_segment(self, theta0: torch.Tensor, delta: torch.Tensor, t: torch.Tensor, tangents: torch.Tensor,
                       batch: Batch) -> torch.Tensor:
        """``J_f(θ_0 + t_i Δ; x_i) v`` for each example i and tangent row v: → [n, T, ...]."""
        if not self._use_affine(theta0, delta, batch):
            return self.jvp_rows(theta0.unsqueeze(0) + t.unsqueeze(1) * delta.unsqueeze(0), tangents, batch)
        base, dd = self.layout.split(theta0), self.layout.split(delta)
        tan = self.layout.split(tangents)  # name -> [T, *shape]
        eps0 = torch.zeros((), dtype=theta0.dtype, device=theta0.device)
        one_ = torch.ones((), dtype=theta0.dtype, device=theta0.device)

        def along(v: Dict[str, torch.Tensor]) -> torch.Tensor:
            # d/dε f(θ_0 + tΔ + εv): the direction is shared by all rows, only ε is dual
            def rows_fn(t_r: torch.Tensor, b: Batch) -> torch.Tensor:
                def f(eps: torch.Tensor) -> torch.Tensor:
                    extra: Dict[str, Extra] = {k: Combo(eps.reshape(1), vk.unsqueeze(0)) for k, vk in v.items()}
                    return self._affine_call(base, dd, t_r, b, extra)[0]

                return jvp(f, (eps0,), (one_,))[1]

            return self._rows_affine(rows_fn, t, batch)

        with functorch_friendly(), torch.no_grad():
            if tangents.shape[0] == 1:
                return along({k: v[0] for k, v in tan.items()}).unsqueeze(1)
            return vmap(along, out_dims=1)(tan)

    def grads_on_segment(self, theta0: torch.Tensor, delta: torch.Tensor, t: torch.Tensor, batch: Batch,
                         scalar: Callable[[Any, Any], torch.Tensor], extra: Any,
                         purpose: str = "target", project: Optional[torch.Tensor] = None,
                         columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example gradients at one point per example: → [n, P] (or [n, K] projected).

        ``scalar(raw_output_of_one, extra_row)`` is differentiated (see :meth:`selected_grads`).
        ``project`` ([P, K], optional): return ``grads @ project`` instead — on the shared-weight
        path each parameter's gradient is projected as it comes, never concatenated to [n, P].
        ``columns`` (ascending indices into P, optional; not with ``project``): return the
        gradients' entries there and, as the last column, ``grads @ delta`` → [n, |columns| + 1]
        (a view restricted to a few layers holds only those, yet checks the whole step).
        """
        if self.use_vmap(purpose) and self._use_affine(theta0, delta, batch):
            base, dd = self.layout.split(theta0), self.layout.split(delta)
            zeros = {k: torch.zeros_like(v) for k, v in base.items()}
            ed = batched_dims(extra, batch.n)
            dirs = None if project is None else self._directions(project)
            n_proj = 0 if project is None else project.shape[1]
            local = None if columns is None else self._local_columns(columns)

            def one(t_r: torch.Tensor, b: Batch, e: Any) -> torch.Tensor:
                e = lift_rows(e, ed)
                if local is not None:
                    return self._columns_one(base, dd, t_r, b, e, scalar, local)
                if dirs is not None:
                    return self._projected_one(base, dd, t_r, b, e, scalar, dirs, n_proj)
                g = grad(lambda ex: scalar(self._affine_raw(base, dd, t_r, b, ex), e))(zeros)
                return torch.cat([g[k].reshape(-1) for k in self.layout.names])

            try:
                with functorch_friendly():
                    return self._rows_affine(one, t, batch, (extra,), (ed,))
            except _AffineUnsupported:
                raise
            except Exception:
                pass  # fall through to the generic per-row path (it owns the loop fallback)
        # one shared point (the rule's nodes): one θ, not one parameter vector per row
        shared = len(t) > 0 and bool((t == t[0]).all())
        thetas = theta0 + t[0] * delta if shared else theta0.unsqueeze(0) + t.unsqueeze(1) * delta.unsqueeze(0)
        grads = self.selected_grads(thetas, batch, scalar, extra, purpose)[0]
        if columns is not None:
            return restrict_columns(grads, columns, delta)
        return grads if project is None else grads @ project

    def integrated_grads_on_segment(self, theta0: torch.Tensor, delta: torch.Tensor, t: torch.Tensor,
                                    w: torch.Tensor, batch: Batch, scalar: Callable[[Any, Any], torch.Tensor],
                                    extra: Any, purpose: str = "target"
                                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """A quadrature rule's weighted sum of per-example gradients, never one per node.

        For example i with nodes ``t[i, j]`` and weights ``w[i, j]`` on the segment, the gradient by
        a shared ε of ``Σ_j f(θ_0 + t_ij Δ + w_ij ε; x_i)`` is ``Σ_j w_ij ∇f(θ(t_ij); x_i)``, and its
        derivative by ``t_ij`` is the node's ``∇f(θ(t_ij); x_i) · Δ``. On the shared-weight path
        (:mod:`.affine`) the nodes are a batch inside each example's evaluation, so each weight's
        gradient is one product over the nodes (``Σ_j δ_ij a_ijᵀ``): a per-example parameter-sized
        array is written once per rule, not once per node and then summed.

        Args:
            theta0, delta (Tensor): the segment, [P] each.
            t, w (Tensor): nodes and weights per example, [n, K] each.
            batch (Batch): the examples.
            scalar, extra, purpose: as in :meth:`selected_grads`.

        Returns:
            *tuple[Tensor, Tensor]* or None: the integrated gradients [n, P] and the nodes'
            derivatives along Δ [n, K]; None where the shared-weight path is not available (the
            caller evaluates node by node).
        """
        if self.rule_failed or not (self.use_vmap(purpose) and self._use_affine(theta0, delta, batch)):
            return None
        base, dd = self.layout.split(theta0), self.layout.split(delta)
        zeros: Dict[str, Extra] = {k: torch.zeros_like(v) for k, v in base.items()}
        ed = batched_dims(extra, batch.n)

        def one(b: Batch, e: Any, t_r: torch.Tensor, w_r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            e = lift_rows(e, ed)

            def total(ex: Dict[str, Extra], t_nodes: torch.Tensor) -> torch.Tensor:
                at = vmap(lambda t_j, w_j: scalar(self._affine_raw(base, dd, t_j, b, ex, w_j), e))
                return at(t_nodes, w_r).sum()

            g, g_t = grad(total, argnums=(0, 1))(zeros, t_r)
            return torch.cat([g[k].reshape(-1) for k in self.layout.names]), g_t

        dt = delta.dtype
        try:
            with functorch_friendly():
                return vmap(batch.per_row(one), in_dims=batch.dims + (ed, 0, 0))(
                    batch.args, batch.kwargs, extra, t.to(dt), w.to(dt))
        except _AffineUnsupported:
            raise
        except Exception:
            self.rule_failed = True  # node by node from now on (that path owns the loop fallback)
            return None

    def _columns_one(self, base: Dict[str, torch.Tensor], dd: Dict[str, torch.Tensor], t_r: torch.Tensor, b: Batch,
                     e: Any, scalar: Callable[[Any, Any], torch.Tensor],
                     local: List[Tuple[str, Optional[torch.Tensor]]]) -> torch.Tensor:
        """One row of :meth:`grads_on_segment` with ``columns``: the gradient of the parameters
        holding a column, and ``∇f · Δ`` — the rest of it as the derivative along ``ε Δ_k`` on the
        other parameters, so their (parameter-sized, per-row) gradients are never formed."""
        sel = {k for k, _ in local}
        rest = [k for k in self.layout.names if k not in sel]

        def f(ex: Dict[str, torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
            # ε scales the rest's Δ-terms after their operation (ε · linear(x, Δ_k)), so its
            # gradient is a sum over activations, never a per-row weight gradient
            extra: Dict[str, Extra] = dict(ex)
            extra.update({k: Combo(eps.reshape(1), dd[k].unsqueeze(0)) for k in rest})
            return scalar(self._affine_raw(base, dd, t_r, b, extra), e)

        eps0 = torch.zeros((), dtype=t_r.dtype, device=t_r.device)
        g, g_eps = grad(f, argnums=(0, 1))({k: torch.zeros_like(base[k]) for k in sel}, eps0)
        check = g_eps + sum((g[k] * dd[k]).sum() for k in sel)
        kept = [g[k].reshape(-1) if c is None else g[k].reshape(-1)[c] for k, c in local]
        return torch.cat(kept + [check.reshape(1)])

    def _directions(self, project: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """``project`` [P, K] per parameter: (which of the K columns touch it, those columns as
        directions [k, *shape]); parameters no column touches are left out."""
        out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        for k, shape in zip(self.layout.names, self.layout.shapes):
            block = project[self.layout.slice(k)].T  # [K, numel]
            nz = (block != 0).any(dim=1).nonzero().reshape(-1)
            if nz.numel():
                out[k] = (nz, block.index_select(0, nz).reshape(len(nz), *shape))
        return out

    def _projected_one(self, base: Dict[str, torch.Tensor], dd: Dict[str, torch.Tensor], t_r: torch.Tensor,
                       b: Batch, e: Any, scalar: Callable[[Any, Any], torch.Tensor],
                       dirs: Dict[str, Tuple[torch.Tensor, torch.Tensor]], K: int) -> torch.Tensor:
        """One row of :meth:`grads_on_segment` with ``project``: ``∇f · project`` [K] as the
        gradient by ε of ``f(θ(t) + Σ_j ε_j project[:, j])`` — each direction applied through the
        operations as a shared weight, so no per-row parameter-sized gradient is formed."""
        def f(eps: torch.Tensor) -> torch.Tensor:
            extra: Dict[str, Extra] = {k: Combo(eps.index_select(0, nz), d) for k, (nz, d) in dirs.items()}
            return scalar(self._affine_raw(base, dd, t_r, b, extra), e)

        return grad(f)(torch.zeros(K, dtype=t_r.dtype, device=t_r.device))

    def _local_columns(self, columns: torch.Tensor) -> List[Tuple[str, Optional[torch.Tensor]]]:
        """``columns`` (ascending, into P) per parameter: (name, local indices, or None for all of
        it), parameters without a selected entry left out — in the layout's (ascending) order."""
        out: List[Tuple[str, Optional[torch.Tensor]]] = []
        for k in self.layout.names:
            sl = self.layout.slice(k)
            inside = columns[(columns >= sl.start) & (columns < sl.stop)] - sl.start
            if inside.numel() == sl.stop - sl.start:
                out.append((k, None))
            elif inside.numel():
                out.append((k, inside))
        return out

    def selected_grads(
        self,
        theta: torch.Tensor,
        batch: Batch,
        scalar: Callable[[Any, Any], torch.Tensor],
        extra: Any,
        purpose: str = "target",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients of a scalar of each example's *raw* output with respect to θ.

        Args:
            theta (Tensor): θ shared by all examples [P], or one point per example [n, P].
            batch (Batch): the examples.
            scalar (Callable): ``scalar(raw_output_of_one_example, extra_of_that_example)`` → a
                0-dim tensor (the example's batch axis has length 1 in both).
            extra: a pytree with the example axis first (a target index tensor, labels, a
                collated Mapping), sliced like the batch.
            purpose (str): remembers separately for each purpose whether ``vmap`` works.

        Returns:
            *tuple[Tensor, Tensor]*: gradients [n, P] and the scalars [n].
        """
        n = batch.n
        per_row = theta.dim() == 2
        ed = batched_dims(extra, n)

        def value(th: torch.Tensor, b: Batch, e: Any) -> Tuple[torch.Tensor, torch.Tensor]:
            val = scalar(self.raw(th, b), e)
            return val, val.detach()

        with functorch_friendly():
            if self.use_vmap(purpose):
                try:
                    fn = batch.per_row(lambda b, th, e: grad(value, has_aux=True)(th, b, lift_rows(e, ed)))
                    return vmap(fn, in_dims=batch.dims + (0 if per_row else None, ed))(
                        batch.args, batch.kwargs, theta, extra)
                except Exception as err:
                    self.vmap_failed(purpose, err)
            return self._grads_loop(theta, batch, value, extra)

    def param_grads(self, theta: torch.Tensor, batch: Batch, scalar: Callable[[Any, Any], torch.Tensor],
                    extra: Any, purpose: str = "loss") -> Optional[Dict[str, torch.Tensor]]:
        """:meth:`selected_grads` per trainable parameter, never concatenated to ``[n, P]``.

        Returns:
            *dict[str, Tensor]* or None: ``name → [n, numel]`` in the layout's order (θ shared by
            all examples, [P]); None where ``vmap`` is off for ``purpose`` (the caller then uses
            :meth:`selected_grads`, which owns the per-example loop).
        """
        if not self.use_vmap(purpose):
            return None
        params = self.layout.split(theta)
        ed = batched_dims(extra, batch.n)

        def value(p: Dict[str, torch.Tensor], b: Batch, e: Any) -> torch.Tensor:
            full = dict(p)
            full.update(self.fixed)
            return scalar(b.call(self.module, full), e)

        fn = batch.per_row(lambda b, e: grad(value)(params, b, lift_rows(e, ed)))
        try:
            with functorch_friendly():
                g = vmap(fn, in_dims=batch.dims + (ed,))(batch.args, batch.kwargs, extra)
        except Exception as err:
            self.vmap_failed(purpose, err)
            return None
        return {k: g[k].reshape(batch.n, -1) for k in self.layout.names}

    def _grads_loop(self, theta: torch.Tensor, batch: Batch, value: Callable[..., Tuple[torch.Tensor, torch.Tensor]],
                    extra: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`selected_grads` one example at a time (models ``vmap`` cannot handle)."""
        grads, vals = [], []
        for i in range(batch.n):
            rows = torch.tensor([i])
            th = (theta[i] if theta.dim() == 2 else theta).detach().requires_grad_(True)
            with torch.enable_grad():
                val, _ = value(th, batch.row(i), take_rows(extra, rows, batch.n))
                (gi,) = torch.autograd.grad(val, th, allow_unused=True)
            grads.append(torch.zeros_like(th) if gi is None else gi)
            vals.append(val.detach())
        return torch.stack(grads), torch.stack(vals)


def restrict_columns(grads: torch.Tensor, columns: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Gradients [n, P] → their entries at ``columns`` and, last, ``grads @ delta``: [n, |columns| + 1]."""
    return torch.cat([grads.index_select(1, columns), (grads @ delta).unsqueeze(1)], dim=1)


class _AffineUnsupported(RuntimeError):
    """A parameter reached an operation the shared-weight evaluation does not rewrite."""
