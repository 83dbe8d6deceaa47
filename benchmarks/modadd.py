"""The paper's modular-addition Transformer at CPU scale: model, data and a recorded training run.

A clean re-implementation of the one-layer classifier the ExPLAIND authors train on modular
addition (``SingleLayerTransformerClassifier`` in ``explaind.modulo_model.model``, trained by
``experiments/train_models/modulo_model.py`` of mainlp/explaind):

* token embedding scaled by ``sqrt(d_model)``, **no positional encoding**;
* ``n_heads`` single-head attention blocks, each ``Linear(d, d/n_heads, bias=False)`` used as
  query = key = value in ``scaled_dot_product_attention``, followed by its own
  ``Linear(d/n_heads, d, bias=False)``; the heads' outputs are summed (no residual around
  attention);
* ReLU MLP with a residual: ``out = attn + relu(linear2(relu(linear1(attn))))``;
* ``decoder = Linear(d, n_token, bias=False)``; the output is the log-softmax of the last token.

Parameter names equal the authors' (``input_emb.weight``, ``head1_encoder.weight`` …,
``linear1.bias``, ``decoder.weight``), so a state dict of this model loads into theirs. Their
model additionally owns ``positional_encoding.pe``, a parameter its forward never uses (so it
never gets a gradient and AdamW never touches it); this model leaves it out.

Inputs are the four tokens ``(a, p, b, p + 1)`` ("a + b =") with ``a ≥ b`` as in the authors'
data generator, target ``(a + b) mod p``. Training is full-batch AdamW with the authors'
hyperparameters (``lr=1e-3``, ``weight_decay=4.0``, ``betas=(0.9, 0.98)``) on NLL of the
log-softmax outputs, recorded by :class:`captum_explaind.TrajectoryRecorder`.

Example::

    >>> from benchmarks.modadd import ModAddConfig, train
    >>> model, trajectory, data, seconds = train("runs/modadd", steps=200)
    >>> model(data.test_x).shape
    torch.Size([50, 25])
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from captum_explaind import Trajectory, TrajectoryRecorder

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
    """Architecture, data and optimizer settings (defaults: the benchmark's CPU-scale run).

    Attributes:
        p (int): the modulus; the vocabulary has ``p + 2`` tokens (digits, "+", "=").
        d_model (int): embedding width.
        n_heads (int): number of single-head attention blocks (the authors use 4).
        d_mlp (int): hidden width of the ReLU MLP.
        n_test (int): held-out test pairs (the benchmark's test batch).
        train_size (int, optional): training pairs; ``None``: every pair not in the test set.
        data_seed (int): seed of the train/test split.
        init_seed (int): seed of the parameter initialisation.
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


class ModAddTransformer(nn.Module):
    """One-layer attention + ReLU-MLP classifier with the authors' parameter names.

    Args:
        n_token (int): vocabulary size = number of output classes (``p + 2``).
        d_model (int, optional): embedding width. Default: 64
        n_heads (int, optional): number of single-head attention blocks. Default: 4
        d_mlp (int, optional): MLP hidden width. Default: 512

    Input: ``[n, L]`` token ids. Output: ``[n, n_token]`` log-probabilities of the last position.
    """

    def __init__(self, n_token: int, d_model: int = 64, n_heads: int = 4, d_mlp: int = 512) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        d_head = d_model // n_heads
        self.n_token = n_token
        self.d_model = d_model
        self.n_heads = n_heads
        self.input_emb = nn.Embedding(n_token, d_model)
        # Registration order = the authors' (all encoders, then all decoders), so that
        # ``named_parameters()`` and state dicts list the same keys in the same order.
        for i in range(1, n_heads + 1):
            self.add_module(f"head{i}_encoder", nn.Linear(d_model, d_head, bias=False))
        for i in range(1, n_heads + 1):
            self.add_module(f"head{i}_decoder", nn.Linear(d_head, d_model, bias=False))
        self.linear1 = nn.Linear(d_model, d_mlp)
        self.linear2 = nn.Linear(d_mlp, d_model)
        self.decoder = nn.Linear(d_model, n_token, bias=False)

    def heads(self) -> List[Tuple[nn.Linear, nn.Linear]]:
        """(encoder, decoder) pairs of the attention heads."""
        return [(getattr(self, f"head{i}_encoder"), getattr(self, f"head{i}_decoder")) for i in range(1, self.n_heads + 1)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.input_emb(tokens) * math.sqrt(self.d_model)
        outs = []
        for encoder, decoder in self.heads():
            h = encoder(x)
            h = F.scaled_dot_product_attention(h, h, h)
            outs.append(decoder(h))
        attn = torch.stack(outs).sum(dim=0)
        out = attn + F.relu(self.linear2(F.relu(self.linear1(attn))))
        return self.decoder(out)[:, -1, :].log_softmax(dim=-1)


@dataclass
class ModAddData:
    """Modular-addition pairs split into a training set and a test batch.

    Attributes:
        p (int): the modulus.
        train_x, train_y: ``[M, 4]`` int64 tokens ``(a, p, b, p+1)`` and ``[M]`` targets.
        test_x, test_y: the held-out test batch, same layout.
    """

    p: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])


def make_data(p: int = 23, n_test: int = 50, *, seed: int = 0, train_size: Optional[int] = None) -> ModAddData:
    """All pairs ``a ≥ b`` of ``Z_p`` (as the authors generate them), split at random.

    Args:
        p (int): modulus. Default: 23 (276 pairs)
        n_test (int): size of the test batch. Default: 50
        seed (int): seed of the split (numpy ``default_rng``). Default: 0
        train_size (int, optional): keep only this many training pairs. Default: all the rest

    Returns:
        *ModAddData*
    """
    pairs = [(b, a) for a in range(p) for b in range(a, p)]  # first operand ≥ second, as theirs
    n_pairs = len(pairs)
    if not 0 < n_test < n_pairs:
        raise ValueError(f"n_test must be in 1..{n_pairs - 1} for p={p}, got {n_test}")
    order = np.random.default_rng(seed).permutation(n_pairs)
    test_ids, train_ids = order[:n_test], order[n_test:]
    if train_size is not None:
        if not 0 < train_size <= len(train_ids):
            raise ValueError(f"train_size must be in 1..{len(train_ids)}, got {train_size}")
        train_ids = train_ids[:train_size]

    def encode(ids: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        ab = torch.tensor([pairs[i] for i in ids], dtype=torch.int64)
        a, b = ab[:, 0], ab[:, 1]
        x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
        return x, (a + b) % p

    train_x, train_y = encode(train_ids)
    test_x, test_y = encode(test_ids)
    return ModAddData(p=p, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def build_model(config: ModAddConfig = ModAddConfig(), *, seed: Optional[int] = None) -> ModAddTransformer:
    """A freshly initialised model (PyTorch default initialisers, ``scale_weights=1.0``)."""
    torch.manual_seed(config.init_seed if seed is None else seed)
    return ModAddTransformer(config.n_token, config.d_model, config.n_heads, config.d_mlp)


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
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
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
