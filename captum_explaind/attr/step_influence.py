"""Training view: which training steps (windows of steps) moved a prediction."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Literal, Mapping, Optional, Sequence, Tuple, Union, overload

import torch
from captum.log import log_usage

from ..epk.results import ScoreResult
from ..epk.score_view import COMPONENTS, ScoreView, choose_method
from ..epk.selection import resolve_groups
from ..epk.target import TargetType
from ..epk.windows import StepsType, fixed_windows, parse_windows
from ._base import EPKAttribution, parse_components
from .parameter_influence import LayersType

__all__ = ["StepInfluence"]


class StepInfluence(EPKAttribution):
    r"""Exact influence of each training step (or window of steps) on a prediction.

    Window ``W`` collects ``Σ_{s∈W} Φ_s(x)_j · Δ_s`` — indexed by the step whose update is
    applied (the paper's indexing) — split into the kernel part (``Δ_s − R_s``) and the
    regularization part (``R_s``). Windows that partition the run add up to
    ``f_j(θ_N; x) − f_j(θ_0; x)`` up to the convergence delta. With ``layers=``, each window's
    score is further split over parameter groups: one call gives the kernel-versus-regularization
    balance over training (``component=["kernel", "regularization"]``) and the per-layer
    importance over training (``layers=...``; take ``.abs().sum(0)`` for the importance).

    Args:
        model (nn.Module): an instance of the trained architecture.
        trajectory (Trajectory or path): the recorded training run.
        options (EPKOptions or str, optional), output_fn (Callable, optional), **overrides: as
            for :class:`ParameterInfluence`.

    Cost: without ``layers``, per step ``nodes`` forward-mode passes carrying 2–3 tangents plus
    one forward pass (like :meth:`ExactPathKernel.reconstruct`). With ``layers``, either forward
    mode with ``groups × parts + 1`` tangents or, when that is more, ``nodes`` batched backward
    passes (per-example gradients) per step; memory ``n_inputs × P`` plus the results.

    Examples::

        >>> si = StepInfluence(model, trajectory)
        >>> per_window = si.attribute(x, target=y, window=10)              # [n, n_windows]
        >>> balance = si.attribute(x, target=y, window=10, component=["kernel", "regularization"])
        >>> per_layer = si.attribute(x, target=y, window=10, layers=["emb", "mlp", "head"])  # [n, W, 3]
    """

    def _windows(self, window: Union[int, Sequence[Union[int, range, slice]]], steps: StepsType) -> List[range]:
        N = self.epk.num_steps
        if isinstance(window, (list, tuple)):
            if steps is not None:
                raise ValueError("give either explicit windows or steps=..., not both")
            return parse_windows(list(window), N)[0]
        span, multi = parse_windows(steps, N)
        if multi:
            raise ValueError("steps must be one range or slice here; pass several windows as window=[...]")
        return fixed_windows(window, N, within=span[0])

    @log_usage()
    def explain(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        window: Union[int, Sequence[Union[int, range, slice]]] = 1,
        steps: StepsType = None,
        layers: LayersType = None,
        component: Union[str, Sequence[str]] = "total",
        method: str = "auto",
    ) -> ScoreResult:
        r"""Window scores as a self-describing result (windows, groups, components, delta, options).

        Args: as :meth:`attribute` (without ``aggregate`` and ``return_convergence_delta``).

        Returns:
            *ScoreResult*: ``scores[component]`` is ``[n_inputs, n_windows, n_groups]`` (one group
            ``"all"`` without ``layers``); ``result.windows`` the windows; ``result.plot()``.
        """
        comps, _ = parse_components(component, COMPONENTS)
        windows = self._windows(window, steps)
        batch, tgt = self._prepare(inputs, target, additional_forward_args)
        if layers is None:
            groups = OrderedDict([("all", list(self.epk.layout.names))])
        else:
            groups = resolve_groups(self.model, layers)
        chosen = choose_method(method, len(groups), len(comps))
        view = ScoreView(self.epk, batch.n, tgt, windows, comps, groups, chosen)
        return view.result(view.run(batch))

    @overload
    def attribute(self, inputs: Any, target: TargetType = ..., additional_forward_args: Any = ...,
                  window: Union[int, Sequence[Union[int, range, slice]]] = ..., steps: StepsType = ...,
                  layers: LayersType = ..., component: Union[str, Sequence[str]] = ...,
                  aggregate: Optional[str] = ..., *, return_convergence_delta: Literal[True],
                  method: str = ...) -> Tuple[Any, torch.Tensor]: ...

    @overload
    def attribute(self, inputs: Any, target: TargetType = ..., additional_forward_args: Any = ...,
                  window: Union[int, Sequence[Union[int, range, slice]]] = ..., steps: StepsType = ...,
                  layers: LayersType = ..., component: Union[str, Sequence[str]] = ...,
                  aggregate: Optional[str] = ..., return_convergence_delta: Literal[False] = ...,
                  method: str = ...) -> Any: ...

    @log_usage()
    def attribute(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        window: Union[int, Sequence[Union[int, range, slice]]] = 1,
        steps: StepsType = None,
        layers: LayersType = None,
        component: Union[str, Sequence[str]] = "total",
        aggregate: Optional[str] = None,
        return_convergence_delta: bool = False,
        method: str = "auto",
    ) -> Any:
        r"""Step (window) influence scores.

        Args:
            inputs (Tensor, tuple, Mapping or pytree): inputs, example axis first.
            target (optional): Captum's target; ``None`` sums over outputs. Default: None
            additional_forward_args (optional): extra model arguments. Default: None
            window (int or list, optional): an int ``k`` cuts the selected steps into consecutive
                windows of ``k`` steps (the last may be shorter); a list of ranges/slices/ints
                gives the windows explicitly. Default: 1 (every step its own window)
            steps (int, range or slice, optional): restrict to these application steps
                (1-based) before cutting windows. Default: all
            layers (optional): split each window's score over parameter groups (module objects,
                dotted names, globs, or a mapping name → selectors). Default: None
            component (str or list[str], optional): ``"kernel"``, ``"regularization"``,
                ``"total"``, or a list (a dict per component). Default: "total"
            aggregate (str, optional): ``"sum"`` or ``"abs_sum"`` over inputs. Default: None
            return_convergence_delta (bool, optional): also return, per input, the exact change
                of the target over all windows minus the sum of the scores and of the
                ``buffers`` component (BatchNorm running statistics; see :meth:`explain`).
            method (str, optional): ``"auto"``, ``"jvp"`` or ``"vjp"``. Default: "auto"

        Returns:
            *Tensor* (or dict per component) of **attributions** ``[n_inputs, n_windows]``, or
            ``[n_inputs, n_windows, n_groups]`` with ``layers`` (a dict of ``[n_inputs,
            n_windows]`` for a mapping); with ``return_convergence_delta``, also **delta**
            ``[n_inputs]``. :meth:`explain` gives the windows, options and statistics too.
        """
        if aggregate not in (None, "sum", "abs_sum"):
            raise ValueError(f"aggregate must be None, 'sum' or 'abs_sum', got {aggregate!r}")
        comps, single = parse_components(component, COMPONENTS)
        res = self.explain(inputs, target, additional_forward_args, window, steps, layers, component, method)
        self._note_buffers(res.buffers, res.change)
        out = {}
        for comp in comps:
            scores = res.scores[comp]  # [n, W, G]
            if layers is None:
                scores = scores[..., 0]
            if aggregate == "sum":
                scores = scores.sum(dim=0)
            elif aggregate == "abs_sum":
                scores = scores.abs().sum(dim=0)
            if layers is not None and isinstance(layers, Mapping):
                scores = {name: scores[..., g] for g, name in enumerate(res.groups or [])}
            out[comp] = scores
        result = out[comps[0]] if single else out
        if return_convergence_delta:
            return result, res.delta.sum(dim=1)
        return result
