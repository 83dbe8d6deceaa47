"""Layer swapping and retraining from grokked layers (the paper's Fig. 3b, 7 and 8).

* :func:`swap_layers` puts one layer group of the final (grokked) model into earlier checkpoints
  and measures the test accuracy: which layer, once grokked, carries the generalization.
* :func:`retrain_with` trains a fresh model whose chosen layers start from the grokked values
  (frozen by default) and reports how many steps it takes to generalize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .task import LAYERS, GrokRun, History, build_model, train

__all__ = ["SwapResult", "swap_layers", "layer_parameters", "RetrainResult", "retrain_with"]


def layer_parameters(model: nn.Module, layer: str) -> List[str]:
    """Names of the parameters of a :data:`LAYERS` group (glob selectors resolved)."""
    import fnmatch

    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {list(LAYERS)}, got {layer!r}")
    names = [n for n, _ in model.named_parameters()]
    out = [n for n in names if any(fnmatch.fnmatch(n.rsplit(".", 1)[0], sel) for sel in LAYERS[layer])]
    if not out:
        raise ValueError(f"layer {layer!r} selects no parameter of {type(model).__name__}")
    return out


@dataclass
class SwapResult:
    """Test accuracy of checkpoints with one layer group replaced by the final model's.

    Attributes:
        steps (list[int]): the checkpoints (θ_s after step s; 0 = initialization).
        layers (list[str]): the swapped layer groups.
        accuracy (Tensor): ``[n_steps, n_layers]`` test accuracy with that layer swapped in.
        baseline (Tensor): ``[n_steps]`` test accuracy of the unmodified checkpoint.
        final (float): test accuracy of the final model.
    """

    steps: List[int]
    layers: List[str]
    accuracy: torch.Tensor
    baseline: torch.Tensor
    final: float

    def plot(self, ax: Any = None) -> Any:
        from .plots import plot_layer_swap

        return plot_layer_swap(self, ax=ax)


def _accuracy(model: nn.Module, params: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    dev = next(model.parameters()).device  # a run trained on a GPU: the model there, the recording on the CPU
    with torch.no_grad():
        out = torch.func.functional_call(model, {k: v.to(dev) for k, v in params.items()}, (x.to(dev),))
    return float((out.argmax(-1) == y.to(dev)).double().mean())


def swap_layers(run: GrokRun, steps: Optional[Sequence[int]] = None, layers: Optional[Sequence[str]] = None,
                show_progress: bool = False) -> SwapResult:
    """Swap each layer group of θ_N into each checkpoint θ_s and measure the test accuracy (Fig. 3b).

    Args:
        run (GrokRun): the recorded run.
        steps (sequence of int, optional): checkpoints; ``None``: 20 evenly spaced from 0 to N.
        layers (sequence of str, optional): :data:`LAYERS` keys. Default: all six
        show_progress (bool): a progress bar over checkpoints. Default: False

    Returns:
        *SwapResult*
    """
    traj = run.recorded
    N = traj.num_steps
    steps = sorted({round(i * N / 19) for i in range(20)}) if steps is None else [int(s) for s in steps]
    if any(not 0 <= s <= N for s in steps):
        raise ValueError(f"steps must lie in 0..{N}, got {steps}")
    layers = list(LAYERS) if layers is None else list(layers)
    model, x, y = run.model, run.data.test_x, run.data.test_y
    final = {k: v.float() for k, v in traj.params(N).items()}
    groups = {name: layer_parameters(model, name) for name in layers}
    acc = torch.zeros(len(steps), len(layers), dtype=torch.float64)
    base = torch.zeros(len(steps), dtype=torch.float64)
    for i, s in enumerate(tqdm(steps, desc="layer swapping", disable=not show_progress)):
        theta = {k: v.float() for k, v in traj.params(s).items()}
        base[i] = _accuracy(model, theta, x, y)
        for j, name in enumerate(layers):
            swapped = dict(theta)
            swapped.update({k: final[k] for k in groups[name]})
            acc[i, j] = _accuracy(model, swapped, x, y)
    return SwapResult(steps=steps, layers=layers, accuracy=acc, baseline=base, final=_accuracy(model, final, x, y))


@dataclass
class RetrainResult:
    """Steps to generalize when retraining from random with some grokked layers (Fig. 7 / 8).

    Attributes:
        variants (list[str]): ``"from scratch"`` and one entry per set of kept layers.
        kept (list[list[str]]): the layer groups taken from θ_N for each variant.
        steps_to_generalize (list[int or None]): first step at which the test accuracy reached
            ``level`` (``None``: not within the budget).
        histories (list[History]): the training curves.
        level (float): the test accuracy counted as generalized. frozen (bool): kept layers fixed.
        models (list[nn.Module]): the retrained models.
    """

    variants: List[str]
    kept: List[List[str]]
    steps_to_generalize: List[Optional[int]]
    histories: List[History]
    level: float
    frozen: bool
    models: List[Any]

    def plot(self, ax: Any = None) -> Any:
        from .plots import plot_retraining

        return plot_retraining(self, ax=ax)


ATTENTION = ("attention encoder", "attention decoder")


def retrain_with(run: GrokRun, keep: Sequence[Sequence[str]] = (ATTENTION, ATTENTION + ("linear 1",)),
                 freeze: bool = True, seed: Optional[int] = None, level: float = 1.0, max_steps: Optional[int] = None,
                 show_progress: bool = False, device: Union[str, torch.device] = "cpu") -> RetrainResult:
    """Retrain from a fresh initialization with layer groups of θ_N kept (Fig. 3b right, 7, 8).

    Args:
        run (GrokRun): the recorded (grokked) run.
        keep (sequence of sequences of str): for each variant, the :data:`LAYERS` groups taken
            from the final model. A "from scratch" baseline is always trained first.
        freeze (bool): keep those layers fixed during retraining. Default: True
        seed (int, optional): initialization seed of the fresh model; ``None``: ``init_seed + 1``
            (a different initialization than the original run).
        level (float): test accuracy counted as generalized. Default: 1.0
        max_steps (int, optional): budget per variant; ``None``: the original run's length + 50 %.
        show_progress (bool): progress bars. Default: False
        device (str or torch.device): where to train. Default: "cpu"

    Returns:
        *RetrainResult*
    """
    cfg = run.config
    seed = cfg.init_seed + 1 if seed is None else seed
    budget = max_steps if max_steps is not None else int(1.5 * run.steps) + 1
    cfg = type(cfg)(**{**cfg.to_dict(), "max_steps": budget, "target_test_acc": level})
    final = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    variants, kept_all, stg, hist, models = [], [], [], [], []
    for kept in [()] + [tuple(k) for k in keep]:
        model = build_model(cfg, seed=seed)
        names = [n for layer in kept for n in layer_parameters(model, layer)]
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if n in names:
                    prm.copy_(final[n])
        r = train(None, cfg, data=run.data, model=model, freeze=tuple(names) if freeze else (),
                  show_progress=show_progress, device=device)
        variants.append("from scratch" if not kept else "grokked " + " + ".join(kept))
        kept_all.append(list(kept))
        stg.append(r.history.first_step("test_acc", level))
        hist.append(r.history)
        models.append(r.model)
    return RetrainResult(variants=variants, kept=kept_all, steps_to_generalize=stg, histories=hist, level=level,
                         frozen=freeze, models=models)
