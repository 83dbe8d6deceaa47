"""Shared helpers of the recording tests: small training loops, data, models, file paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from captum_explaind import (
    Trajectory,
    TrajectoryRecorder,
)
from captum_explaind.recording import format as fmt
from captum_explaind.recording.optim_spec import unwrap_optimizer

from training import TanhMLP, make_data

REPO_ROOT = Path(__file__).resolve().parents[1]


# ============================================================================ helpers
def nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.nll_loss(out, y, reduction="none")


def clone_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def clone_state(model: nn.Module, opt: torch.optim.Optimizer) -> Dict[str, Dict[str, Any]]:
    out = {}
    for n, p in model.named_parameters():
        if p in opt.state:
            out[n] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
    return out


def train(
    model: nn.Module,
    opt: Any,
    path,
    X: torch.Tensor,
    Y: torch.Tensor,
    steps: int,
    *,
    batch: int = 4,
    micro: int = 1,
    sched: Any = None,
    clip: Optional[float] = None,
    rec_kwargs: Optional[dict] = None,
    seed: int = 0,
):
    """Train with a recorder attached; return (trajectory, θ_0, per-step log of what the loop saw).

    Each log entry holds: ``lr``/``groups`` (param groups right before ``opt.step()``), ``grads``
    (the ``.grad`` the optimizer read), ``pre_clip_norm`` (what clip_grad_norm_ returned),
    ``params`` and ``state`` (right after the step), ``batches`` (index tensors per micro-batch).
    """
    inner = unwrap_optimizer(opt)
    rec = TrajectoryRecorder(model, opt, path, scheduler=sched, **(rec_kwargs or {}))
    init = clone_params(model)
    g = torch.Generator().manual_seed(seed)
    log: List[Dict[str, Any]] = []
    with rec:
        for _ in range(steps):
            opt.zero_grad()
            batches = []
            for _m in range(micro):
                idx = torch.randint(0, len(X), (batch,), generator=g)
                loss = nll(model(X[idx]), Y[idx]).mean()
                if micro > 1:
                    loss = loss / micro
                loss.backward()
                rec.log_batch(idx)
                batches.append(idx)
            entry: Dict[str, Any] = {"batches": batches}
            if clip is not None:
                entry["pre_clip_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            entry["lr"] = [grp["lr"] for grp in inner.param_groups]
            entry["groups"] = [{k: v for k, v in grp.items() if k != "params"} for grp in inner.param_groups]
            entry["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            entry["prev"] = clone_params(model)
            opt.step()
            entry["params"] = clone_params(model)
            entry["state"] = clone_state(model, inner)
            if sched is not None:
                sched.step()
            log.append(entry)
    return rec.trajectory, init, log


def vector_data(n: int = 24, dtype=torch.float32, seed: int = 0):
    X, Y = make_data("vector", n, dtype=dtype, seed=seed)
    return X, Y


def record_small(path, steps: int = 5, optimizer: str = "sgd") -> Trajectory:
    """A closed trajectory of a tiny float32 MLP (fc1, fc2)."""
    torch.manual_seed(0)
    model = TanhMLP()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    X, Y = vector_data()
    traj, _, _ = train(model, opt, path, X, Y, steps)
    return traj


def step_file(path, s: int) -> Path:
    return Path(path) / "steps" / fmt.step_filename(s)


def assert_params_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype, n
        assert torch.equal(a[n], b[n]), n


class TwoHead(nn.Module):
    """A trunk and two heads; ``head2`` is only used when ``use2`` is set (no gradient otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(5, 6)
        self.head1 = nn.Linear(6, 3)
        self.head2 = nn.Linear(6, 3)
        self.use2 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.head1(h)
        if self.use2:
            out = out + self.head2(h)
        return out.log_softmax(-1)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x)))).log_softmax(-1)


