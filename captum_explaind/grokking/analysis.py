"""The Grokking study's analyses, one call per figure of the paper (Sec. 5), on a recorded run.

Every function takes a :class:`~captum_explaind.grokking.GrokRun` (or its model and trajectory)
and returns a small dataclass with the numbers the figure shows, the exact prediction changes
they decompose and the convergence delta, plus a ``plot()`` method.

* :func:`training_balance` — Fig. 3a left: accuracies; kernel importance Ψ and regularization
  importance Ψ^reg per window of training.
* :func:`layer_balance` — Fig. 3a right: per-layer importance Ψ_s(Θ_layer) and regularization
  influence D_s(Θ_layer) per window.
* :func:`sample_influence` — Fig. 4: training-sample influence on predictions through one
  layer (the decoder) over 50-step windows at four stages, orderable by ``a + b`` and
  ``(a + b) mod p``.
* :func:`similarity_stages` — Fig. 5: prediction similarity of one layer at the stages.
* :func:`fit_frequencies` (in :mod:`.lasso`: :func:`~captum_explaind.grokking.lasso.fit_similarity`)
  — Table 2 / Fig. 9.
* :mod:`.swap` — Fig. 3b / 7 / 8.

All use the library's public views only (StepInfluence, ParameterInfluence,
TrainingDataInfluence, PredictionSimilarity) with the options passed (default ``"exact"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..attr import ParameterInfluence, PredictionSimilarity, StepInfluence, TrainingDataInfluence
from ..epk import EPKOptions
from .task import LAYERS, GrokRun

__all__ = [
    "Stage",
    "find_stages",
    "TrainingBalance",
    "training_balance",
    "LayerBalance",
    "layer_balance",
    "balances",
    "SampleInfluence",
    "sample_influence",
    "sample_influences",
    "SimilarityStages",
    "similarity_stages",
    "true_change",
]

OptionsType = Union[EPKOptions, str, None]


@dataclass(frozen=True)
class Stage:
    """A named window of application steps (1-based, ``range(start, stop)``)."""

    name: str
    steps: range

    def __str__(self) -> str:
        return f"{self.name} (steps {self.steps.start}–{self.steps.stop - 1})"


def find_stages(run: GrokRun, width: int = 50) -> List[Stage]:
    """Four windows of ``width`` steps at the phases of grokking, read off the accuracy curves.

    * ``"start"``: the first steps;
    * ``"memorization"``: ending where the training accuracy first reaches 100 %;
    * ``"transition"``: centred where the test accuracy first passes 50 %;
    * ``"grokked"``: the last steps (test accuracy at its final value).

    Windows are clipped to the run and kept in order (they may overlap in a very short run).

    Args:
        run (GrokRun): the recorded run. width (int): steps per window. Default: 50

    Returns:
        *list[Stage]*
    """
    N = run.steps
    width = max(1, min(width, N))

    def window(end: int) -> range:
        end = min(max(end, width), N)
        return range(end - width + 1, end + 1)

    h = run.history
    mem = h.first_step("train_acc", 1.0) or N // 3
    half = h.first_step("test_acc", 0.5) or (2 * N) // 3
    return [
        Stage("start", window(width)),
        Stage("memorization", window(mem)),
        Stage("transition", window(half + width // 2)),
        Stage("grokked", window(N)),
    ]


def true_change(run: GrokRun, x: torch.Tensor, y: torch.Tensor, steps: range) -> torch.Tensor:
    """``f_y(θ_end; x) − f_y(θ_start−1; x)`` from two plain float64 forward passes (the reference for completeness)."""
    traj = run.recorded
    model = run.model

    dev = next(model.parameters()).device  # where the model (and its buffers) live

    def f(step: int) -> torch.Tensor:
        params = {k: v.to(dev, torch.float64) for k, v in traj.params(step).items()}
        with torch.no_grad():
            out = torch.func.functional_call(model.double(), params, (x.to(dev),))
        model.float()
        return out.gather(1, y.to(dev).reshape(-1, 1)).squeeze(1)

    return _host(f(steps.stop - 1) - f(steps.start - 1))


def _host(t: torch.Tensor) -> torch.Tensor:
    """The study's records live on the CPU (reports, plots, the lasso), wherever the views computed:
    a run trained on a GPU gives view results there, while its data and the recording are on the CPU."""
    return t.detach().cpu()


def _windows(n_steps: int, window: int) -> List[range]:
    return [range(s, min(s + window, n_steps + 1)) for s in range(1, n_steps + 1, window)]


# ---------------------------------------------------------------------- Fig. 3a, left
@dataclass
class TrainingBalance:
    """Kernel vs. regularization over training (Fig. 3a, left).

    Attributes:
        windows (list[range]): the windows of steps.
        kernel, regularization (Tensor): ``[n_inputs, n_windows]`` signed scores of the target.
        importance, reg_importance (Tensor): ``[n_windows]`` Ψ and Ψ^reg: Σ over inputs of |score|.
        change (Tensor): ``[n_inputs]`` exact change ``f(θ_N) − f(θ_0)`` (plain forward passes).
        delta (Tensor): ``[n_inputs]`` ``change − Σ_windows (kernel + regularization)``.
        train_acc, test_acc (list[float]): the accuracy curves (after each step).
    """

    windows: List[range]
    kernel: torch.Tensor
    regularization: torch.Tensor
    importance: torch.Tensor
    reg_importance: torch.Tensor
    change: torch.Tensor
    delta: torch.Tensor
    train_acc: List[float]
    test_acc: List[float]

    def final_share(self, last: int = 1) -> float:
        """Ψ^reg / (Ψ + Ψ^reg) over the last ``last`` windows."""
        k, r = float(self.importance[-last:].sum()), float(self.reg_importance[-last:].sum())
        return r / max(k + r, 1e-300)

    def plot(self, axes: Any = None) -> Any:
        from .plots import plot_training_balance

        return plot_training_balance(self, axes=axes)


def training_balance(run: GrokRun, x: torch.Tensor, y: torch.Tensor, window: int = 50,
                     options: OptionsType = "exact", **overrides: Any) -> TrainingBalance:
    """Fig. 3a (left): Ψ and Ψ^reg per window of ``window`` steps, on the predictions ``f_y(x)``.

    Args:
        run (GrokRun): the recorded run. x, y (Tensor): inputs and target classes (the labels).
        window (int): steps per window. Default: 50
        options (EPKOptions or str): how to compute. Default: "exact"
        **overrides: option overrides (``show_progress=True``, ``batch_size=...``).

    Returns:
        *TrainingBalance*
    """
    si = StepInfluence(run.model, run.recorded, options, **overrides)
    res = si.explain(x, target=y, window=window, component=["kernel", "regularization"])
    k, r = _host(res.scores["kernel"][..., 0]), _host(res.scores["regularization"][..., 0])
    change = true_change(run, x, y, range(1, run.recorded.num_steps + 1))
    return TrainingBalance(
        windows=list(res.windows), kernel=k, regularization=r, importance=k.abs().sum(0),
        reg_importance=r.abs().sum(0), change=change, delta=change - (k + r).sum(1),
        train_acc=list(run.history.train_acc), test_acc=list(run.history.test_acc),
    )


# ---------------------------------------------------------------------- Fig. 3a, right
@dataclass
class LayerBalance:
    """Per-layer importance and regularization influence over training (Fig. 3a, right).

    Attributes:
        windows (list[range]), layers (list[str]): the axes.
        scores (Tensor): ``[n_inputs, n_windows, n_layers]`` signed total scores.
        importance (Tensor): ``[n_windows, n_layers]`` Ψ_s(Θ_layer) = Σ_inputs |score|.
        reg_influence (Tensor or None): ``[n_windows, n_layers]`` D_s(Θ_layer) (Def. 4.3, summed
            over ``d_inputs``: Σ_p |Ψ_p| − |Ψ^reg_p| per element), ``None`` if not computed.
        change (Tensor), delta (Tensor): ``[n_inputs]`` exact change over the run and
            ``change − Σ scores``.
    """

    windows: List[range]
    layers: List[str]
    scores: torch.Tensor
    importance: torch.Tensor
    reg_influence: Optional[torch.Tensor]
    change: torch.Tensor
    delta: torch.Tensor

    def shares(self) -> torch.Tensor:
        """``[n_windows, n_layers]`` each layer's share of the window's importance."""
        return self.importance / self.importance.sum(1, keepdim=True).clamp_min(1e-300)

    def leader(self, w: int) -> str:
        """The most important layer in window ``w``."""
        return self.layers[int(self.importance[w].argmax())]

    def plot(self, axes: Any = None) -> Any:
        from .plots import plot_layer_balance

        return plot_layer_balance(self, axes=axes)


def layer_balance(run: GrokRun, x: torch.Tensor, y: torch.Tensor, window: int = 50,
                  layers: Optional[Dict[str, List[str]]] = None, d_inputs: Optional[int] = None,
                  options: OptionsType = "exact", **overrides: Any) -> LayerBalance:
    """Fig. 3a (right): Ψ_s and D_s of each layer per window.

    Args:
        run (GrokRun): the recorded run. x, y (Tensor): inputs and targets.
        window (int): steps per window. Default: 50
        layers (dict, optional): name → selectors. Default: :data:`LAYERS` (the paper's six)
        d_inputs (int, optional): inputs (the first ones) for D_s, which needs per-element scores
            (``n × windows × P`` memory); ``0`` skips it; ``None``: all. Default: None
        options, **overrides: how to compute. Default: "exact"

    Returns:
        *LayerBalance*
    """
    layers = dict(LAYERS if layers is None else layers)
    si = StepInfluence(run.model, run.recorded, options, **overrides)
    res = si.explain(x, target=y, window=window, layers=layers)
    scores = _host(res.scores["total"])
    change = true_change(run, x, y, range(1, run.recorded.num_steps + 1))
    reg = _reg_influence(run, x, y, list(res.windows), layers, d_inputs, options, **overrides)
    return LayerBalance(windows=list(res.windows), layers=list(layers), scores=scores,
                        importance=scores.abs().sum(0), reg_influence=reg, change=change,
                        delta=change - scores.sum((1, 2)))


def balances(run: GrokRun, x: torch.Tensor, y: torch.Tensor, window: int = 50, d_inputs: Optional[int] = None,
             options: OptionsType = "exact", **overrides: Any) -> "tuple[TrainingBalance, LayerBalance]":
    """Fig. 3a left and right from one sweep: kernel and regularization scores per layer and window.

    :func:`training_balance` is the sum over the six layers (they hold every parameter of the
    model), :func:`layer_balance` the sum over the two parts; the same numbers as the two calls,
    at the cost of one.

    Args:
        run, x, y, window, d_inputs, options, **overrides: as :func:`layer_balance`.

    Returns:
        *tuple[TrainingBalance, LayerBalance]*
    """
    layers = dict(LAYERS)
    si = StepInfluence(run.model, run.recorded, options, **overrides)
    res = si.explain(x, target=y, window=window, layers=layers, component=["kernel", "regularization"])
    covered = sum(int(v.numel()) for n, v in run.model.named_parameters() if n.split(".")[0] in _layer_params(run))
    if covered != sum(int(v.numel()) for v in run.model.parameters()):
        raise ValueError("the six layers of LAYERS do not hold every parameter of this model; use training_balance()")
    k3, r3 = _host(res.scores["kernel"]), _host(res.scores["regularization"])  # [n, W, 6]
    k, r = k3.sum(-1), r3.sum(-1)
    change = true_change(run, x, y, range(1, run.recorded.num_steps + 1))
    bal = TrainingBalance(
        windows=list(res.windows), kernel=k, regularization=r, importance=k.abs().sum(0),
        reg_importance=r.abs().sum(0), change=change, delta=change - (k + r).sum(1),
        train_acc=list(run.history.train_acc), test_acc=list(run.history.test_acc))
    scores = k3 + r3
    reg = _reg_influence(run, x, y, list(res.windows), layers, d_inputs, options, **overrides)
    lay = LayerBalance(windows=list(res.windows), layers=list(layers), scores=scores, importance=scores.abs().sum(0),
                       reg_influence=reg, change=change, delta=change - scores.sum((1, 2)))
    return bal, lay


def _layer_params(run: GrokRun) -> set:
    """Module names (first part of the parameter names) matched by :data:`LAYERS`."""
    import fnmatch

    names = {n.split(".")[0] for n, _ in run.model.named_parameters()}
    return {n for n in names for sels in LAYERS.values() for sel in sels if fnmatch.fnmatch(n, sel)}


def _reg_influence(run: GrokRun, x: torch.Tensor, y: torch.Tensor, windows: List[range], layers: Dict[str, List[str]],
                   d_inputs: Optional[int], options: OptionsType, **overrides: Any) -> Optional[torch.Tensor]:
    """D_s per window and layer on the first ``d_inputs`` inputs (``None``: all; 0: not computed)."""
    n_d = x.shape[0] if d_inputs is None else min(int(d_inputs), x.shape[0])
    if n_d <= 0:
        return None
    pi = ParameterInfluence(run.model, run.recorded, options, **overrides)
    reg_list = []
    # A few windows per call bound the per-element accumulators (n × windows × 2 × P).
    for start in range(0, len(windows), 8):
        chunk = windows[start : start + 8]
        d = pi.regularization_influence(x[:n_d], target=y[:n_d], steps=chunk, layers=layers)
        reg_list.append(_host(torch.stack([d[k] for k in layers], dim=-1).reshape(len(chunk), len(layers))))
    return torch.cat(reg_list)


# ---------------------------------------------------------------------- Fig. 4
@dataclass
class SampleInfluence:
    """Training-sample influence through one layer at stages (Fig. 4).

    Attributes:
        stages (list[Stage]): the windows.
        layer (str): the layer whose parameters carry the scores shown.
        scores (Tensor): ``[n_stages, n_inputs, n_train]`` scores through ``layer``.
        other (Tensor): ``[n_stages, n_inputs]`` the rest of the model's share (Σ over samples).
        regularization, residual, change, delta (Tensor): ``[n_stages, n_inputs]``: the parts beside
            the scores, the exact change over each stage, and ``change − everything``.
        input_sums, train_sums (Tensor): ``a + b`` of the explained inputs and training pairs.
        p (int): the modulus.
    """

    stages: List[Stage]
    layer: str
    scores: torch.Tensor
    other: torch.Tensor
    regularization: torch.Tensor
    residual: torch.Tensor
    change: torch.Tensor
    delta: torch.Tensor
    input_sums: torch.Tensor
    train_sums: torch.Tensor
    p: int

    def order(self, by: str = "sum") -> "tuple[torch.Tensor, torch.Tensor]":
        """Row and column orders by ``"sum"`` (a + b) or ``"mod"`` ((a + b) mod p)."""
        if by not in ("sum", "mod"):
            raise ValueError(f"by must be 'sum' or 'mod', got {by!r}")
        key_r, key_c = (self.input_sums, self.train_sums) if by == "sum" else (self.input_sums % self.p,
                                                                               self.train_sums % self.p)
        return torch.argsort(key_r, stable=True), torch.argsort(key_c, stable=True)

    def ordered(self, stage: int, by: str = "sum") -> torch.Tensor:
        """The stage's ``[n_inputs, n_train]`` matrix with rows and columns sorted."""
        r, c = self.order(by)
        return self.scores[stage][r][:, c]

    def same_label_share(self, stage: int) -> float:
        """Share of the total |score| carried by training pairs with the explained input's label."""
        same = (self.input_sums % self.p).reshape(-1, 1) == (self.train_sums % self.p).reshape(1, -1)
        s = self.scores[stage].abs()
        return float(s[same].sum() / s.sum().clamp_min(1e-300))

    def plot(self, by: str = "sum", axes: Any = None) -> Any:
        from .plots import plot_sample_influence

        return plot_sample_influence(self, by=by, axes=axes)


def sample_influence(run: GrokRun, x: torch.Tensor, y: torch.Tensor, stages: Sequence[Stage],
                     layer: str = "decoder", options: OptionsType = "exact", **overrides: Any) -> SampleInfluence:
    """Fig. 4: each training sample's influence on ``f_y(x)`` through ``layer`` in each stage.

    The other layers' share is computed too, summed over the training samples (the data view's
    ``other``: exact, from the replayed batch gradient, so only ``layer``'s per-sample gradients
    are formed), so that every stage's decomposition can be checked for completeness: scores +
    other + regularization + residual + delta = the exact change of the prediction over the stage.

    Args:
        run (GrokRun): the recorded run. x, y (Tensor): inputs (test or training pairs) and targets.
        stages (list[Stage]): the windows (:func:`find_stages`).
        layer (str): a key of :data:`LAYERS`. Default: "decoder"
        options, **overrides: how to compute. Default: "exact"

    Returns:
        *SampleInfluence*
    """
    return sample_influences(run, {"inputs": (x, y)}, stages, layer, options, **overrides)["inputs"]


def sample_influences(run: GrokRun, sets: Dict[str, "tuple[torch.Tensor, torch.Tensor]"], stages: Sequence[Stage],
                      layer: str = "decoder", options: OptionsType = "exact",
                      **overrides: Any) -> Dict[str, SampleInfluence]:
    """:func:`sample_influence` for several sets of predictions (e.g. test and training pairs) at once.

    The sets and the stages share one reverse sweep: the per-sample training gradients of a
    step, the sweep's main cost, are computed once for every set and every stage that step
    reaches (a set's or a stage's numbers are the same as from its own call: the data view's
    accumulators are per input and per window).

    Args:
        run (GrokRun): the recorded run. sets (dict): name → ``(x, y)``.
        stages, layer, options, **overrides: as :func:`sample_influence`.

    Returns:
        *dict[str, SampleInfluence]*, by the names of ``sets``
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {list(LAYERS)}, got {layer!r}")
    if not sets:
        raise ValueError("sets must name at least one (x, y) pair")
    tdi = TrainingDataInfluence(run.model, run.recorded, run.data.train_set, loss_fn=nn.NLLLoss(reduction="none"),
                                options=options, **overrides)
    x = torch.cat([xy[0] for xy in sets.values()])
    y = torch.cat([xy[1] for xy in sets.values()])
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in ("scores", "other", "reg", "resid", "change", "delta")}
    # One reverse sweep for all stages (windows may overlap): a step that several stages reach
    # through momentum has its per-sample gradients computed once. Per-sample gradients of `layer`
    # only; the other layers' share comes from the replayed batch gradient.
    whole = tdi.explain(x, target=y, layers={layer: LAYERS[layer]}, steps=[st.steps for st in stages])
    for w in range(len(stages)):
        res = whole.window(w)
        assert res.other is not None  # the data view always reports it
        for k, v in (("scores", res.scores[..., 0]), ("other", res.other),
                     ("reg", res.regularization), ("resid", res.residual), ("change", res.change),
                     ("delta", res.delta)):
            parts[k].append(v)
    stacked = {k: _host(torch.stack(v)) for k, v in parts.items()}  # [n_stages, n_all, ...]
    ta, tb = run.data.operands("train")
    out: Dict[str, SampleInfluence] = {}
    offset = 0
    for name, (xs, _) in sets.items():
        sl = slice(offset, offset + xs.shape[0])
        offset = sl.stop
        out[name] = SampleInfluence(
            stages=list(stages), layer=layer, scores=stacked["scores"][:, sl], other=stacked["other"][:, sl],
            regularization=stacked["reg"][:, sl], residual=stacked["resid"][:, sl], change=stacked["change"][:, sl],
            delta=stacked["delta"][:, sl], input_sums=_host(xs[:, 0] + xs[:, 2]), train_sums=_host(ta + tb),
            p=run.data.p)
    return out


# ---------------------------------------------------------------------- Fig. 5
@dataclass
class SimilarityStages:
    """Prediction similarity through one layer at stages (Fig. 5).

    Attributes:
        stages (list[Stage]), layer (str): the windows and the layer.
        similarity (Tensor): ``[n_stages, n, n]`` cosines (Def. 4.4).
        sums (Tensor): ``[n]`` a + b of the inputs. p (int): the modulus.
        max_step_error (list[float]): per stage, the largest per-step quadrature error measured.
        truncation (list[float]): per stage, the bound on the momentum a late-started sweep dropped
            (0: swept from step 1).
    """

    stages: List[Stage]
    layer: str
    similarity: torch.Tensor
    sums: torch.Tensor
    p: int
    max_step_error: List[float]
    truncation: List[float] = field(default_factory=list)

    def ordered(self, stage: int, by: str = "sum") -> torch.Tensor:
        key = self.sums if by == "sum" else self.sums % self.p
        o = torch.argsort(key, stable=True)
        return self.similarity[stage][o][:, o]

    def plot(self, by: str = "sum", axes: Any = None) -> Any:
        from .plots import plot_similarity_stages

        return plot_similarity_stages(self, by=by, axes=axes)


def similarity_stages(run: GrokRun, x: torch.Tensor, y: torch.Tensor, stages: Sequence[Stage],
                      layer: str = "decoder", options: OptionsType = "exact", horizon: Optional[int] = None,
                      **overrides: Any) -> SimilarityStages:
    """Fig. 5: cosine similarity of the predictions' influence tensors through ``layer`` per stage.

    Args:
        run (GrokRun): the recorded run. x, y (Tensor): inputs and targets.
        stages (list[Stage]): the windows. layer (str): a key of :data:`LAYERS`. Default: "decoder"
        options, **overrides: how to compute. Default: "exact"
        horizon (int, optional): start each sweep this many steps before its first stage instead of
            at step 1 (stages further apart than that get their own sweep); the momentum dropped
            is bounded in ``truncation`` (β1^horizon: 0.9^409 ≈ 2e-19). ``None``: every sweep from
            step 1, nothing dropped. Default: None

    Returns:
        *SimilarityStages*
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {list(LAYERS)}, got {layer!r}")
    ps = PredictionSimilarity(run.model, run.recorded, run.data.train_set, loss_fn=nn.NLLLoss(reduction="none"),
                              options=options, **overrides)
    # one forward sweep for all stages: the per-sample momentum buffers do not depend on the window;
    # with a horizon, stages more than `horizon` steps after the previous ones get a sweep of their own
    order = sorted(range(len(stages)), key=lambda i: stages[i].steps.start)
    clusters: List[List[int]] = []
    for i in order:
        if horizon is not None and clusters and stages[i].steps.start - horizon > max(
                stages[j].steps.stop for j in clusters[-1]):
            clusters.append([i])
        elif clusters:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    by_stage: Dict[int, Any] = {}
    for cl in clusters:
        first = min(stages[j].steps.start for j in cl)
        start = None if horizon is None else max(1, first - int(horizon))
        out = ps.explain_windows(x, [stages[j].steps for j in cl], target=y, layers=LAYERS[layer], start=start)
        by_stage.update(zip(cl, out))
    results = [by_stage[i] for i in range(len(stages))]
    sims, errs = [], []
    for st, res in zip(stages, results):
        sims.append(_host(res.similarity))
        err = torch.zeros(0)
        if res.stats is not None and res.stats.step_error.numel():
            rows = [i for i, s in enumerate(res.stats.steps) if s in st.steps]  # this stage's steps
            err = res.stats.step_error[rows]
        errs.append(float(err.max()) if err.numel() else 0.0)
    return SimilarityStages(stages=list(stages), layer=layer, similarity=torch.stack(sims),
                            sums=_host(x[:, 0] + x[:, 2]),
                            p=run.data.p, max_step_error=errs, truncation=[float(r.truncation) for r in results])
