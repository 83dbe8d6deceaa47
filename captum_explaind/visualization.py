"""Plots of ExPLAIND results (matplotlib, imported lazily).

Every function returns ``(figure, axes)`` like Captum's ``LLMAttributionResult.plot_*`` and
draws on ``ax`` when one is given.

* :func:`plot_reconstruction` — a waterfall from f(θ_0) to f(θ_N): kernel, regularization,
  residual, delta.
* :func:`plot_step_influence` — influence per window of training, e.g. kernel vs
  regularization over training (the paper's Fig. 3a, left).
* :func:`plot_layer_influence` — per-layer share of the influence over training (Fig. 3a, right),
  or per-layer bars for a single window.
* :func:`plot_training_influence` — the most influential training samples (proponents and
  opponents), optionally with their images.
* :func:`plot_similarity` — a heatmap of prediction similarities.
* :func:`plot_stage_grid`, :func:`plot_ordered_influence`, :func:`plot_coefficients`,
  :func:`plot_curves` — the Grokking study's stage grids, sorted influence matrices, coefficient
  bars and curves over training.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "plot_reconstruction",
    "plot_step_influence",
    "plot_stage_grid",
    "plot_ordered_influence",
    "plot_coefficients",
    "plot_curves",
    "plot_layer_influence",
    "plot_training_influence",
    "plot_similarity",
]


def _axes(ax: Any, figsize: Tuple[float, float]) -> Tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _np(t: Any):
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else t


def plot_reconstruction(result: Any, index: int = 0, output: Optional[int] = None, ax: Any = None) -> Tuple[Any, Any]:
    """Waterfall of one prediction: ``initial → +kernel → +regularization → … → final``.

    Args:
        result (Reconstruction): from :meth:`ExactPathKernel.reconstruct`.
        index (int, optional): which input. Default: 0
        output (int, optional): which output; ``None`` uses the output with the largest change.
        ax (matplotlib Axes, optional): axes to draw on.

    Returns:
        *tuple[Figure, Axes]*
    """
    parts = result.parts()
    change = (result.final[index] - result.initial[index]).reshape(-1)
    j = int(change.abs().argmax()) if output is None else int(output)

    def val(t: torch.Tensor) -> float:
        return float(t[index].reshape(-1)[j])

    steps = [("kernel", val(parts["kernel"])), ("regularization", val(parts["regularization"]))]
    for name in ("residual", "buffers", "other"):
        v = val(parts[name])
        if v != 0.0:
            steps.append((name, v))
    steps.append(("delta", val(result.delta)))
    fig, ax = _axes(ax, (6.5, 3.5))
    level = val(result.initial)
    ax.bar(0, level, color="0.6")
    labels = ["f(θ₀)"]
    for k, (name, v) in enumerate(steps, start=1):
        ax.bar(k, v, bottom=level, color="tab:blue" if v >= 0 else "tab:red")
        level += v
        labels.append(name)
    ax.bar(len(steps) + 1, val(result.final), color="0.3")
    labels.append("f(θ_N)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"input {index}, output {j}: exact decomposition over training")
    fig.tight_layout()
    return fig, ax


def plot_step_influence(
    scores: Union[torch.Tensor, Dict[str, torch.Tensor]],
    windows: Optional[Sequence[range]] = None,
    index: Optional[int] = None,
    cumulative: bool = False,
    ax: Any = None,
) -> Tuple[Any, Any]:
    """Influence per window of training steps.

    Args:
        scores (Tensor or dict[str, Tensor]): ``[n_inputs, n_windows]`` from
            :class:`StepInfluence` (a dict per component, e.g. kernel and regularization).
        windows (list[range], optional): the windows (``StepInfluence.explain(...).windows``) for the x-axis.
        index (int, optional): one input; ``None`` sums over inputs.
        cumulative (bool, optional): plot the running sum (the prediction's path). Default: False
        ax (matplotlib Axes, optional): axes to draw on.

    Returns:
        *tuple[Figure, Axes]*
    """
    series = scores if isinstance(scores, dict) else {"total": scores}
    fig, ax = _axes(ax, (7, 3.5))
    for name, s in series.items():
        y = s.sum(0) if index is None else s[index]
        if cumulative:
            y = y.cumsum(0)
        x = [r.stop - 1 for r in windows] if windows is not None else list(range(1, y.shape[0] + 1))
        ax.plot(x, _np(y), label=name, marker="." if len(x) < 60 else None)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("training step (end of window)" if windows is not None else "window")
    ax.set_ylabel("cumulative influence" if cumulative else "influence")
    ax.legend()
    fig.tight_layout()
    return fig, ax


def plot_layer_influence(
    scores: Union[torch.Tensor, Dict[str, torch.Tensor]],
    names: Optional[Sequence[str]] = None,
    windows: Optional[Sequence[range]] = None,
    relative: bool = True,
    ax: Any = None,
) -> Tuple[Any, Any]:
    """Per-layer importance: over training (``[n, W, G]``) or for one window (``[n, G]``).

    Importance is the absolute value of each group's score, summed over inputs. Over training, the
    groups' shares are stacked per window (``relative=True``) or their absolute values plotted.

    Args:
        scores (Tensor or dict[str, Tensor]): from ``StepInfluence(..., layers=...)`` or
            ``ParameterInfluence(..., layers=...)``; a dict maps group names to ``[n, W]``/``[n]``.
        names (list[str], optional): group names (taken from a dict).
        windows (list[range], optional): the windows, for the x-axis.
        relative (bool, optional): stacked shares instead of absolute values. Default: True
        ax (matplotlib Axes, optional): axes to draw on.

    Returns:
        *tuple[Figure, Axes]*
    """
    if isinstance(scores, dict):
        names = list(scores)
        scores = torch.stack([scores[k] for k in names], dim=-1)
    imp = scores.abs().sum(0)  # [W, G] or [G]
    names = list(names) if names is not None else [f"group {g}" for g in range(imp.shape[-1])]
    fig, ax = _axes(ax, (7, 3.5))
    if imp.dim() == 1:
        ax.bar(range(len(names)), _np(imp))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20)
        ax.set_ylabel("importance Σ|score|")
    else:
        x = [r.stop - 1 for r in windows] if windows is not None else list(range(1, imp.shape[0] + 1))
        y = imp / imp.sum(1, keepdim=True).clamp_min(torch.finfo(imp.dtype).tiny) if relative else imp
        if relative:
            ax.stackplot(x, *[_np(y[:, g]) for g in range(y.shape[1])], labels=names)
            ax.set_ylabel("share of importance")
        else:
            for g, name in enumerate(names):
                ax.plot(x, _np(y[:, g]), label=name)
            ax.set_ylabel("importance Σ|score|")
        ax.set_xlabel("training step (end of window)" if windows is not None else "window")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig, ax


def plot_training_influence(
    scores: torch.Tensor,
    k: int = 5,
    labels: Optional[Sequence[str]] = None,
    render: Optional[Callable[[int], Any]] = None,
    ax: Any = None,
) -> Tuple[Any, Any]:
    """The ``k`` strongest proponents and opponents of one prediction.

    Args:
        scores (Tensor): ``[n_train]`` scores of one prediction (a row of
            :meth:`TrainingDataInfluence.attribute`).
        k (int, optional): how many of each. Default: 5
        labels (list[str], optional): a label per training sample for the axis.
        render (Callable[[int], array], optional): returns an image for a training index; when
            given, a grid of the samples is drawn instead of bars.
        ax (matplotlib Axes, optional): axes for the bar chart.

    Returns:
        *tuple[Figure, Axes]* (axes array for the image grid)
    """
    s = scores.detach().reshape(-1)
    top = torch.topk(s, min(k, s.numel()))
    bottom = torch.topk(-s, min(k, s.numel()))
    idx = top.indices.tolist() + bottom.indices.tolist()
    vals = top.values.tolist() + (-bottom.values).tolist()
    if render is not None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, len(top.indices), figsize=(1.6 * len(top.indices), 3.6), squeeze=False)
        for pos, (i, v) in enumerate(zip(idx, vals)):
            a = axes[pos // len(top.indices), pos % len(top.indices)]
            a.imshow(render(i), cmap="gray")
            a.set_title(f"#{i}\n{v:+.3g}", fontsize="small")
            a.axis("off")
        axes[0, 0].set_ylabel("proponents")
        axes[1, 0].set_ylabel("opponents")
        fig.tight_layout()
        return fig, axes
    fig, ax = _axes(ax, (6.5, 3.5))
    names = [labels[i] if labels is not None else f"#{i}" for i in idx]
    ax.barh(range(len(idx)), vals, color=["tab:blue" if v >= 0 else "tab:red" for v in vals])
    ax.set_yticks(range(len(idx)))
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("influence on the prediction")
    fig.tight_layout()
    return fig, ax


# ---------------------------------------------------------------------- stage grids and case-study plots
def _grid(n: int, ncols: Optional[int], size: float, axes: Any) -> Tuple[Any, Any]:
    import matplotlib.pyplot as plt
    import numpy as np

    if axes is not None:
        arr = np.atleast_1d(axes).reshape(-1)
        return arr[0].figure, arr
    ncols = n if ncols is None else ncols
    nrows = (n + ncols - 1) // ncols
    fig, arr = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    return fig, arr.reshape(-1)


def plot_stage_grid(
    matrices: Union[torch.Tensor, Sequence[torch.Tensor]],
    titles: Optional[Sequence[str]] = None,
    xlabel: str = "",
    ylabel: str = "",
    symmetric: bool = True,
    vmax: Optional[float] = None,
    cmap: str = "coolwarm",
    ncols: Optional[int] = None,
    axes: Any = None,
    per_stage: bool = False,
    quantile: Optional[float] = None,
) -> Tuple[Any, Any]:
    """A row (or grid) of heatmaps, one per stage of training, with a shared colour scale (or one per stage).

    Args:
        matrices (Tensor or list[Tensor]): ``[n_stages, n, m]`` or a list of ``[n, m]`` matrices.
        titles (list[str], optional): one per stage.
        xlabel, ylabel (str, optional): axis labels of every panel.
        symmetric (bool, optional): colour scale centred at 0 (``±vmax``). Default: True
        vmax (float, optional): colour limit; ``None``: from the values (see ``quantile``).
        cmap (str, optional): matplotlib colour map. Default: "coolwarm"
        ncols (int, optional): panels per row. Default: all in one row
        axes (array of Axes, optional): axes to draw on (one per stage).
        per_stage (bool, optional): each panel its own colour scale and colour bar — for stages
            whose magnitudes differ by orders (influence early vs. late in training). Default: False
        quantile (float, optional): the colour limit at this quantile of ``|values|`` instead of the
            largest, so that a few outliers do not wash out the structure (values beyond it are shown
            at the end colours). Default: None (the largest |value|)

    Returns:
        *tuple[Figure, ndarray of Axes]*
    """
    import numpy as np

    mats = [_np(m) for m in (list(matrices) if not isinstance(matrices, torch.Tensor) else matrices.unbind(0))]
    if not mats:
        raise ValueError("plot_stage_grid needs at least one matrix")
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    fig, arr = _grid(len(mats), ncols, 3.2, axes)

    def limit(group: List[Any]) -> float:
        if vmax is not None:
            return vmax
        vals = np.abs(np.concatenate([m.reshape(-1) for m in group]))
        top = float(vals.max() if quantile is None else np.quantile(vals, quantile)) if vals.size else 0.0
        return top or 1.0

    shared = None if per_stage else limit(mats)
    shared_lo = None if per_stage or symmetric else min(float(m.min()) for m in mats)
    im = None
    for k, m in enumerate(mats):
        ax = arr[k]
        top = shared if shared is not None else limit([m])
        lo = -top if symmetric else (shared_lo if shared_lo is not None else float(m.min()))
        im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=top, aspect="auto", interpolation="nearest")
        if per_stage:
            fig.colorbar(im, ax=ax, shrink=0.8)
        if titles is not None:
            ax.set_title(titles[k], fontsize="small")
        ax.set_xlabel(xlabel, fontsize="small")
        ax.set_ylabel(ylabel if k == 0 else "", fontsize="small")
        ax.tick_params(labelsize="x-small")
    for ax in arr[len(mats) :]:
        ax.axis("off")
    if not per_stage:
        fig.colorbar(im, ax=list(arr[: len(mats)]), shrink=0.8)
    return fig, arr


def plot_ordered_influence(
    scores: torch.Tensor,
    row_key: torch.Tensor,
    col_key: torch.Tensor,
    xlabel: str = "training samples",
    ylabel: str = "explained predictions",
    ax: Any = None,
) -> Tuple[Any, Any]:
    """A training-sample influence matrix with rows and columns sorted by a key (e.g. ``a + b``).

    Args:
        scores (Tensor): ``[n_inputs, n_train]`` scores.
        row_key, col_key (Tensor): ``[n_inputs]`` and ``[n_train]`` sort keys (stable sort).
        xlabel, ylabel (str, optional): axis labels.
        ax (matplotlib Axes, optional): axes to draw on.

    Returns:
        *tuple[Figure, Axes]*
    """
    if scores.shape != (row_key.numel(), col_key.numel()):
        raise ValueError(f"scores {tuple(scores.shape)} do not match keys ({row_key.numel()}, {col_key.numel()})")
    r, c = torch.argsort(row_key, stable=True), torch.argsort(col_key, stable=True)
    m = _np(scores[r][:, c])
    fig, ax = _axes(ax, (4.5, 4))
    top = float(abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="coolwarm", vmin=-top, vmax=top, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def plot_coefficients(
    coefficients: Dict[str, float], k: int = 15, title: Optional[str] = None, ax: Any = None
) -> Tuple[Any, Any]:
    """Bars of the ``k`` largest coefficients of a fit (e.g. the Lasso of Table 2), largest first.

    Args:
        coefficients (dict[str, float]): feature name → coefficient.
        k (int, optional): how many bars. Default: 15
        title (str, optional): the panel title.
        ax (matplotlib Axes, optional): axes to draw on.

    Returns:
        *tuple[Figure, Axes]*
    """
    items = sorted(coefficients.items(), key=lambda kv: -abs(kv[1]))[:k]
    fig, ax = _axes(ax, (6.5, 0.3 * max(len(items), 3) + 1))
    vals = [v for _, v in items]
    ax.barh(range(len(items)), vals, color=["tab:blue" if v >= 0 else "tab:red" for v in vals])
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([n for n, _ in items])
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("coefficient")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig, ax


def plot_curves(
    curves: Dict[str, Sequence[float]],
    x: Optional[Sequence[float]] = None,
    xlabel: str = "training step",
    ylabel: str = "",
    logy: bool = False,
    ax: Any = None,
) -> Tuple[Any, Any]:
    """Several named series over training (accuracies, importances, accuracy after layer swaps).

    Args:
        curves (dict[str, sequence of float]): name → values (each its own x if ``x`` is None:
            1, 2, ...).
        x (sequence, optional): shared x values.
        xlabel, ylabel (str, optional): axis labels. logy (bool, optional): log scale.
        ax (matplotlib Axes, optional): axes to draw on.

    Returns:
        *tuple[Figure, Axes]*
    """
    fig, ax = _axes(ax, (6.5, 3.5))
    for name, ys in curves.items():
        vals = _np(ys) if isinstance(ys, torch.Tensor) else list(ys)
        xs = list(x) if x is not None else list(range(1, len(vals) + 1))
        ax.plot(xs, vals, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig, ax


def plot_similarity(sim: torch.Tensor, labels: Optional[Sequence[str]] = None, ax: Any = None) -> Tuple[Any, Any]:
    """Heatmap of a similarity matrix (e.g. :class:`PredictionSimilarity` output)."""
    fig, ax = _axes(ax, (4.5, 4))
    im = ax.imshow(_np(sim), vmin=-1, vmax=1, cmap="coolwarm")
    fig.colorbar(im, ax=ax)
    if labels is not None:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels)
    fig.tight_layout()
    return fig, ax


def plot_pruning(levels: Sequence[float], summary: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
                 metrics: Sequence[str] = ("accuracy", "agreement", "kl"), ax: Any = None) -> Any:
    """Pruning curves in the style of the ExPLAIND paper's Fig. 2: each metric against sparsity.

    Args:
        levels (sequence of float): the sparsity levels (fractions, e.g. 0.7 … 0.999).
        summary (mapping): ``method → metric → [means, stds]`` (one value per level), as written by
            ``benchmarks/pruning.py``.
        metrics (sequence of str): panels, left to right. Default: accuracy, agreement, KL
        ax (optional): a sequence of matplotlib axes, one per metric.

    Returns:
        *matplotlib.figure.Figure*
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
        axes = np.atleast_1d(axes)
    else:
        axes = np.atleast_1d(ax)
        fig = axes[0].figure
    x = 1.0 - np.asarray(levels, dtype=float)  # remaining fraction, log scale: 70 % … 99.9 % spread evenly
    titles = {"accuracy": "test accuracy", "agreement": "agreement with unpruned", "kl": "KL(unpruned ‖ pruned)"}
    for a, metric in zip(axes, metrics):
        for method, per in summary.items():
            mean, std = (np.asarray(v, dtype=float) for v in per[metric])
            a.plot(x, mean, marker="o", ms=3, label=method)
            # ± std band, kept inside what the metric can take (fractions in [0, 1]; KL > 0 on a log axis)
            low = np.maximum(mean - std, 0.5 * mean) if metric == "kl" else np.clip(mean - std, 0.0, 1.0)
            high = mean + std if metric == "kl" else np.clip(mean + std, 0.0, 1.0)
            a.fill_between(x, low, high, alpha=0.2)
        a.set_xscale("log")
        a.invert_xaxis()
        a.set_xticks(x)
        a.set_xticklabels([f"{100 * s:g}" for s in levels], rotation=45, fontsize=7)
        a.set_xlabel("sparsity (%)")
        a.set_title(titles.get(metric, metric))
        if metric == "kl":
            a.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
