r"""Pruning by ExPLAIND importance, with the baselines it is compared to (paper Sec. 4.2, Fig. 2).

The importance of a parameter element is the paper's eq. 6, ``Ψ(θ) = Σ_x Σ_j |Ψ_j(θ, x)|``: the
absolute value of its exact contribution to output ``j`` of input ``x`` over training, summed over
a held-out set and the outputs. :func:`psi_importance` computes it with
:meth:`~captum_explaind.ParameterInfluence.pruning_scores` (one sweep per output), keyed the way
``torch.nn.utils.prune.global_unstructured(importance_scores=...)`` takes it, and
:func:`prune_global` prunes with it. The baselines: the weights' magnitude and random scores
through the same global unstructured pruning, and Li et al. (2017) filter pruning
(:func:`prune_filters_l1`: per convolution, the filters with the smallest L1 norm, with their
BatchNorm channel; retrain afterwards). :func:`compare_outputs` gives accuracy, agreement with the
unpruned model and the KL divergence to it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import prune

if TYPE_CHECKING:
    from .attr.parameter_influence import ParameterInfluence
    from .recording.trajectory import Trajectory

__all__ = ["model_at", "prunable_weights", "psi_importance", "magnitude_importance", "random_importance",
           "prune_global", "prune_filters_l1", "sparsity", "compare_outputs", "remove_reparametrization"]

Key = Tuple[nn.Module, str]


def model_at(model: nn.Module, trajectory: "Trajectory", step: Optional[int] = None) -> nn.Module:
    """A copy of ``model`` holding the recorded parameters and buffers of ``step`` (default: the
    last), in eval mode; the trajectory's frozen parameters are loaded too."""
    step = trajectory.num_steps if step is None else step
    out = copy.deepcopy(model)
    ref = next(iter(out.parameters()))
    state = dict(out.state_dict())
    loaded = {**trajectory.frozen_params(), **trajectory.params(step), **trajectory.buffers(step)}
    for k, v in loaded.items():
        if k in state:
            state[k] = v.to(device=ref.device, dtype=state[k].dtype)
    out.load_state_dict(state)
    return out.eval()


def prunable_weights(model: nn.Module, exclude: Iterable[Union[str, nn.Module]] = ()) -> List[Key]:
    """``(module, "weight")`` of every convolution and linear layer, except the ``exclude``d modules
    (names or module objects; e.g. the output layer)."""
    skip_names = {e for e in exclude if isinstance(e, str)}
    skip_ids = {id(e) for e in exclude if isinstance(e, nn.Module)}
    return [(m, "weight") for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and name not in skip_names and id(m) not in skip_ids]


def _weight(module: nn.Module, attr: str) -> torch.Tensor:
    # the original tensor while a pruning reparametrization is attached, else the parameter
    orig = getattr(module, attr + "_orig", None)
    return (orig if orig is not None else getattr(module, attr)).detach()


def psi_importance(explainer: "ParameterInfluence", inputs: Any, outputs: Sequence[int], model: nn.Module,
                   parameters: Optional[Sequence[Key]] = None, **kwargs: Any) -> Dict[Key, torch.Tensor]:
    r"""ExPLAIND importance (eq. 6) ``Σ_x Σ_j |Ψ_j(θ, x)|`` over ``inputs`` and ``outputs``.

    Args:
        explainer (ParameterInfluence): the model view of the recorded run.
        inputs: the held-out inputs.
        outputs (sequence of int): the output indices ``j`` (e.g. ``range(num_classes)``).
        model (nn.Module): the module the returned keys refer to (e.g. :func:`model_at`).
        parameters (list of (module, name), optional): which weights of ``model``; default
            :func:`prunable_weights` of ``model``.
        **kwargs: passed to :meth:`~captum_explaind.ParameterInfluence.pruning_scores`
            (``steps``, ``component``, ``additional_forward_args``).

    Returns:
        *dict[tuple[nn.Module, str], Tensor]*: importance per weight element, keyed by ``model``'s modules.
    """
    keys = prunable_weights(model) if parameters is None else list(parameters)
    names = {id(m): n for n, m in model.named_modules()}
    selected = [f"{names[id(m)]}.{a}" if names[id(m)] else a for m, a in keys]
    total: Dict[Key, torch.Tensor] = {}
    for j in outputs:
        part = explainer.pruning_scores(inputs, target=j, parameters=selected, model=model, **kwargs)
        for k, v in part.items():
            total[k] = total[k] + v if k in total else v
    return total


def magnitude_importance(params: Sequence[Key]) -> Dict[Key, torch.Tensor]:
    """``|w|`` of each weight (magnitude pruning)."""
    return {(m, a): _weight(m, a).abs() for m, a in params}


def random_importance(params: Sequence[Key], generator: Optional[torch.Generator] = None) -> Dict[Key, torch.Tensor]:
    """Uniform random scores (random pruning)."""
    return {(m, a): torch.rand(_weight(m, a).shape, generator=generator).to(_weight(m, a)) for m, a in params}


def prune_global(importance: Mapping[Key, torch.Tensor], amount: float) -> None:
    """Zero the fraction ``amount`` of all weights in ``importance`` with the lowest scores.

    ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured`` on ``importance_scores``
    (ties broken as torch does); the masks are attached as ``<name>_mask`` (see
    :func:`remove_reparametrization` to make them permanent).
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount!r}")
    params = list(importance)
    for m, a in params:
        if importance[(m, a)].shape != _weight(m, a).shape:
            raise ValueError(f"importance of {type(m).__name__}.{a} has shape {tuple(importance[(m, a)].shape)}, "
                             f"the weight {tuple(_weight(m, a).shape)}")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, importance_scores=dict(importance),
                              amount=amount)


def prune_filters_l1(model: nn.Module, amount: float, exclude: Iterable[Union[str, nn.Module]] = ()) -> None:
    """Li et al. (2017): in every convolution, prune the fraction ``amount`` of output filters with
    the smallest L1 norm (``prune.ln_structured``, n=1, dim=0), and the BatchNorm channel that
    follows each pruned filter (weight and bias), as removing the filter does. Linear layers are
    kept. Retrain afterwards (the masks stay attached during retraining)."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount!r}")
    skip = {id(e) for e in exclude if isinstance(e, nn.Module)} | {
        id(model.get_submodule(e)) for e in exclude if isinstance(e, str)}
    previous: Optional[nn.Module] = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in skip:
            prune.ln_structured(m, "weight", amount=amount, n=1, dim=0)
            previous = m
        elif isinstance(m, nn.BatchNorm2d) and previous is not None:
            kept = previous.get_buffer("weight_mask").flatten(1).amax(dim=1)  # [out_channels]
            if kept.numel() == m.num_features:
                prune.custom_from_mask(m, "weight", kept.to(m.weight))
                prune.custom_from_mask(m, "bias", kept.to(m.bias))
            previous = None
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d)):
            previous = None


def sparsity(params: Sequence[Key]) -> float:
    """Fraction of zero entries over the (masked) weights."""
    zeros = sum(int((getattr(m, a) == 0).sum()) for m, a in params)
    total = sum(getattr(m, a).numel() for m, a in params)
    return zeros / max(total, 1)


def remove_reparametrization(params: Sequence[Key]) -> None:
    """Make pruning permanent (``prune.remove``) where a mask is attached."""
    for m, a in params:
        if hasattr(m, a + "_mask"):
            prune.remove(m, a)


@torch.no_grad()
def compare_outputs(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Accuracy, agreement with the reference's predictions and mean ``KL(p_ref ‖ p)``.

    Args:
        reference (Tensor): ``[n, C]`` logits of the unpruned model.
        logits (Tensor): ``[n, C]`` logits of the pruned model.
        labels (Tensor): ``[n]`` true classes.

    Returns:
        *dict[str, float]*: ``accuracy``, ``agreement``, ``kl``.
    """
    ref_log, log = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (ref_log.exp() * (ref_log - log)).sum(-1).mean()
    pred = logits.argmax(-1)
    return {"accuracy": float((pred == labels).double().mean()),
            "agreement": float((pred == reference.argmax(-1)).double().mean()), "kl": float(kl)}
