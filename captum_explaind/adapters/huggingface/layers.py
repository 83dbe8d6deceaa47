"""Layer groups named after a transformer's modules, for ``layers=`` of the attribution classes."""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple

from torch import nn

__all__ = ["layer_groups", "find_blocks"]

_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "intermediate", "output", "ffn", "feed_forward", "fc1", "fc2", "c_fc", "dense_h_to_4h")


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the ``nn.ModuleList`` holding most parameters.

    Raises:
        ValueError: the model has no ``nn.ModuleList`` of blocks.
    """
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return best[1], best[2]


def _part(relative: str) -> str:
    """``attention``, ``mlp`` or ``norm`` for a parameter name relative to its block."""
    parts = relative.split(".")[:-1]
    if any(any(a in p.lower() for a in _ATTENTION) for p in parts):
        return "attention"
    if any(p.lower() in _MLP or p.lower().startswith("mlp") for p in parts):
        return "mlp"
    return "norm"


def layer_groups(model: nn.Module, sublayers: bool = False, trainable_only: bool = True) -> "OrderedDict[str, List[str]]":
    """Groups of parameter names that partition a transformer: ``embeddings``, ``block.0`` …
    ``block.{L-1}`` (or, with ``sublayers``, ``block.i.attention`` / ``block.i.mlp`` /
    ``block.i.norm``), ``final`` (the base model's parts after the blocks: pooler, final norm) and
    ``head`` (the task head). Pass the result as ``layers=`` to ``ParameterInfluence``,
    ``StepInfluence`` or ``TrainingDataInfluence``; the group scores sum to the total.

    Works on ``peft`` models too (LoRA weights sit in the group of the layer they adapt).

    Args:
        model (nn.Module): a transformers model (or a ``PeftModel`` around one).
        sublayers (bool, optional): split every block into attention, MLP and the remaining
            normalization parameters (layer norms outside the attention and MLP modules).
            Default: False
        trainable_only (bool, optional): leave out parameters with ``requires_grad=False`` (a
            frozen base under LoRA) and groups that end up empty. Default: True

    Returns:
        *OrderedDict[str, list[str]]*: group name → parameter names, in model order.
    """
    prefix, blocks = find_blocks(model)
    base = prefix.rsplit(".", 2)[0] if prefix.count(".") >= 1 else ""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    seen_blocks = False
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if name.startswith(prefix + "."):
            seen_blocks = True
            index, relative = name[len(prefix) + 1 :].split(".", 1)
            key = f"block.{index}" + (f".{_part(relative)}" if sublayers else "")
        elif not seen_blocks:
            key = "embeddings"
        elif base and name.startswith(base + "."):
            key = "final"
        else:
            key = "head"
        groups.setdefault(key, []).append(name)
    if sublayers:
        # A stable order: attention, mlp, norm inside each block.
        order = {"attention": 0, "mlp": 1, "norm": 2}

        def rank(item):  # type: ignore[no-untyped-def]
            key = item[0]
            if key.startswith("block."):
                _, i, part = key.split(".")
                return (1, int(i), order[part])
            return ({"embeddings": 0, "final": 2, "head": 3}[key], 0, 0)

        groups = OrderedDict(sorted(groups.items(), key=rank))
    return groups
