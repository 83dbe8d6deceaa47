"""The Grokking study's figures, composed from :mod:`captum_explaind.visualization`.

Each function draws one figure of the paper from the matching result of :mod:`.analysis`,
:mod:`.lasso` or :mod:`.swap` and returns ``(figure, axes)``.
"""

from __future__ import annotations

from typing import Any, Tuple

from .. import visualization as viz

__all__ = ["plot_training_balance", "plot_layer_balance", "plot_sample_influence", "plot_similarity_stages",
           "plot_lasso", "plot_layer_swap", "plot_retraining"]


def _subplots(n: int, axes: Any, width: float = 5.0, height: float = 3.2) -> Tuple[Any, Any]:
    import matplotlib.pyplot as plt
    import numpy as np

    if axes is not None:
        arr = np.atleast_1d(axes).reshape(-1)
        return arr[0].figure, arr
    fig, arr = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, arr.reshape(-1)


def plot_training_balance(result: Any, axes: Any = None) -> Tuple[Any, Any]:
    """Fig. 3a left: accuracies (left panel) and Ψ vs. Ψ^reg per window (right panel)."""
    fig, arr = _subplots(2, axes)
    viz.plot_curves({"train accuracy": result.train_acc, "test accuracy": result.test_acc}, ylabel="accuracy",
                    ax=arr[0])
    ends = [w.stop - 1 for w in result.windows]
    viz.plot_curves({"kernel importance Ψ": result.importance,
                     "regularization importance Ψ^reg": result.reg_importance},
                    x=ends, xlabel="training step (end of window)", ylabel="Σ |score| over predictions", ax=arr[1])
    fig.tight_layout()
    return fig, arr


def plot_layer_balance(result: Any, axes: Any = None) -> Tuple[Any, Any]:
    """Fig. 3a right: each layer's share of the importance per window, and D_s per layer."""
    n = 2 if result.reg_influence is not None else 1
    fig, arr = _subplots(n, axes)
    viz.plot_layer_influence(result.scores, names=result.layers, windows=result.windows, ax=arr[0])
    arr[0].set_title("share of importance Ψ_s(Θ_layer)", fontsize="small")
    if result.reg_influence is not None:
        ends = [w.stop - 1 for w in result.windows]
        viz.plot_curves({name: result.reg_influence[:, g] for g, name in enumerate(result.layers)}, x=ends,
                        xlabel="training step (end of window)", ylabel="D_s(Θ_layer)", ax=arr[1])
        arr[1].axhline(0, color="k", lw=0.5)
        arr[1].set_title("regularization influence (> 0: gradients dominate)", fontsize="small")
    fig.tight_layout()
    return fig, arr


def plot_sample_influence(result: Any, by: str = "sum", axes: Any = None) -> Tuple[Any, Any]:
    """Fig. 4: the influence matrices of the stages, rows and columns sorted by a+b or (a+b) mod p.

    Each stage has its own colour scale (influence differs by orders between stages), limited at
    the 99th percentile of |score| so that a few large scores do not wash out the pattern.
    """
    key = "a + b" if by == "sum" else f"(a + b) mod {result.p}"
    order = sorted(range(len(result.stages)), key=lambda k: result.stages[k].steps.start)  # in training order
    mats = [result.ordered(k, by) for k in order]
    return viz.plot_stage_grid(mats, titles=[str(result.stages[k]) for k in order], xlabel=f"training pairs by {key}",
                               ylabel=f"predictions by {key}", axes=axes, per_stage=True, quantile=0.99)


def plot_similarity_stages(result: Any, by: str = "sum", axes: Any = None) -> Tuple[Any, Any]:
    """Fig. 5: similarity matrices of the stages, sorted by a+b or (a+b) mod p."""
    key = "a + b" if by == "sum" else f"(a + b) mod {result.p}"
    mats = [result.ordered(k, by) for k in range(len(result.stages))]
    return viz.plot_stage_grid(mats, titles=[str(s) for s in result.stages], xlabel=f"predictions by {key}",
                               ylabel=f"predictions by {key}", vmax=1.0, axes=axes)


def plot_lasso(fit: Any, k: int = 15, ax: Any = None) -> Tuple[Any, Any]:
    """Fig. 9 / Table 2: the largest Lasso coefficients ("cos k": period k of a + b)."""
    return viz.plot_coefficients(fit.coefficients, k=k, title=f"Lasso on the similarity (R² = {fit.r2:.2f})", ax=ax)


def plot_layer_swap(result: Any, ax: Any = None) -> Tuple[Any, Any]:
    """Fig. 3b: test accuracy of checkpoints with one layer of the final model swapped in."""
    curves = {"checkpoint as is": result.baseline}
    curves.update({f"{name} from θ_N": result.accuracy[:, j] for j, name in enumerate(result.layers)})
    fig, ax = viz.plot_curves(curves, x=result.steps, xlabel="checkpoint (training step)", ylabel="test accuracy",
                              ax=ax)
    return fig, ax


def plot_retraining(result: Any, ax: Any = None) -> Tuple[Any, Any]:
    """Fig. 7 / 8: test accuracy while retraining from random with grokked layers kept."""
    curves = {f"{v} ({'never' if s is None else s} steps)": h.test_acc
              for v, s, h in zip(result.variants, result.steps_to_generalize, result.histories)}
    return viz.plot_curves(curves, ylabel="test accuracy", ax=ax)
