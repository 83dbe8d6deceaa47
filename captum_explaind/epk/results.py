"""Result containers of the EPK core: self-describing, with their axes, options and sweep statistics.

Every result is a dataclass that carries what it is indexed by (steps or windows, groups,
components, training indices), the options that produced it (``options``, a plain dict of
:class:`~captum_explaind.epk.options.EPKOptions`) and what the sweep measured
(:class:`SweepStats`: per-step errors, integrand evaluations, unconverged pairs). ``to_dict()``
gives tensors and plain values, ``from_dict()`` rebuilds the result, and ``save(path)`` /
``load(path)`` write them as safetensors + JSON (no pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar, Union

import torch

__all__ = ["Reconstruction", "SweepStats", "ResultMixin", "ScoreResult", "DataDecomposition", "SimilarityResult"]

R = TypeVar("R", bound="ResultMixin")


def _encode(v: Any) -> Any:
    """Plain values for JSON, with tensors kept apart (marked ``{"__tensor__": key}``)."""
    if isinstance(v, range):
        return {"__range__": [v.start, v.stop]}
    if isinstance(v, SweepStats):
        return {"__stats__": v.to_dict()}
    if isinstance(v, dict):
        return {"__dict__": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "__range__" in v:
            return range(*v["__range__"])
        if "__stats__" in v:
            return SweepStats.from_dict(v["__stats__"])
        if "__dict__" in v:
            return {_decode(k): _decode(x) for k, x in v["__dict__"]}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


class ResultMixin:
    """``to_dict`` / ``from_dict`` / ``save`` / ``load`` for result dataclasses."""

    def to_dict(self) -> Dict[str, Any]:
        """Fields by name: tensors (and dicts of tensors) as they are, everything else plain."""
        out: Dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, SweepStats) else v
        return out

    @classmethod
    def from_dict(cls: Type[R], d: Mapping[str, Any]) -> R:
        """Inverse of :meth:`to_dict`."""
        vals = dict(d)
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name == "stats" and isinstance(vals.get("stats"), Mapping):
                vals["stats"] = SweepStats.from_dict(vals["stats"])
        return cls(**vals)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the result to ``path`` (a directory): ``tensors.safetensors`` + ``result.json``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors: Dict[str, torch.Tensor] = {}
        meta: Dict[str, Any] = {"type": type(self).__name__, "fields": {}}
        for name, v in self.to_dict().items():
            meta["fields"][name] = _stash(name, v, tensors)
        # clone: a result may hold the same tensor under two names (step_error and stats.step_error)
        save_file({k: t.detach().cpu().clone().contiguous() for k, t in tensors.items()},
                  os.path.join(path, "tensors.safetensors"))
        with open(os.path.join(path, "result.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)

    @classmethod
    def load(cls: Type[R], path: Union[str, os.PathLike]) -> R:
        """Read a result written by :meth:`save` (tensors on the CPU)."""
        from safetensors.torch import load_file

        with open(os.path.join(path, "result.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.get("type") != cls.__name__:
            raise ValueError(f"{path!r} holds a {meta.get('type')!r}, not a {cls.__name__}")
        tensors = load_file(os.path.join(path, "tensors.safetensors"))
        return cls.from_dict({k: _unstash(v, tensors) for k, v in meta["fields"].items()})


def _stash(name: str, v: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(v, torch.Tensor):
        tensors[name] = v
        return {"__tensor__": name}
    if isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v.values()):
        keys = []
        for i, (k, x) in enumerate(v.items()):
            tensors[f"{name}.{i}"] = x
            keys.append([_encode(k), f"{name}.{i}"])
        return {"__tensors__": keys}
    if isinstance(v, dict) and "step_error" in v and isinstance(v["step_error"], torch.Tensor):  # SweepStats
        tensors[f"{name}.step_error"] = v["step_error"]
        return {"__stats__": {**v, "step_error": {"__tensor__": f"{name}.step_error"}}}
    return _encode(v)


def _unstash(v: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(v, dict) and "__tensor__" in v:
        return tensors[v["__tensor__"]]
    if isinstance(v, dict) and "__tensors__" in v:
        return {_decode(k): tensors[key] for k, key in v["__tensors__"]}
    if isinstance(v, dict) and "__stats__" in v:
        d = dict(v["__stats__"])
        d["step_error"] = tensors[d["step_error"]["__tensor__"]]
        return d
    return _decode(v)


@dataclass
class SweepStats:
    """What a sweep measured.

    Attributes:
        steps (list[int]): the integrated steps.
        step_error (Tensor): ``[n_steps, n_inputs]``, per step the measured max |integrated −
            exact| change of the checked outputs.
        evaluations (int): integrand evaluation calls (each over any number of rows).
        unconverged (int): (step, input) pairs that missed the tolerance within the limits.
        max_depth (int): deepest refinement level used.
    """

    steps: List[int]
    step_error: torch.Tensor
    evaluations: int
    unconverged: int
    max_depth: int

    def to_dict(self) -> Dict[str, Any]:
        return {"steps": list(self.steps), "step_error": self.step_error, "evaluations": int(self.evaluations),
                "unconverged": int(self.unconverged), "max_depth": int(self.max_depth)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepStats":
        return cls(list(d["steps"]), d["step_error"], int(d["evaluations"]), int(d["unconverged"]), int(d["max_depth"]))


@dataclass
class Reconstruction(ResultMixin):
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
        unconverged (int): (step, input) pairs that missed the tolerance within the limits.
        stats (SweepStats, optional): the sweep statistics.
        options (dict): the :class:`~captum_explaind.epk.options.EPKOptions` used, as a dict.
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
    stats: Optional[SweepStats] = None
    options: Dict[str, Any] = field(default_factory=dict)

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

    def plot(self, index: int = 0, output: Optional[int] = None, **kwargs: Any) -> Any:
        """Waterfall of one input's reconstruction (:func:`captum_explaind.visualization.plot_reconstruction`)."""
        from ..visualization import plot_reconstruction

        return plot_reconstruction(self, index=index, output=output, **kwargs)

    def to(self, *args, **kwargs) -> "Reconstruction":
        vals: Dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            vals[f.name] = v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v
        return Reconstruction(**vals)


@dataclass
class ScoreResult(ResultMixin):
    r"""Model- and training-view scores with their axes (``ParameterInfluence`` / ``StepInfluence``).

    ``change[:, w] = Σ_groups scores["total"][:, w] + buffers[:, w] + delta[:, w]`` for every
    window ``w`` (likewise with ``kernel + regularization`` in place of ``total``).

    Attributes:
        scores (dict[str, Tensor]): per component (``kernel``, ``regularization``, ``total``),
            ``[n_inputs, n_windows, n_groups]`` or, per parameter element, ``[n_inputs,
            n_windows, P]`` (flat, in ``parameters`` order; :meth:`per_parameter` unflattens).
        change (Tensor): ``[n_inputs, n_windows]`` exact change of the target over each window
            (``f(θ_b, b_b) − f(θ_{a−1}, b_{a−1})``, buffers included).
        delta (Tensor): ``[n_inputs, n_windows]`` convergence delta of each window.
        windows (list[range]): the windows of application steps.
        groups (list[str] or None): group names; ``None`` for per-element scores.
        parameters (list[str]): trainable parameter names, in flat order.
        shapes (list[tuple]): their shapes.
        stats (SweepStats, optional), options (dict): what the sweep measured, the options used.
        buffers (Tensor or None): ``[n_inputs, n_windows]`` change of the target caused by
            buffers that moved without gradients (BatchNorm running statistics) after the
            window's steps, ``f(θ_s, b_s) − f(θ_s, b_{s−1})`` summed over them; zeros for models
            whose buffers never change. Not a parameter's score, so not in ``scores``.
    """

    scores: Dict[str, torch.Tensor]
    change: torch.Tensor
    delta: torch.Tensor
    windows: List[range]
    groups: Optional[List[str]]
    parameters: List[str]
    shapes: List[Any]
    stats: Optional[SweepStats] = None
    options: Dict[str, Any] = field(default_factory=dict)
    buffers: Optional[torch.Tensor] = None

    @property
    def components(self) -> List[str]:
        return list(self.scores)

    def per_parameter(self, component: str = "total") -> Dict[str, torch.Tensor]:
        """Per-element scores as ``name → [n_inputs, n_windows, *shape]`` (per-element results only)."""
        if self.groups is not None:
            raise ValueError("these scores are per group, not per parameter element")
        flat, out, start = self.scores[component], {}, 0
        for name, shape in zip(self.parameters, self.shapes):
            size = 1
            for d in shape:
                size *= int(d)
            out[name] = flat[..., start : start + size].reshape(*flat.shape[:-1], *shape)
            start += size
        return out

    def plot(self, kind: str = "steps", index: Optional[int] = None, **kwargs: Any) -> Any:
        """``kind="steps"``: influence per window (each component); ``"layers"``: per-group importance."""
        from .. import visualization as viz

        if kind == "steps":
            series = {c: (s.sum(-1) if s.dim() == 3 else s) for c, s in self.scores.items()}
            return viz.plot_step_influence(series, windows=self.windows, index=index, **kwargs)
        if kind == "layers":
            if self.groups is None:
                raise ValueError("per-layer plots need layers=... scores")
            s = self.scores["total"] if "total" in self.scores else next(iter(self.scores.values()))
            return viz.plot_layer_influence(s if len(self.windows) > 1 else s[:, 0], names=self.groups,
                                            windows=self.windows, **kwargs)
        raise ValueError(f"kind must be 'steps' or 'layers', got {kind!r}")


@dataclass
class DataDecomposition(ResultMixin):
    r"""A prediction's change over the selected steps, split over training samples.

    ``change = scores.sum(training axis and any window/group axes) + other.sum(window axis) + regularization
    + residual + buffers + delta``

    Attributes:
        scores (Tensor): ``[n_inputs, n_train]`` signed influence of each training sample
            (positive: pushed the target output up), with a window axis (``[n, n_train, W]``)
            for a list of windows and a group axis last for ``layers``.
        other (Tensor or None): ``[n_inputs]`` (``[n_inputs, W]`` for a list of windows) the kernel
            part of the change through the parameters in no group of ``layers=`` (all training
            samples together): exact, ``−Σ_i c_i ⟨g_i, T_i⟩`` on those parameters with ``g_i`` the
            replayed batch gradient of step i — the sum over the samples of their (not computed)
            per-sample scores there. Zeros when the groups cover every parameter or without
            ``layers=``. Groups must be disjoint (a parameter in two groups is refused).
        regularization (Tensor): ``[n_inputs]`` part of the change due to weight decay.
        residual (Tensor): ``[n_inputs]`` part of the recorded updates the replay does not
            explain (``Σ_s φ_s·E_s``, E_s = Δ_s − K_s − R_s): round-off for deterministic
            training with a supported optimizer; large under dropout or a mismatched loss. It
            never holds the share of ungrouped parameters (that is ``other``).
        change (Tensor): ``[n_inputs]`` exact change of the target output over the selected steps
            (buffers included).
        delta (Tensor): ``[n_inputs]`` convergence delta (quadrature error).
        buffers (Tensor or None): ``[n_inputs]`` change caused by buffers that moved without
            gradients (BatchNorm running statistics) after the selected steps; zeros if none did.
        train_grads (str): how per-sample training gradients were computed (``"independent"``,
            or ``"coupled"``: each recorded micro-batch forwarded as in training, per-sample losses
            differentiated through the batch statistics; see :mod:`.train_grads`).
        grad_scale (dict[int, float]): per step, the global gradient scale measured at replay.
        windows (list[range]): the step windows; ``indexing`` says how steps were assigned.
        indexing (str): ``"application"`` or ``"gradient"``.
        groups (list[str] or None): names of the group axis (``layers=``), if any.
        train_indices (Tensor): ``[n_train]`` the dataset index of each score column.
        stats (SweepStats, optional), options (dict): what the sweep measured, the options used.
        per_window (dict[str, Tensor] or None): for a list of windows with ``indexing="application"``,
            ``regularization``, ``residual``, ``change``, ``delta`` and ``buffers`` per window
            (``[n_inputs, W]``), so that each window decomposes its own change (:meth:`window`). Windows
            may overlap there (a step in two windows credits both, and one sweep serves them all); the
            totals above are the sums over the windows, so a shared step counts once per window.
    """

    scores: torch.Tensor
    regularization: torch.Tensor
    residual: torch.Tensor
    change: torch.Tensor
    delta: torch.Tensor
    grad_scale: Dict[int, float] = field(default_factory=dict)
    windows: List[range] = field(default_factory=list)
    indexing: str = "application"
    groups: Optional[List[str]] = None
    train_indices: Optional[torch.Tensor] = None
    stats: Optional[SweepStats] = None
    options: Dict[str, Any] = field(default_factory=dict)
    buffers: Optional[torch.Tensor] = None
    train_grads: str = "independent"
    other: Optional[torch.Tensor] = None
    per_window: Optional[Dict[str, torch.Tensor]] = None

    def window(self, k: int) -> "DataDecomposition":
        """The decomposition of window ``k`` alone (scores ``[n_inputs, n_train]`` plus any group
        axis), as a call with ``steps=windows[k]`` would return it.

        Args:
            k (int): index into :attr:`windows`.

        Returns:
            *DataDecomposition*
        """
        if self.per_window is None:
            raise ValueError("window() needs a result of a list of windows with indexing='application' "
                             "(this one has no per-window parts)")
        if not -len(self.windows) <= k < len(self.windows):
            raise IndexError(f"window {k} out of range for {len(self.windows)} windows")
        pw = {name: t[:, k] for name, t in self.per_window.items()}
        return replace(
            self, scores=self.scores[:, :, k], other=None if self.other is None else self.other[:, k],
            regularization=pw["regularization"], residual=pw["residual"], change=pw["change"],
            delta=pw["delta"], buffers=pw["buffers"], windows=[self.windows[k]], per_window=None,
            grad_scale=dict(self.grad_scale))

    def top(self, k: int, proponents: bool = True) -> "tuple[torch.Tensor, torch.Tensor]":
        """The ``k`` most positive (or negative) training samples per input: ``(indices, scores)``."""
        flat = self.scores.reshape(self.scores.shape[0], self.scores.shape[1], -1).sum(-1)
        vals, idx = torch.topk(flat, k, dim=1, largest=proponents)
        return idx, vals

    def plot(self, index: int = 0, k: int = 5, **kwargs: Any) -> Any:
        """Top proponents and opponents of one input (:func:`captum_explaind.visualization.plot_training_influence`)."""
        from ..visualization import plot_training_influence

        flat = self.scores.reshape(self.scores.shape[0], self.scores.shape[1], -1).sum(-1)
        return plot_training_influence(flat[index], k=k, **kwargs)


@dataclass
class SimilarityResult(ResultMixin):
    r"""Cosine similarities of influence tensors (Def. 4.4), with the inner products behind them.

    Attributes:
        similarity (Tensor): ``[n_inputs, n_others]`` cosines in [−1, 1].
        gram (Tensor): ``[n, n]`` inner products ⟨Γ(x), Γ(x')⟩ of all compared predictions
            (inputs, then others).
        window (range): the steps S. layers (list[str] or None): the parameters Θ (``None``: all).
        train_subset (Tensor or None): the training samples K (``None``: all).
        stats (SweepStats, optional), options (dict): what the sweep measured, the options used.
        change (Tensor or None): ``[n, J]`` exact change of each compared prediction's outputs
            over the window (inputs, then others), buffers included.
        buffers (Tensor or None): ``[n, J]`` the part of ``change`` caused by buffers that moved
            without gradients (BatchNorm running statistics); the influence tensors Γ cover
            ``change − buffers``.
        train_grads (str): how per-sample training gradients were computed (see
            :class:`DataDecomposition`).
        truncation (float): for a sweep begun after step 1 (``explain_windows(start=...)``), the
            largest weight with which momentum from before its start can enter the window (the
            product of the momentum coefficients in between); 0 for a sweep from step 1.
    """

    similarity: torch.Tensor
    gram: torch.Tensor
    window: range
    layers: Optional[List[str]] = None
    train_subset: Optional[torch.Tensor] = None
    stats: Optional[SweepStats] = None
    options: Dict[str, Any] = field(default_factory=dict)
    change: Optional[torch.Tensor] = None
    buffers: Optional[torch.Tensor] = None
    train_grads: str = "independent"
    truncation: float = 0.0

    def plot(self, labels: Optional[List[str]] = None, **kwargs: Any) -> Any:
        """Heatmap (:func:`captum_explaind.visualization.plot_similarity`)."""
        from ..visualization import plot_similarity

        return plot_similarity(self.similarity, labels=labels, **kwargs)
