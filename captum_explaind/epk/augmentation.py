"""Random augmentation in a training dataset: found, named and warned about.

The data and similarity views replay every recorded step's per-sample gradients by fetching the
samples again (``train_dataset[i]``). A dataset whose items are drawn through random transforms
(``RandomCrop``, ``RandomHorizontalFlip``, ``ColorJitter``, ...) returns a *different* image on
each fetch, so the replayed gradients are not the ones training applied: the scores then explain
the un-augmented samples (or a fresh random draw), and what the recorded updates hold beyond them
is the ``residual`` of the result — reported, never folded into the scores. This is not replayed
exactly: the draw happens in the data pipeline (possibly in worker processes), outside anything
the recorder sees. To explain the augmented run exactly, make the transform a function of the
index (e.g. seed it with ``hash((epoch, index))``) and log each micro-batch's indices into a
dataset that reproduces those draws.

:func:`random_transforms` probes a dataset: it fetches a few items several times (under a forked RNG, so
the caller's random state is untouched) and compares, and it names the transforms it finds on the
dataset (``transform``/``transforms`` attributes, through ``Compose`` and ``Subset``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, List, Sequence

import torch

__all__ = ["random_transforms", "warn_if_random"]

#: class-name markers of random transforms (torchvision v1 and v2, albumentations-style names)
_RANDOM_NAMES = ("Random", "ColorJitter", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix", "Jitter",
                 "GaussianBlur", "ElasticTransform", "MixUp", "CutMix")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        import numpy as np

        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==: assume equal (no evidence of randomness)
        return True


def _transform_names(dataset: Any, depth: int = 0) -> List[str]:
    """Names of the random-looking transforms attached to ``dataset`` (recursing into wrappers)."""
    if depth > 4 or dataset is None:
        return []
    found: List[str] = []

    def walk(t: Any) -> None:
        if t is None:
            return
        name = type(t).__name__
        if any(marker in name for marker in _RANDOM_NAMES):
            found.append(name)
        for child in getattr(t, "transforms", None) or []:  # Compose, RandomApply, ...
            walk(child)

    for attr in ("transform", "transforms", "target_transform"):
        t = getattr(dataset, attr, None)
        if isinstance(t, Sequence) and not isinstance(t, str):
            for item in t:
                walk(item)
        else:
            walk(t)
    found += _transform_names(getattr(dataset, "dataset", None), depth + 1)  # Subset and similar wrappers
    return list(dict.fromkeys(found))


def random_transforms(dataset: Any, probe: int = 4, draws: int = 3) -> List[str]:
    """Why ``dataset`` cannot be replayed exactly, or ``[]``.

    Args:
        dataset: a map-style dataset.
        probe (int): items fetched repeatedly and compared. Default: 4
        draws (int): fetches of each (a flip with p=½ escapes 4 items × 3 draws with chance 1/256).
            Default: 3

    Returns:
        *list[str]*: the random transforms found by name, or ``[type(dataset).__name__]`` when
        fetching the same index twice gave different items but no transform was named; empty
        when the items are reproducible.
    """
    n = len(dataset)
    differs = False
    with torch.random.fork_rng(devices=[]):
        for i in range(min(probe, n)):
            first = dataset[i]
            if any(not _same(first, dataset[i]) for _ in range(draws - 1)):
                differs = True
                break
    names = _transform_names(dataset)
    if differs and not names:
        names = [type(dataset).__name__]
    return names if differs else []


def warn_if_random(dataset: Any) -> List[str]:
    """Warn (naming them) when ``dataset``'s items come from random transforms; returns the names."""
    names = random_transforms(dataset)
    if names:
        warnings.warn(
            f"train_dataset {type(dataset).__name__} returns a different item for the same index (random "
            f"augmentation: {', '.join(names)}): the data view cannot replay the recorded per-sample gradients "
            "exactly; what the recorded updates hold beyond the replayed ones is reported as `residual`. Pass the "
            "dataset without its random transforms to explain the un-augmented samples, or make the transform a "
            "function of the index to replay it exactly (see docs/vision.md)",
            UserWarning,
            stacklevel=4,
        )
    return names
