"""The paper's modular-addition Transformer at CPU scale: a recorded run for the peer benchmarks.

The task and model live in :mod:`captum_explaind.grokking` (one module for the demo, the
tutorials, the benchmarks and the tests); this file keeps the benchmarks' own workload on top of
it: ``p = 23``, the pairs ``a ≥ b`` (the authors' generator, on which the tables in
``benchmarks/results/`` were recorded), 50 test pairs, and a fixed number of full-batch AdamW
steps with the authors' hyperparameters (``lr=1e-3``, ``weight_decay=4.0``, ``betas=(0.9, 0.98)``),
recorded by :class:`captum_explaind.TrajectoryRecorder`. Parameter names equal the authors'
(``input_emb.weight``, ``head1_encoder.weight`` …, ``decoder.weight``), so a state dict loads into
their ``SingleLayerTransformerClassifier`` (which also owns an unused ``positional_encoding.pe``).

Example::

    >>> from benchmarks.modadd import ModAddConfig, train
    >>> model, trajectory, data, seconds = train("runs/modadd", steps=200)
    >>> model(data.test_x).shape
    torch.Size([50, 25])
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from captum_explaind import Trajectory, TrajectoryRecorder
from captum_explaind.grokking import GrokConfig, ModAddData, ModAddTransformer, make_optimizer
from captum_explaind.grokking import build_model as _build_model
from captum_explaind.grokking import make_data as _make_data

__all__ = [
    "ModAddConfig",
    "ModAddTransformer",
    "ModAddData",
    "TrainedRun",
    "make_data",
    "build_model",
    "train",
    "forward_at",
]


@dataclass(frozen=True)
class ModAddConfig:
    """Architecture, data and optimizer settings of the benchmarks' CPU-scale run.

    Attributes:
        p (int): the modulus; the vocabulary has ``p + 2`` tokens (digits, "+", "=").
        d_model (int), n_heads (int), d_mlp (int): the model (:class:`ModAddTransformer`).
        n_test (int): held-out test pairs (the benchmark's test batch).
        train_size (int, optional): training pairs; ``None``: every pair not in the test set.
        data_seed (int), init_seed (int): seeds of the split and of the initialisation.
        lr, weight_decay, betas, eps: AdamW hyperparameters (the authors' script's values).
    """

    p: int = 23
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 512
    n_test: int = 50
    train_size: Optional[int] = None
    data_seed: int = 0
    init_seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 4.0
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8

    @property
    def n_token(self) -> int:
        return self.p + 2

    def grok_config(self) -> GrokConfig:
        """The same settings as a :class:`~captum_explaind.grokking.GrokConfig` (pairs a ≥ b)."""
        return GrokConfig(p=self.p, n_train=self.train_size, n_test=self.n_test, d_model=self.d_model,
                          n_heads=self.n_heads, d_mlp=self.d_mlp, lr=self.lr, weight_decay=self.weight_decay,
                          betas=self.betas, eps=self.eps, include_equal=True, data_seed=self.data_seed,
                          init_seed=self.init_seed)


def make_data(p: int = 23, n_test: int = 50, *, seed: int = 0, train_size: Optional[int] = None) -> ModAddData:
    """All pairs ``a ≥ b`` of ``Z_p`` (the authors' generator), split at random (the benchmarks' split)."""
    return _make_data(p, train_size, n_test, seed=seed, include_equal=True)


def build_model(config: ModAddConfig = ModAddConfig(), *, seed: Optional[int] = None) -> ModAddTransformer:
    """A freshly initialised model (PyTorch default initialisers, ``scale_weights=1.0``)."""
    return _build_model(config.grok_config(), seed=seed)


class TrainedRun(NamedTuple):
    """What :func:`train` returns (unpacks as ``model, trajectory, data, train_seconds``)."""

    model: ModAddTransformer
    trajectory: Trajectory
    data: ModAddData
    train_seconds: float


def train(
    path: Union[str, os.PathLike],
    steps: int = 200,
    config: ModAddConfig = ModAddConfig(),
    *,
    data: Optional[ModAddData] = None,
    verbose: bool = False,
) -> TrainedRun:
    """Train the model full-batch with AdamW for ``steps`` steps, recording every step.

    A fixed number of steps and no per-step evaluation (unlike
    :func:`captum_explaind.grokking.train`), so that the training time the benchmarks compare
    against is the training loop with recording alone.

    Args:
        path (str or os.PathLike): trajectory directory (replaced if it holds a trajectory).
        steps (int): optimizer steps (= epochs: one full batch per step). Default: 200
        config (ModAddConfig): architecture, data and optimizer settings.
        data (ModAddData, optional): the split to use; ``None``: :func:`make_data` from ``config``.
        verbose (bool): print loss and accuracies at the end. Default: False

    Returns:
        *TrainedRun*: the model at θ_N (float32, train mode), the recorded :class:`Trajectory`,
        the data, and the wall time of the training loop including recording.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if data is None:
        data = make_data(config.p, config.n_test, seed=config.data_seed, train_size=config.train_size)
    model = build_model(config)
    optimizer = make_optimizer(model, config.grok_config())
    x, y = data.train_x, data.train_y
    indices = torch.arange(data.n_train)
    model.train()
    start = time.perf_counter()
    recorder = TrajectoryRecorder(model, optimizer, path, overwrite=True)
    with recorder:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            recorder.log_batch(indices)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    trajectory = recorder.trajectory
    if verbose:
        with torch.no_grad():
            out_train, out_test = model(x), model(data.test_x)
        print(
            f"trained {steps} full-batch AdamW steps on {data.n_train} pairs (p={data.p}) in {seconds:.2f} s: "
            f"train loss {F.nll_loss(out_train, y).item():.4f}, "
            f"train acc {(out_train.argmax(1) == y).float().mean().item():.3f}, "
            f"test acc {(out_test.argmax(1) == data.test_y).float().mean().item():.3f}"
        )
    return TrainedRun(model, trajectory, data, seconds)


def forward_at(
    model: nn.Module,
    params: Dict[str, torch.Tensor],
    inputs: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``f(θ; inputs)`` for the parameters ``params`` (by name), evaluated in ``dtype``.

    The model is evaluated functionally (its own weights are not touched); parameters missing
    from ``params`` keep the model's values, cast to ``dtype``.
    """
    full = {n: p.detach() for n, p in model.named_parameters()}
    full.update(params)
    full = {n: t.to(dtype) for n, t in full.items()}
    with torch.no_grad():
        return functional_call(model, full, (inputs,))
