"""Tiny models and a configurable training loop that records real runs for the tests.

Everything here uses real torch optimizers, schedulers and clipping; the batches of every step
are explicit index lists so tests know exactly which samples formed each step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from captum_explaind import TrajectoryRecorder


# ----------------------------------------------------------------------------- models
class TanhMLP(nn.Module):
    """Smooth MLP with log-softmax outputs (or raw logits)."""

    def __init__(self, d_in: int = 5, hidden: int = 8, d_out: int = 3, log_softmax: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.log_softmax = log_softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out.log_softmax(-1) if self.log_softmax else out


class ReLUMLP(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        return self.fc3(h).log_softmax(-1)


class TinyTransformer(nn.Module):
    """One attention layer (2 heads, softmax attention) + ReLU MLP over token sequences."""

    def __init__(self, vocab: int = 7, d: int = 8, heads: int = 2, mlp: int = 16, d_out: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp_in = nn.Linear(d, mlp)
        self.mlp_out = nn.Linear(mlp, d)
        self.head = nn.Linear(d, d_out)
        self.heads = heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.emb(tokens)
        n, L, d = z.shape
        q, k, v = self.qkv(z).split(d, dim=-1)
        def heads(t):
            return t.reshape(n, L, self.heads, d // self.heads).transpose(1, 2)
        att = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        z = z + self.proj(att.transpose(1, 2).reshape(n, L, d))
        z = z + self.mlp_out(torch.relu(self.mlp_in(z)))
        return self.head(z[:, -1]).log_softmax(-1)


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 1, d_out: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv1(x))
        h = torch.nn.functional.avg_pool2d(torch.tanh(self.conv2(h)), 2)
        return self.fc(h.flatten(1)).log_softmax(-1)


# ----------------------------------------------------------------------------- data
def make_data(kind: str, n: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "vector":
        X = torch.randn(n, 5, generator=g, dtype=dtype)
        Y = torch.randint(0, 3, (n,), generator=g)
    elif kind == "tokens":
        X = torch.randint(0, 7, (n, 4), generator=g)
        Y = (X[:, 0] + X[:, 2]) % 7
    elif kind == "image":
        X = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
        Y = torch.randint(0, 3, (n,), generator=g)
    else:
        raise ValueError(kind)
    return X, Y


def make_batches(n_train: int, sizes: Sequence[int], steps: int, micro: int = 1, seed: int = 0,
                 duplicate: bool = True) -> List[List[List[int]]]:
    """Explicit batches: steps × micro-batches × indices; sizes cycle; one duplicated index."""
    rng = random.Random(seed)
    out = []
    k = 0
    for s in range(steps):
        micros = []
        for m in range(micro):
            size = sizes[k % len(sizes)]
            k += 1
            idx = rng.sample(range(n_train), size)
            if duplicate and s == 1 and m == 0 and size > 1:
                idx[-1] = idx[0]  # a duplicated sample (weight 2/|B|)
            micros.append(idx)
        out.append(micros)
    return out


# ----------------------------------------------------------------------------- ground truth
def outputs_at(model: nn.Module, traj, x: torch.Tensor, step: int) -> torch.Tensor:
    """f(θ_step; x) from a plain copy of ``model`` with the recorded weights loaded (eval mode),
    on ``x``'s device and in the model's dtype — the independent ground truth of the tests."""
    import copy

    m = copy.deepcopy(model).to(x.device)
    dtype = next(m.parameters()).dtype
    state = dict(m.state_dict())
    state.update(traj.params(step, device=x.device, dtype=dtype))
    m.load_state_dict(state)
    with torch.no_grad():
        return m.eval()(x)


# ----------------------------------------------------------------------------- training
@dataclass
class RunConfig:
    optimizer: Callable[[list], torch.optim.Optimizer]
    steps: int = 8
    sizes: Sequence[int] = (4, 6, 3, 8, 5, 7)
    micro: int = 1
    clip: Optional[float] = None
    scheduler: Optional[Callable[[torch.optim.Optimizer], object]] = None
    loss: str = "nll"  # nll (log-prob outputs), ce (logits), mse
    accumulate_mean: bool = True  # divide each micro-batch loss by the number of micro-batches
    use_track: bool = False
    seed: int = 0


def loss_fn_for(kind: str) -> Callable:
    if kind == "nll":
        return lambda out, y: nn.functional.nll_loss(out, y, reduction="none")
    if kind == "ce":
        return lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")
    if kind == "mse":
        return lambda out, y: ((out - nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)) ** 2).sum(-1)
    raise ValueError(kind)


def record_run(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, path, cfg: RunConfig):
    """Train ``model`` with ``cfg`` on (X, Y), recording to ``path``. Returns (trajectory, batches)."""
    opt = cfg.optimizer(model)
    sched = cfg.scheduler(opt) if cfg.scheduler is not None else None
    batches = make_batches(len(X), cfg.sizes, cfg.steps, cfg.micro, cfg.seed)
    per_sample = loss_fn_for(cfg.loss)
    rec = TrajectoryRecorder(model, opt, path, scheduler=sched)
    with rec:
        for step_batches in batches:
            opt.zero_grad()
            for idx in step_batches:
                idx_t = torch.tensor(idx)
                loss = per_sample(model(X[idx_t]), Y[idx_t]).mean()
                if cfg.accumulate_mean and cfg.micro > 1:
                    loss = loss / cfg.micro
                loss.backward()
                rec.log_batch(idx_t)
            if cfg.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if sched is not None:
                sched.step()
    return rec.trajectory, batches


# ----------------------------------------------------------------------------- optimizers
def groups_no_decay_on_bias(model: nn.Module, lr: float, wd: float):
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0, "lr": 2 * lr}]


OPTIMIZERS = {
    "sgd_plain": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "sgd_dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02),
    "sgd_decay": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.05),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    "adam_l2": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.05),
    "adam_l2_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.05, amsgrad=True, eps=1e-6),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
    "adamw_groups": lambda m: torch.optim.AdamW(groups_no_decay_on_bias(m, 0.01, 0.1), lr=0.01),
}

SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[g["lr"] * 2 for g in o.param_groups], total_steps=10
    ),
    "warmup_cosine": lambda o: torch.optim.lr_scheduler.LambdaLR(
        o, lambda s: min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / 10))
    ),
}
