"""The Grokking task of the ExPLAIND paper (Sec. 5, App. C.2): data, model and recorded training.

One module for the modular-addition study, used by the demo, the tutorials, the benchmarks and
the tests.

* **Data**: all pairs ``a > b`` of ``Z_p`` (``p = 113``: 6,328 pairs), tokens ``[a][+][b][=]``
  encoded as ``(a, p, b, p + 1)``, label ``(a + b) mod p``; a random split into training and
  test pairs (the paper: 4,000 / 2,000).
* **Model** (:class:`ModAddTransformer`): one layer, token embedding scaled by ``sqrt(d)``, **no
  positional encoding**, ``n_heads`` single-head attention blocks (``Linear(d, d/h)`` used as
  query = key = value, then ``Linear(d/h, d)``; heads summed), a ReLU MLP with a residual, and a
  decoder to the vocabulary; output: log-probabilities at the last token. Parameter names are the
  authors' (``input_emb``, ``head1_encoder`` …, ``linear1``, ``linear2``, ``decoder``).
* **Training** (:func:`train`): full-batch AdamW (lr 1e-3, weight decay 4.0) on the NLL, every
  step recorded by :class:`~captum_explaind.TrajectoryRecorder`, until the test accuracy reaches
  a target (100 %) or a step budget. Betas: ``(0.9, 0.98)``, the authors' released training
  script (the paper's text says ``(0.98, 0.99)``); see :class:`GrokConfig`.

Example::

    >>> from captum_explaind.grokking import GrokConfig, train
    >>> run = train("runs/grok", GrokConfig.small())
    >>> run.history.test_acc[-1]
    1.0
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..recording import Trajectory, TrajectoryRecorder

__all__ = [
    "GrokConfig",
    "ModAddData",
    "ModAddTransformer",
    "History",
    "GrokRun",
    "LAYERS",
    "make_data",
    "build_model",
    "make_optimizer",
    "train",
    "load_run",
    "accuracy",
]

#: The paper's six layer groups (Fig. 3a right), as selectors of :class:`ModAddTransformer`.
LAYERS: Dict[str, List[str]] = {
    "embedding": ["input_emb"],
    "attention encoder": ["head*_encoder"],
    "attention decoder": ["head*_decoder"],
    "linear 1": ["linear1"],
    "linear 2": ["linear2"],
    "decoder": ["decoder"],
}


@dataclass(frozen=True)
class GrokConfig:
    """Task, architecture and optimizer settings (defaults: the paper's full configuration).

    Attributes:
        p (int): the modulus; the vocabulary has ``p + 2`` tokens (residues, "+", "=").
        n_train (int or None): training pairs; ``None``: every pair not in the test set.
        n_test (int): held-out test pairs.
        d_model (int): embedding width. n_heads (int): attention heads (``d_model / n_heads``
            each). d_mlp (int): hidden width of the ReLU MLP.
        lr, weight_decay, betas, eps: AdamW's hyperparameters. ``betas=(0.9, 0.98)`` are those of
            the authors' released script, which produced the paper's figures; the paper's text
            states ``(0.98, 0.99)`` (pass ``betas=(0.98, 0.99)`` to use them).
        max_steps (int): step budget. target_test_acc (float): stop once the test accuracy
            reaches it (checked after every step). Default: 1.0
        include_equal (bool): also use the pairs ``a == b`` (the authors' generator has
            ``a >= b``); the paper counts 6,328 pairs for p = 113, i.e. ``a > b``. Default: False
        data_seed (int), init_seed (int): seeds of the split and of the initialisation.
    """

    p: int = 113
    n_train: Optional[int] = 4000
    n_test: int = 2000
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 512
    lr: float = 1e-3
    weight_decay: float = 4.0
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    max_steps: int = 20000
    target_test_acc: float = 1.0
    include_equal: bool = False
    data_seed: int = 0
    init_seed: int = 0

    @property
    def n_token(self) -> int:
        return self.p + 2

    @classmethod
    def paper(cls, **overrides: Any) -> "GrokConfig":
        """The paper's configuration (p = 113, 4,000 / 2,000 pairs, d = 64, 4 heads, MLP 512)."""
        return replace(cls(), **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> "GrokConfig":
        """A CPU-sized configuration that groks in about a minute on 2 cores (``benchmarks/grokking_search.py``).

        p = 37 (666 pairs ``a > b``, 566 training / 100 test), d = 32 with 2 heads of 16, MLP 128,
        full-batch AdamW with lr 1e-2 and weight decay 1.0 (the paper's betas), at most 4,000 steps.
        Seed 0 memorizes (100 % training accuracy) at step 778 and reaches 100 % test accuracy at
        step 2,217 (47 s of training on a shared 2-core machine). The seed search in
        ``benchmarks/results/grokking_search.md`` ran the full-sequence forward (929 / 1,954 steps):
        the same model and function, but its rounding differs, and grokking amplifies that.
        """
        base = cls(p=37, n_train=566, n_test=100, d_model=32, n_heads=2, d_mlp=128, lr=1e-2, weight_decay=1.0,
                   max_steps=4000)
        return replace(base, **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "GrokConfig":
        """A few seconds' run for tests and the notebook at tiny size (does not grok)."""
        base = cls(p=11, n_train=35, n_test=20, d_model=16, n_heads=2, d_mlp=32, lr=1e-2, weight_decay=1.0,
                   max_steps=40, target_test_acc=2.0)
        return replace(base, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class ModAddTransformer(nn.Module):
    """One-layer attention + ReLU-MLP classifier with the authors' parameter names.

    Args:
        n_token (int): vocabulary size = number of output classes (``p + 2``).
        d_model (int, optional): embedding width. Default: 64
        n_heads (int, optional): number of single-head attention blocks. Default: 4
        d_mlp (int, optional): MLP hidden width. Default: 512

    Input: ``[n, L]`` token ids. Output: ``[n, n_token]`` log-probabilities at the last position.
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
        # named_parameters() and state dicts list the same keys in the same order.
        for i in range(1, n_heads + 1):
            self.add_module(f"head{i}_encoder", nn.Linear(d_model, d_head, bias=False))
        for i in range(1, n_heads + 1):
            self.add_module(f"head{i}_decoder", nn.Linear(d_head, d_model, bias=False))
        self.linear1 = nn.Linear(d_model, d_mlp)
        self.linear2 = nn.Linear(d_mlp, d_model)
        self.decoder = nn.Linear(d_model, n_token, bias=False)

    def heads(self) -> List[Tuple[nn.Linear, nn.Linear]]:
        """(encoder, decoder) pairs of the attention heads."""
        return [(getattr(self, f"head{i}_encoder"), getattr(self, f"head{i}_decoder"))
                for i in range(1, self.n_heads + 1)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.input_emb(tokens) * math.sqrt(self.d_model)
        outs = []
        # Only the last position is read out, and the MLP and decoder act position-wise in this
        # one-layer model: attending from the last query alone and running the MLP there gives the
        # same numbers as the full sequence (bit-identical here) at a quarter of the MLP's cost —
        # and the ReLUs of the unread positions would add kinks that the exact integration has to
        # split at although they never change the output.
        for encoder, decoder in self.heads():
            h = encoder(x)
            outs.append(decoder(F.scaled_dot_product_attention(h[:, -1:], h, h)))
        attn = torch.stack(outs).sum(dim=0)[:, 0]
        out = attn + F.relu(self.linear2(F.relu(self.linear1(attn))))
        return self.decoder(out).log_softmax(dim=-1)


@dataclass
class ModAddData:
    """Modular-addition pairs split into training and test sets.

    Attributes:
        p (int): the modulus.
        train_x, test_x (Tensor): ``[M, 4]`` int64 tokens ``(a, p, b, p + 1)``.
        train_y, test_y (Tensor): ``[M]`` labels ``(a + b) mod p``.
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

    @property
    def train_set(self) -> torch.utils.data.TensorDataset:
        """The training pairs as a dataset of ``(tokens, label)`` (the data view's ``train_dataset``)."""
        return torch.utils.data.TensorDataset(self.train_x, self.train_y)

    def operands(self, split: str = "test") -> Tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` of the ``"train"`` or ``"test"`` pairs."""
        x = self.test_x if split == "test" else self.train_x
        return x[:, 0], x[:, 2]

    def labels(self, split: str = "test") -> List[str]:
        """``"a+b"`` strings for axis labels."""
        a, b = self.operands(split)
        return [f"{int(i)}+{int(j)}" for i, j in zip(a, b)]


def make_data(p: int = 113, n_train: Optional[int] = 4000, n_test: int = 2000, *, seed: int = 0,
              include_equal: bool = False) -> ModAddData:
    """All pairs ``a > b`` (or ``a ≥ b``) of ``Z_p``, split at random into training and test pairs.

    Args:
        p (int): the modulus (≥ 3). Default: 113 (6,328 pairs)
        n_train (int or None): training pairs; ``None``: all pairs not in the test set. Default: 4000
        n_test (int): test pairs. Default: 2000
        seed (int): seed of the split (numpy ``default_rng``). Default: 0
        include_equal (bool): include ``a == b``. Default: False

    Returns:
        *ModAddData*
    """
    if p < 3:
        raise ValueError(f"p must be at least 3, got {p}")
    low = 0 if include_equal else 1
    # Enumerated as the authors' generator does (by second operand, then first), so a seed gives their split.
    pairs = [(a, b) for b in range(p) for a in range(b + low, p)]
    n_pairs = len(pairs)
    if not 0 < n_test < n_pairs:
        raise ValueError(f"n_test must be in 1..{n_pairs - 1} for p={p} ({n_pairs} pairs), got {n_test}")
    if n_train is not None and not 0 < n_train <= n_pairs - n_test:
        raise ValueError(f"n_train must be in 1..{n_pairs - n_test} for p={p} and n_test={n_test}, got {n_train}")
    order = np.random.default_rng(seed).permutation(n_pairs)
    test_ids = order[:n_test]
    train_ids = order[n_test:] if n_train is None else order[n_test : n_test + n_train]

    def encode(ids: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        ab = torch.tensor([pairs[i] for i in ids], dtype=torch.int64).reshape(-1, 2)
        a, b = ab[:, 0], ab[:, 1]
        x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
        return x, (a + b) % p

    train_x, train_y = encode(train_ids)
    test_x, test_y = encode(test_ids)
    return ModAddData(p=p, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def build_model(config: GrokConfig = GrokConfig(), *, seed: Optional[int] = None) -> ModAddTransformer:
    """A freshly initialised model (PyTorch's default initialisers), seeded by ``config.init_seed``."""
    torch.manual_seed(config.init_seed if seed is None else seed)
    return ModAddTransformer(config.n_token, config.d_model, config.n_heads, config.d_mlp)


def make_optimizer(model: nn.Module, config: GrokConfig) -> torch.optim.AdamW:
    """Full-batch AdamW with the configuration's hyperparameters."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` whose arg-max prediction is ``y``."""
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


@dataclass
class History:
    """Per-step training curves: ``loss[s-1]``, ``train_acc[s-1]``, ``test_acc[s-1]`` after step ``s``."""

    loss: List[float] = field(default_factory=list)
    train_acc: List[float] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)

    def first_step(self, which: str = "test_acc", level: float = 1.0) -> Optional[int]:
        """The first step (1-based) at which ``which`` reached ``level``, or ``None``."""
        for s, v in enumerate(getattr(self, which), start=1):
            if v >= level:
                return s
        return None


@dataclass
class GrokRun:
    """A recorded training run: the model at θ_N, its trajectory, data, curves and timing."""

    model: nn.Module
    trajectory: Optional[Trajectory]
    data: ModAddData
    config: GrokConfig
    history: History
    train_seconds: float

    @property
    def recorded(self) -> Trajectory:
        """The trajectory (an error naming the problem if the run was trained without recording)."""
        if self.trajectory is None:
            raise ValueError("this run was trained without recording; pass a path to train(path, ...)")
        return self.trajectory

    @property
    def steps(self) -> int:
        return len(self.history.loss)

    @property
    def grokked(self) -> bool:
        return bool(self.history.test_acc) and self.history.test_acc[-1] >= self.config.target_test_acc


def train(
    path: Union[str, os.PathLike, None],
    config: GrokConfig = GrokConfig(),
    *,
    data: Optional[ModAddData] = None,
    model: Optional[nn.Module] = None,
    freeze: Tuple[str, ...] = (),
    device: Union[str, torch.device] = "cpu",
    show_progress: bool = False,
) -> GrokRun:
    """Full-batch AdamW on the NLL until the test accuracy reaches the target (or ``max_steps``).

    Args:
        path (str, os.PathLike or None): trajectory directory (replaced if it holds one);
            ``None`` trains without recording (e.g. retraining experiments).
        config (GrokConfig): task, model and optimizer settings. Default: the paper's
        data (ModAddData, optional): the split; ``None``: :func:`make_data` from ``config``.
        model (nn.Module, optional): start from this model (e.g. with swapped-in layers);
            ``None``: :func:`build_model`.
        freeze (tuple[str], optional): parameter-name prefixes kept fixed (not optimized).
        device (str or torch.device): where to train. Default: "cpu"
        show_progress (bool): a tqdm bar over steps with the accuracies. Default: False

    Returns:
        *GrokRun* (model on CPU in train mode).
    """
    if data is None:
        data = make_data(config.p, config.n_train, config.n_test, seed=config.data_seed,
                         include_equal=config.include_equal)
    model = build_model(config) if model is None else model
    model = model.to(device)
    for name, prm in model.named_parameters():
        prm.requires_grad_(not any(name.startswith(f) for f in freeze))
    trainable = [prm for prm in model.parameters() if prm.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    x, y = data.train_x.to(device), data.train_y.to(device)
    xt, yt = data.test_x.to(device), data.test_y.to(device)
    indices = torch.arange(data.n_train)
    history = History()
    recorder = TrajectoryRecorder(model, optimizer, path, overwrite=True) if path is not None else None
    from tqdm.auto import tqdm

    bar = tqdm(total=config.max_steps, desc="training", disable=not show_progress)
    model.train()
    start = time.perf_counter()
    if recorder is not None:
        recorder.__enter__()
    try:
        for _ in range(config.max_steps):
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            if recorder is not None:
                recorder.log_batch(indices)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # both accuracies at θ_s, in one forward pass
                pred = model(torch.cat([x, xt])).argmax(-1)
                history.loss.append(float(loss))
                history.train_acc.append(float((pred[: len(y)] == y).double().mean()))
                history.test_acc.append(float((pred[len(y) :] == yt).double().mean()))
            bar.update(1)
            if bar.n % 20 == 0:
                bar.set_postfix(train=f"{history.train_acc[-1]:.2f}", test=f"{history.test_acc[-1]:.2f}")
            if history.test_acc[-1] >= config.target_test_acc:
                break
    finally:
        if recorder is not None:
            recorder.__exit__(None, None, None)
        bar.close()
    seconds = time.perf_counter() - start
    model = model.cpu()
    return GrokRun(model, recorder.trajectory if recorder is not None else None, data, config, history, seconds)


def load_run(path: Union[str, os.PathLike], config: GrokConfig = GrokConfig(), *, train_seconds: float = float("nan"),
             data: Optional[ModAddData] = None, history_file: Union[str, os.PathLike, None] = None,
             show_progress: bool = False) -> GrokRun:
    """A :class:`GrokRun` from a trajectory recorded earlier by :func:`train` with ``config``.

    The curves are recomputed from the recorded parameters θ_s (one forward pass over the
    training and test pairs per step), the loss being the full-batch NLL at θ_{s−1} that step s
    descended. The model ends at θ_N.

    Args:
        path (str or os.PathLike): the trajectory directory.
        config (GrokConfig): the configuration it was trained with (data split and architecture).
        train_seconds (float): the training time measured when it was recorded. Default: nan
        data (ModAddData, optional): the split; ``None``: :func:`make_data` from ``config``.
        history_file (str or os.PathLike, optional): a JSON file caching the curves: read if it
            exists (and holds one entry per recorded step), else written. Default: None
        show_progress (bool): a tqdm bar over the steps. Default: False

    Returns:
        *GrokRun*
    """
    from tqdm.auto import tqdm

    traj = Trajectory.open(path)
    if data is None:
        data = make_data(config.p, config.n_train, config.n_test, seed=config.data_seed,
                         include_equal=config.include_equal)
    model = build_model(config)
    names = dict(model.named_parameters())
    recorded = traj.params(0)
    if set(recorded) != set(names) or any(recorded[k].shape != names[k].shape for k in names):
        raise ValueError(f"the trajectory at {path} was not recorded from a model built with {config}")
    model.load_state_dict(traj.params(traj.num_steps), strict=False)
    if history_file is not None and os.path.exists(history_file):
        with open(history_file) as fh:
            history = History(**json.load(fh))
        if len(history.loss) != traj.num_steps:
            raise ValueError(f"{history_file} holds {len(history.loss)} steps, the trajectory {traj.num_steps}")
        return GrokRun(model, traj, data, config, history, train_seconds)
    x = torch.cat([data.train_x, data.test_x])
    history = History()
    with torch.no_grad():
        # one forward pass per θ_s: its training part is also the loss that step s + 1 descended
        prev = torch.func.functional_call(model, traj.params(0), (data.train_x,))
        for s in tqdm(range(1, traj.num_steps + 1), desc="accuracy curves", disable=not show_progress):
            history.loss.append(float(F.nll_loss(prev, data.train_y)))
            out = torch.func.functional_call(model, traj.params(s), (x,))
            pred = out.argmax(-1)
            history.train_acc.append(float((pred[: data.n_train] == data.train_y).double().mean()))
            history.test_acc.append(float((pred[data.n_train :] == data.test_y).double().mean()))
            prev = out[: data.n_train]
    if history_file is not None:
        with open(history_file, "w") as fh:
            json.dump(asdict(history), fh)
    return GrokRun(model, traj, data, config, history, train_seconds)
