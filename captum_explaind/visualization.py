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
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "plot_reconstruction",
    "plot_step_influence",
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
            a.fill_between(x, mean - std, mean + std, alpha=0.2)
        a.set_xscale("log")
        a.invert_xaxis()
        a.set_xticks(x)
        a.set_xticklabels([f"{100 * s:g}" for s in levels], rotation=45, fontsize=7)
        a.set_xlabel("sparsity (%)")
        a.set_title(titles.get(metric, metric))
        if metric == "kl":
            a.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
