"""Model view: which parameters or layers moved a prediction (ExPLAIND's parameter influence)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union, overload

import torch
from captum.log import log_usage
from torch import nn

from ..epk.results import ScoreResult
from ..epk.score_view import COMPONENTS, ScoreView, choose_method
from ..epk.selection import Selector, resolve_groups, resolve_parameters
from ..epk.target import TargetType
from ..epk.windows import StepsType, is_window_list, parse_windows
from ._base import EPKAttribution, parse_components

__all__ = ["ParameterInfluence"]

LayersType = Union[None, Selector, Sequence[Selector], Mapping[str, Any]]


class ParameterInfluence(EPKAttribution):
    r"""Exact influence of every parameter (or layer) on a prediction, over training.

    For input x and target output j, parameter element p collects

    .. math:: Ψ_p(x) = \sum_{s} Φ_s(x)_{j,p} \, (Δ_s)_p

    split into its kernel part (``Δ_s − R_s``: gradient-driven) and its regularization part
    (``R_s``: weight decay). Scores are signed contributions to the output — positive pushed the
    target output up — and they add up exactly: ``Σ_p Ψ_p(x) + buffers + delta = f_j(θ_N; x) −
    f_j(θ_0; x)``, with ``delta`` the quadrature error (the convergence delta) and ``buffers`` the
    change caused by buffers that moved without gradients (BatchNorm running statistics; zero for
    models without them), reported by :meth:`explain`.

    Args:
        model (nn.Module): an instance of the trained architecture (Captum's ``forward_func``);
            its weights are not used, the trajectory supplies them.
        trajectory (Trajectory or path): the recorded training run.
        options (EPKOptions or str, optional): how to compute, or a preset name (``"exact"``,
            ``"balanced"``, ``"fast"``). Default: "exact"
        output_fn (Callable, optional): raw model output → explained tensor. Default: a tensor
            as is, ``.logits`` of a ``ModelOutput``, a tuple's first element.
        **overrides: individual options (``nodes``, ``rtol``, ``dtype``, ``batch_size``, ...).

    Cost: per-parameter scores take, per step, ``nodes`` batched backward passes over the inputs
    (per-example gradients via ``torch.func.vmap(grad)``, with a loop fallback) and one forward
    pass; memory ``n_inputs × P`` for the running sums. Layer scores with a few groups use
    forward mode instead (``nodes`` forward passes carrying ``groups × parts + 1`` tangents).

    Examples::

        >>> pi = ParameterInfluence(model, trajectory, dtype=torch.float64)
        >>> scores, delta = pi.attribute(x, target=3, return_convergence_delta=True)
        >>> scores["fc1.weight"].shape          # [n_inputs, *fc1.weight.shape]
        >>> per_layer = pi.attribute(x, target=3, layers=[model.fc1, "fc2"])   # [n_inputs, 2]
    """

    @log_usage()
    def explain(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        steps: StepsType = None,
        layers: LayersType = None,
        component: Union[str, Sequence[str]] = "total",
        method: str = "auto",
    ) -> ScoreResult:
        r"""Parameter (or layer) scores as a self-describing result.

        Args: as :meth:`attribute` (without ``aggregate`` and ``return_convergence_delta``).

        Returns:
            *ScoreResult*: scores per component with their window and group axes, the exact
            change and the delta per window, the options used and the sweep statistics.
        """
        comps, _ = parse_components(component, COMPONENTS)
        batch, tgt = self._prepare(inputs, target, additional_forward_args)
        windows, _ = parse_windows(steps, self.epk.num_steps)
        groups = None if layers is None else resolve_groups(self.model, layers)
        chosen = choose_method(method, None if groups is None else len(groups), len(comps))
        view = ScoreView(self.epk, batch.n, tgt, windows, comps, groups, chosen)
        return view.result(view.run(batch))

    @overload
    def attribute(self, inputs: Any, target: TargetType = ..., additional_forward_args: Any = ...,
                  steps: StepsType = ..., layers: LayersType = ..., component: Union[str, Sequence[str]] = ...,
                  aggregate: Optional[str] = ..., *, return_convergence_delta: Literal[True],
                  method: str = ...) -> Tuple[Any, torch.Tensor]: ...

    @overload
    def attribute(self, inputs: Any, target: TargetType = ..., additional_forward_args: Any = ...,
                  steps: StepsType = ..., layers: LayersType = ..., component: Union[str, Sequence[str]] = ...,
                  aggregate: Optional[str] = ..., return_convergence_delta: Literal[False] = ...,
                  method: str = ...) -> Any: ...

    @log_usage()
    def attribute(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        steps: StepsType = None,
        layers: LayersType = None,
        component: Union[str, Sequence[str]] = "total",
        aggregate: Optional[str] = None,
        return_convergence_delta: bool = False,
        method: str = "auto",
    ) -> Any:
        r"""Parameter (or layer) influence scores.

        Args:
            inputs (Tensor, tuple, Mapping or pytree): inputs, example axis first; a Mapping
                (``BatchEncoding``) is passed to the model by keyword.
            target (int, tuple, Tensor, list, optional): Captum's target on the explained output
                (``output_fn``); ``None`` sums over outputs. Default: None
            additional_forward_args (optional): extra arguments passed to the model after the
                inputs. Default: None
            steps (int, range, slice or list, optional): application steps to sum over (1-based);
                a list of windows adds a window axis after the input axis. Default: all steps
            layers (optional): group parameters by module object, dotted name or glob; a list
                gives one score per entry (``[n_inputs, n_groups]``), a mapping ``name →
                selector(s)`` gives a dict of ``[n_inputs]`` tensors. ``None``: per-parameter
                scores, a dict ``name → [n_inputs, *shape]`` of the trainable parameters.
            component (str or list[str], optional): ``"kernel"`` (Φ·(Δ−R)),
                ``"regularization"`` (Φ·R) or ``"total"``; a list returns a dict per component.
                Default: "total"
            aggregate (str, optional): ``"sum"`` sums over inputs; ``"abs_sum"`` is the paper's
                importance (eq. 6): absolute value after the sum over steps and outputs, then
                summed over inputs. Default: None
            return_convergence_delta (bool, optional): also return ``f(θ_b) − f(θ_{a−1}) − Σ
                scores − buffers`` per input (per window) for the target, the quadrature error;
                ``buffers`` (the output change caused by BatchNorm running statistics, no
                parameter's score) is in :meth:`explain`'s result and noted by a warning when
                it is not zero. Default: False
            method (str, optional): ``"auto"``, ``"vjp"`` or ``"jvp"`` (layers only). Default: "auto"

        Returns:
            *dict* or *Tensor* of **attributions**, or ``(attributions, delta)``:
            - **attributions**: see ``layers``/``component``/``aggregate``.
            - **delta** (*Tensor*): ``[n_inputs]`` (``[n_inputs, n_windows]`` with a window list).
            :meth:`explain` returns the same scores with their axes, options and statistics.
        """
        if aggregate not in (None, "sum", "abs_sum"):
            raise ValueError(f"aggregate must be None, 'sum' or 'abs_sum', got {aggregate!r}")
        comps, single = parse_components(component, COMPONENTS)
        multi = is_window_list(steps)
        res = self.explain(inputs, target, additional_forward_args, steps, layers, component, method)
        self._note_buffers(res.buffers, res.change)
        return self._formatted(res, comps, single, multi, layers, aggregate, return_convergence_delta)

    def _formatted(self, res: ScoreResult, comps: List[str], single: bool, multi: bool, layers: LayersType,
                   aggregate: Optional[str], return_convergence_delta: bool) -> Any:
        groups = None
        if res.groups is not None:
            assert layers is not None  # explain() has groups exactly when layers are given
            groups = resolve_groups(self.model, layers)
        out = {}
        for comp in comps:
            scores = res.scores[comp]  # [n, W, P or G]
            if not multi:
                scores = scores[:, 0]
            scores = _aggregate(scores, aggregate)
            out[comp] = self._format(scores, groups, layers, multi, aggregate is not None)
        result = out[comps[0]] if single else out
        if return_convergence_delta:
            return result, (res.delta if multi else res.delta[:, 0])
        return result

    def _format(self, scores: torch.Tensor, groups: Optional["OrderedDict[str, List[str]]"], layers: Any,
                multi: bool, aggregated: bool) -> Any:
        if groups is not None:
            if isinstance(layers, Mapping):
                return {name: scores[..., g] for g, name in enumerate(groups)}
            return scores
        layout = self.epk.layout
        out = {}
        for name in layout.names:
            piece = scores[..., layout.slice(name)]
            out[name] = piece.reshape(*piece.shape[:-1], *layout.shapes[layout.names.index(name)])
        return out

    @log_usage()
    def regularization_influence(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        steps: StepsType = None,
        layers: LayersType = None,
        aggregate: Optional[str] = "sum",
    ) -> Any:
        r"""The paper's regularization influence D (Def. 4.3) per parameter set.

        For each input and parameter element p, with ``Ψ_p`` the kernel and ``Ψ^reg_p`` the
        regularization score (summed over the selected steps and the target), a group G gets
        ``D_G = Σ_{p∈G} (|Ψ_p| − |Ψ^reg_p|)``: positive where the gradient-driven part dominates,
        negative where weight decay does.

        Args:
            inputs, target, additional_forward_args, steps: as in :meth:`attribute`.
            layers (optional): groups as in :meth:`attribute`; ``None`` gives one value per
                parameter tensor (a dict).
            aggregate (str, optional): ``"sum"`` over inputs or ``None``. Default: "sum"

        Returns:
            *Tensor* ``[n_inputs, n_groups]`` / ``[n_groups]``, or a dict of them.
        """
        if aggregate not in (None, "sum"):
            raise ValueError(f"aggregate must be None or 'sum', got {aggregate!r}")
        batch, tgt = self._prepare(inputs, target, additional_forward_args)
        windows, multi = parse_windows(steps, self.epk.num_steps)
        view = ScoreView(self.epk, batch.n, tgt, windows, ["kernel", "regularization"], None, "vjp")
        view.run(batch)
        d = view.acc[:, :, 0].abs() - view.acc[:, :, 1].abs()  # [n, W, P]
        if not multi:
            d = d[:, 0]
        if aggregate == "sum":
            d = d.sum(dim=0)
        layout = self.epk.layout
        if layers is None:
            return {name: d[..., layout.slice(name)].sum(-1) for name in layout.names}
        groups = resolve_groups(self.model, layers)
        masks = torch.stack(
            [
                layout.mask([p for p in names if p in layout], dtype=d.dtype, device=d.device)
                for names in groups.values()
            ]
        )
        vals = d @ masks.T
        if isinstance(layers, Mapping):
            return {name: vals[..., g] for g, name in enumerate(groups)}
        return vals

    @log_usage()
    def pruning_scores(
        self,
        inputs: Any,
        target: TargetType = None,
        additional_forward_args: Any = None,
        steps: StepsType = None,
        parameters: Union[None, Selector, Sequence[Selector]] = None,
        component: str = "total",
        model: Optional[nn.Module] = None,
    ) -> Dict[Tuple[nn.Module, str], torch.Tensor]:
        r"""Importance scores in the form ``torch.nn.utils.prune.global_unstructured`` takes.

        The importance of each parameter element is the paper's eq. 6: the absolute value of its
        score (summed over steps and the target's outputs), summed over ``inputs``.

        Args:
            inputs, target, additional_forward_args, steps, component: as in :meth:`attribute`.
            parameters (optional): which parameters (names, modules, globs); default all trainable.
            model (nn.Module, optional): the module the keys refer to — e.g. a copy holding the
                trained weights (:func:`captum_explaind.pruning.model_at`); same parameter names
                as the explainer's model. Default: the explainer's model

        Returns:
            *dict[tuple[nn.Module, str], Tensor]*: ``{(module, "weight"): importance, ...}``,
            on the model's device and in its dtype, ready for::

                prune.global_unstructured(list(scores), pruning_method=prune.L1Unstructured,
                                          importance_scores=scores, amount=0.5)
        """
        comps, single = parse_components(component, COMPONENTS)
        res = self.explain(inputs, target, additional_forward_args, steps, None, component)
        # importance only: the buffers' share of the change is nobody's parameter score (no note needed)
        imp = self._formatted(res, comps, True, is_window_list(steps), None, "abs_sum", False)
        chosen = set(resolve_parameters(self.model, parameters))
        owner = self.model if model is None else model
        out: Dict[Tuple[nn.Module, str], torch.Tensor] = {}
        for name, value in imp.items():
            if name not in chosen:
                continue
            mod_name, _, attr = name.rpartition(".")
            module = owner.get_submodule(mod_name) if mod_name else owner
            ref = getattr(module, attr)
            out[(module, attr)] = value.detach().to(device=ref.device, dtype=ref.dtype)
        if not out:
            raise ValueError(f"parameters={parameters!r} selects no trainable parameter")
        return out


def _aggregate(scores: torch.Tensor, aggregate: Optional[str]) -> torch.Tensor:
    if aggregate is None:
        return scores
    if aggregate == "sum":
        return scores.sum(dim=0)
    return scores.abs().sum(dim=0)
