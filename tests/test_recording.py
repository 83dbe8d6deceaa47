"""Recording a training run and reading it back: TrajectoryRecorder, Trajectory, the on-disk format.

Everything here uses real torch optimizers, schedulers and DataLoaders and real files under
``tmp_path``. Values recorded on disk are compared with what the live training loop saw (the
parameters after every step, the learning rate and betas in the groups right before the step,
the gradients the optimizer read, the optimizer state after the step) and, where the update
rule is simple, with what the update itself implies (``Δ = −lr·(g + λθ)`` for SGD).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from captum_explaind import (
    MissingOptimizerStateError,
    Trajectory,
    TrajectoryCorruptError,
    TrajectoryError,
    TrajectoryMismatchError,
    TrajectoryRecorder,
)
from captum_explaind.recording import format as fmt
from captum_explaind.recording.optim_spec import optimizer_family, unwrap_optimizer
from training import TanhMLP, groups_no_decay_on_bias, make_data

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


# ============================================================================ parameters
def test_theta0_and_every_step_equal_live_parameters(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    traj, init, log = train(model, opt, tmp_path / "run", X, Y, steps=6)

    assert isinstance(traj, Trajectory)
    assert traj.num_steps == 6 and len(traj) == 6
    assert traj.status == "closed"
    assert traj.manifest["num_steps"] == 6
    assert traj.manifest["format"] == fmt.FORMAT_NAME and traj.manifest["version"] == fmt.FORMAT_VERSION
    assert "steps=6" in repr(traj)
    assert traj.trainable == [n for n, _ in model.named_parameters()]
    assert traj.frozen == []
    assert_params_equal(traj.params(0), init)
    for s in range(1, 7):
        assert_params_equal(traj.params(s), log[s - 1]["params"])
    # each step really moved the parameters, so the comparison above can tell steps apart
    for s in range(1, 7):
        assert not torch.equal(traj.params(s)["fc1.weight"], traj.params(s - 1)["fc1.weight"])
    # a second, independent open of the directory sees the same thing
    again = Trajectory.open(tmp_path / "run")
    assert again.num_steps == 6
    assert_params_equal(again.params(6), clone_params(model))
    # parameter subsets, dtype and range checks
    sub = traj.params(3, ["fc2.bias"], dtype=torch.float64)
    assert list(sub) == ["fc2.bias"] and sub["fc2.bias"].dtype == torch.float64
    with pytest.raises(TrajectoryError, match=r"step 7 is outside the trajectory \(valid: 0\.\.6\)"):
        traj.params(7)
    with pytest.raises(TrajectoryError, match="outside"):
        traj.record(0)


def test_recorded_params_match_a_step_post_hook_callback(tmp_path):
    """θ_s on disk equals what a user's own step post-hook sees right after each step."""
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    seen = []
    handle = opt.register_step_post_hook(lambda o, a, k: seen.append(clone_params(model)))
    with rec:
        for s in range(4):
            opt.zero_grad()
            idx = torch.arange(s, s + 5)
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
    handle.remove()
    traj = rec.trajectory
    assert traj.num_steps == len(seen) == 4
    for s, live in enumerate(seen, start=1):
        assert_params_equal(traj.params(s), live)


def test_params_not_given_to_optimizer_are_stored_once(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    model.fc1.requires_grad_(False)
    opt = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    traj, init, log = train(model, opt, tmp_path / "run", X, Y, steps=3)

    assert traj.frozen == ["fc1.weight", "fc1.bias"]
    assert traj.trainable == ["fc2.weight", "fc2.bias"]
    assert {p.name: p.trainable for p in traj.params_spec} == {
        "fc1.weight": False, "fc1.bias": False, "fc2.weight": True, "fc2.bias": True,
    }
    # stored once, in θ_0 ...
    with safe_open(str(tmp_path / "run" / "initial.safetensors"), "pt") as fh:
        assert {"param/fc1.weight", "param/fc1.bias"} <= set(fh.keys())
    assert_params_equal(traj.frozen_params(), {"fc1.weight": init["fc1.weight"], "fc1.bias": init["fc1.bias"]})
    # ... and not per step
    for s in range(1, 4):
        with safe_open(str(step_file(tmp_path / "run", s)), "pt") as fh:
            keys = set(fh.keys())
        assert "param/fc1.weight" not in keys and "param/fc1.bias" not in keys
        assert {"param/fc2.weight", "param/fc2.bias"} <= keys
        assert set(traj.params(s)) == {"fc2.weight", "fc2.bias"}
        assert_params_equal(traj.params(s), {n: log[s - 1]["params"][n] for n in ("fc2.weight", "fc2.bias")})
    # θ_0 holds every parameter, trainable and frozen
    assert set(load_file(str(tmp_path / "run" / "initial.safetensors"))) >= {f"param/{n}" for n in init}


def test_requires_grad_false_params_in_optimizer_are_stored_once(tmp_path):
    """Freezing with requires_grad_(False) but still passing model.parameters() to the optimizer
    (a very common pattern): the frozen tensors must be stored once, not in every step file."""
    X, Y = vector_data()
    model = TanhMLP()
    model.fc1.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # fc1 handed to the optimizer, but frozen
    traj, init, log = train(model, opt, tmp_path / "run", X, Y, steps=3)

    # correct values either way
    for s in range(1, 4):
        assert torch.equal(traj.params(s)["fc2.weight"], log[s - 1]["params"]["fc2.weight"])
    assert torch.equal(log[-1]["params"]["fc1.weight"], init["fc1.weight"])
    # stored once: listed as frozen and absent from the step files
    assert "fc1.weight" in traj.frozen and "fc1.bias" in traj.frozen
    with safe_open(str(step_file(tmp_path / "run", 1)), "pt") as fh:
        assert "param/fc1.weight" not in set(fh.keys())


def test_frozen_parameter_changed_during_training_warns_at_close(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    opt.zero_grad()
    nll(model(X[:4]), Y[:4]).mean().backward()
    rec.log_batch([0, 1, 2, 3])
    opt.step()
    with torch.no_grad():
        model.fc1.bias.add_(1.0)  # changed behind the optimizer's back
    with pytest.warns(RuntimeWarning, match=r"fc1\.bias"):
        traj = rec.close()
    assert traj.manifest.get("frozen_changed") == ["fc1.bias"]


def test_close_detaches_hooks_and_log_batch_after_close_raises(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traj, _, _ = train(model, opt, tmp_path / "run", X, Y, steps=2)
    rec_dir = tmp_path / "run" / "steps"
    before = sorted(os.listdir(rec_dir))
    opt.zero_grad()
    nll(model(X[:3]), Y[:3]).mean().backward()
    opt.step()  # not recorded any more
    assert sorted(os.listdir(rec_dir)) == before == [fmt.step_filename(1), fmt.step_filename(2)]
    assert Trajectory.open(tmp_path / "run").num_steps == 2
    # a closed recorder refuses batches; closing twice is harmless
    rec = TrajectoryRecorder(model, opt, tmp_path / "run2")
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        rec.log_batch([0])
    assert rec.close().num_steps == 0


def test_buffers_recorded_initially_and_when_they_change(tmp_path):
    X, Y = vector_data()
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    init_bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    live = []
    with rec:
        for s in range(3):
            if s == 1:
                model.eval()  # step 2: buffers frozen
            else:
                model.train()
            opt.zero_grad()
            idx = torch.arange(4 * s, 4 * s + 4)
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
            live.append({n: b.detach().clone() for n, b in model.named_buffers()})
    traj = rec.trajectory
    assert set(traj.buffer_names) == set(init_bufs)
    assert_params_equal(traj.buffers(0), init_bufs)
    for s in range(1, 4):
        assert_params_equal(traj.buffers(s), live[s - 1])
    assert traj.buffer_steps() == [1, 3]


def test_store_dtype_float64(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    traj, init, log = train(model, opt, tmp_path / "run", X, Y, steps=2, rec_kwargs={"store_dtype": torch.float64})
    spec = traj.spec["fc1.weight"]
    assert spec.dtype == torch.float64 and spec.model_dtype == torch.float32
    assert traj.params(0)["fc1.weight"].dtype == torch.float64
    assert torch.equal(traj.params(2)["fc1.weight"], log[1]["params"]["fc1.weight"].double())
    assert torch.equal(traj.state(2, "exp_avg_sq")["fc1.weight"], log[1]["state"]["fc1.weight"]["exp_avg_sq"].double())
    traj.validate(model)  # the float32 model matches (it was trained in float32)
    with pytest.raises(ValueError, match="store_dtype"):
        TrajectoryRecorder(model, opt, tmp_path / "bad", store_dtype=torch.int32)


def test_optimizer_parameter_not_in_model_is_rejected(tmp_path):
    model = TanhMLP()
    stray = nn.Parameter(torch.zeros(3, 2))
    opt = torch.optim.SGD(list(model.parameters()) + [stray], lr=0.1)
    with pytest.raises(TrajectoryError, match=r"shape \(3, 2\).*not a parameter of the model"):
        TrajectoryRecorder(model, opt, tmp_path / "run")
    with pytest.raises(TypeError, match="nn.Module"):
        TrajectoryRecorder(object(), opt, tmp_path / "run2")


# ============================================================================ learning rates
def _cosine(base, s, T=6, eta_min=0.001):
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * (s - 1) / T)) / 2


def _lam(k):
    return min(1.0, (k + 1) / 3) * 0.9**k


SCHEDULES = {
    "steplr": (
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        lambda base, s: base * 0.5 ** ((s - 1) // 3),
    ),
    "cosine": (
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=0.001),
        _cosine,
    ),
    "lambdalr": (
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, _lam),
        lambda base, s: base * _lam(s - 1),
    ),
    "onecycle": (
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=[2 * g["lr"] for g in o.param_groups], total_steps=8, cycle_momentum=False
        ),
        None,
    ),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_learning_rate_per_group_is_the_one_the_step_used(tmp_path, schedule):
    """Plain SGD with two groups (different lr and weight decay), scheduler.step() after
    optimizer.step(): the recorded lr of group g at step s is the one implied by the update
    itself, Δ = −lr·(g + λθ), and equals the schedule's value for step s (index s−1)."""
    make_sched, expected = SCHEDULES[schedule]
    X, Y = vector_data(dtype=torch.float64)
    model = TanhMLP().double()
    opt = torch.optim.SGD(groups_no_decay_on_bias(model, lr=0.1, wd=0.05), lr=0.1)
    sched = make_sched(opt)
    steps = 8
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=steps, sched=sched)

    assert traj.n_groups == 2
    assert traj.manifest["scheduler"] == type(sched).__qualname__
    group_of = {p.name: p.group for p in traj.params_spec}
    assert group_of == {"fc1.weight": 0, "fc2.weight": 0, "fc1.bias": 1, "fc2.bias": 1}
    bases = [0.1, 0.2]
    wds = [0.05, 0.0]
    all_lrs = []
    for s in range(1, steps + 1):
        rec = traj.record(s)
        e = log[s - 1]
        assert rec.step == s
        assert rec.lr == pytest.approx(e["lr"], rel=1e-15, abs=0)
        assert [g["weight_decay"] for g in rec.groups] == wds
        assert "lr" not in rec.groups[0]
        if expected is not None:
            assert rec.lr == pytest.approx([expected(b, s) for b in bases], rel=1e-9)
        # the lr implied by the actual update of each group's parameters
        before, after = traj.params(s - 1), traj.params(s)
        for gi in range(2):
            names = [n for n, g in group_of.items() if g == gi]
            u = torch.cat([(e["grads"][n] + wds[gi] * before[n]).flatten() for n in names])
            d = torch.cat([(after[n] - before[n]).flatten() for n in names])
            implied = float(-(d @ u) / (u @ u))
            assert implied == pytest.approx(rec.lr[gi], rel=1e-9)
        all_lrs.append(rec.lr[0])
    assert len(set(all_lrs)) > 1  # the schedule changes the lr, so an off-by-one would be caught


def test_scheduler_stepped_before_optimizer_still_records_the_lr_used(tmp_path):
    X, Y = vector_data(dtype=torch.float64)
    model = TanhMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", scheduler=sched)
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the unusual order
        with rec:
            for s in range(4):
                opt.zero_grad()
                nll(model(X[:6]), Y[:6]).mean().backward()
                rec.log_batch(range(6))
                sched.step()  # before optimizer.step(): the step uses the *new* lr
                used.append(opt.param_groups[0]["lr"])
                opt.step()
    lrs = [r.lr[0] for r in rec.trajectory.records()]
    assert lrs == pytest.approx(used, rel=1e-15)
    assert lrs == pytest.approx([0.1 / 2, 0.1 / 3, 0.1 / 4, 0.1 / 5], rel=1e-12)


def test_onecycle_adam_records_lr_and_beta1_per_step(tmp_path):
    """OneCycleLR cycles Adam's β1 too: the recorded betas[0] of step s is the β1 that step used
    (checked against the first-moment update m_s = β1 m_{s−1} + (1−β1) g_s)."""
    X, Y = vector_data(dtype=torch.float64)
    model = TanhMLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=8)
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=8, sched=sched)
    beta1s, lrs = [], []
    for s in range(1, 9):
        rec = traj.record(s)
        e = log[s - 1]
        assert rec.lr[0] == pytest.approx(e["lr"][0], rel=1e-15)
        b1, b2 = rec.groups[0]["betas"]
        assert b1 == pytest.approx(e["groups"][0]["betas"][0], rel=1e-15)
        assert b2 == pytest.approx(0.999)
        if s > 1:
            n = "fc1.weight"
            g = e["grads"][n]
            m_prev = log[s - 2]["state"][n]["exp_avg"]
            m = e["state"][n]["exp_avg"]
            implied = float(((m - g) * (m_prev - g)).sum() / ((m_prev - g) ** 2).sum())
            assert implied == pytest.approx(b1, rel=1e-9)
        beta1s.append(b1)
        lrs.append(rec.lr[0])
    assert len(set(beta1s)) > 2 and len(set(lrs)) > 2
    assert 0.85 <= min(beta1s) < 0.9 and 0.015 < max(lrs) <= 0.02


def test_param_groups_hyperparameters_recorded(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.AdamW(groups_no_decay_on_bias(model, lr=0.01, wd=0.1), lr=0.01, betas=(0.8, 0.95))
    traj, _, _ = train(model, opt, tmp_path / "run", X, Y, steps=2)
    assert traj.family == "adamw" and traj.optimizer_class == "AdamW"
    assert [g["lr"] for g in traj.groups_initial] == pytest.approx([0.01, 0.02])
    for rec in traj.records():
        assert rec.lr == pytest.approx([0.01, 0.02])
        assert [g["weight_decay"] for g in rec.groups] == pytest.approx([0.1, 0.0])
        assert all(g["betas"] == pytest.approx([0.8, 0.95]) for g in rec.groups)
        assert all(g["eps"] == pytest.approx(1e-8) for g in rec.groups)


# ============================================================================ gradient norms
def _norm_sq(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def test_grad_norm_equals_the_gradient_the_optimizer_saw(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=4)
    for s in range(1, 5):
        rec = traj.record(s)
        grads = log[s - 1]["grads"]
        assert set(rec.grad_sq) == set(grads)
        for n, g in grads.items():
            assert rec.grad_sq[n] == pytest.approx(_norm_sq(g), rel=1e-12)
        total = math.sqrt(sum(_norm_sq(g) for g in grads.values()))
        assert rec.grad_norm == pytest.approx(total, rel=1e-12)
        assert rec.inactive == []


def test_grad_norm_is_the_clipped_norm(tmp_path):
    X, Y = vector_data(dtype=torch.float64)
    model = TanhMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    max_norm = 0.05
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=4, clip=max_norm)
    for s in range(1, 5):
        rec = traj.record(s)
        e = log[s - 1]
        assert e["pre_clip_norm"] > 2 * max_norm  # clipping really happened
        clipped = math.sqrt(sum(_norm_sq(g) for g in e["grads"].values()))
        assert rec.grad_norm == pytest.approx(clipped, rel=1e-12)
        coef = max_norm / (e["pre_clip_norm"] + 1e-6)
        assert rec.grad_norm == pytest.approx(coef * e["pre_clip_norm"], rel=1e-9)
        assert rec.grad_norm < e["pre_clip_norm"]


def test_grad_norm_with_gradient_accumulation_matches_a_recomputation(tmp_path):
    """3 micro-batches per step, loss/3 each: the recorded norm is that of the accumulated
    gradient, which is recomputed here from θ_{s−1} and the logged micro-batches."""
    X, Y = vector_data(dtype=torch.float64)
    model = TanhMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=3, batch=3, micro=3)
    probe = TanhMLP().double()
    for s in range(1, 4):
        rec = traj.record(s)
        e = log[s - 1]
        assert len(rec.batches) == 3
        for mb, idx in zip(rec.batches, e["batches"]):
            assert torch.equal(mb.indices, idx)
            assert torch.allclose(mb.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
        # recompute the accumulated gradient at θ_{s−1}
        params = {n: t.clone().requires_grad_(True) for n, t in traj.params(s - 1).items()}
        total = 0.0
        for mb in rec.batches:
            out = torch.func.functional_call(probe, params, (X[mb.indices],))
            total = total + (nll(out, Y[mb.indices]) * mb.weights).sum() / 3
        grads = torch.autograd.grad(total, list(params.values()))
        norm = math.sqrt(sum(_norm_sq(g) for g in grads))
        assert rec.grad_norm == pytest.approx(norm, rel=1e-10)
        for (n, _), g in zip(params.items(), grads):
            assert rec.grad_sq[n] == pytest.approx(_norm_sq(g), rel=1e-10)
        # a single micro-batch's gradient alone would give a different norm
        assert rec.grad_norm != pytest.approx(
            math.sqrt(sum(_norm_sq(g) for g in e["grads"].values())) * 3, rel=1e-3
        )


# ============================================================================ Adam state
@pytest.mark.parametrize(
    "kind",
    ["adam", "adam_amsgrad", "adamw", "adamw_amsgrad"],
)
def test_adam_state_equals_optimizer_state_after_each_step(tmp_path, kind):
    X, Y = vector_data()
    model = TanhMLP()
    amsgrad = kind.endswith("amsgrad")
    cls = torch.optim.AdamW if kind.startswith("adamw") else torch.optim.Adam
    opt = cls(model.parameters(), lr=0.02, weight_decay=0.05, amsgrad=amsgrad)
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=4)
    assert traj.family == ("adamw" if cls is torch.optim.AdamW else "adam")
    assert traj.has_state("exp_avg_sq")
    assert traj.manifest["recording"]["optimizer_state"] is True
    for s in range(1, 5):
        live = log[s - 1]["state"]
        v = traj.state(s, "exp_avg_sq")
        assert set(v) == set(live)
        for n in live:
            assert torch.equal(v[n], live[n]["exp_avg_sq"]), (s, n)
        vmax = traj.state(s, "max_exp_avg_sq")
        if amsgrad:
            assert set(vmax) == set(live)
            for n in live:
                assert torch.equal(vmax[n], live[n]["max_exp_avg_sq"]), (s, n)
        else:
            assert vmax == {}
        rec = traj.record(s)
        assert rec.state_step == {n: s for n in live}
        assert rec.state_step == {n: int(live[n]["step"]) for n in live}
    # state exists only after a step
    with pytest.raises(TrajectoryError, match="outside"):
        traj.state(0, "exp_avg_sq")


def test_parameter_without_gradient_is_inactive(tmp_path):
    X, Y = vector_data()
    model = TwoHead()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    uses = [False, True, False, True]
    live_params, live_state = [], []
    with rec:
        for s, use2 in enumerate(uses):
            model.use2 = use2
            opt.zero_grad()  # set_to_none: head2 has grad None when unused
            idx = torch.arange(s, s + 4)
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
            live_params.append(clone_params(model))
            live_state.append(clone_state(model, opt))
    traj = rec.trajectory
    head2 = ["head2.weight", "head2.bias"]
    for s, use2 in enumerate(uses, start=1):
        r = traj.record(s)
        assert r.inactive == ([] if use2 else head2)
        assert set(r.grad_sq) == set(traj.trainable) - set(r.inactive)
        assert_params_equal(traj.params(s), live_params[s - 1])
    # torch skips head2 entirely on steps 1 and 3: no state at step 1, step counts lag behind
    assert set(traj.state(1, "exp_avg_sq")) == {"trunk.weight", "trunk.bias", "head1.weight", "head1.bias"}
    assert "head2.weight" not in traj.record(1).state_step
    assert traj.record(2).state_step["head2.weight"] == 1
    assert traj.record(3).state_step["head2.weight"] == 1
    assert traj.record(4).state_step["head2.weight"] == 2
    assert traj.record(4).state_step["trunk.weight"] == 4
    assert torch.equal(traj.params(3)["head2.weight"], traj.params(2)["head2.weight"])
    assert torch.equal(traj.state(3, "exp_avg_sq")["head2.weight"], live_state[2]["head2.weight"]["exp_avg_sq"])


def test_missing_optimizer_state_is_reported(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    traj, _, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "sgd", X, Y, steps=1)
    assert traj.state_keys == []
    with pytest.raises(MissingOptimizerStateError, match="exp_avg_sq"):
        traj.state(1, "exp_avg_sq")
    model = TanhMLP()
    traj, _, _ = train(
        model, torch.optim.Adam(model.parameters()), tmp_path / "adam", X, Y, steps=1,
        rec_kwargs={"record_optimizer_state": False},
    )
    assert not traj.has_state("exp_avg_sq")
    with pytest.raises(MissingOptimizerStateError, match="record_optimizer_state=True"):
        traj.state(1, "exp_avg_sq")
    with safe_open(str(step_file(tmp_path / "adam", 1)), "pt") as fh:
        assert not any(k.startswith("state/") for k in fh.keys())


# ============================================================================ log_batch
def _one_step(model, opt, X, Y):
    opt.zero_grad()
    nll(model(X[:3]), Y[:3]).mean().backward()
    opt.step()


def test_log_batch_weights_duplicates_and_micro_batches(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    # step 1: two micro-batches, a duplicate, default and explicit weights, list and ndarray
    rec.log_batch([3, 3, 5])
    rec.log_batch(np.array([1, 2], dtype=np.int32), weights=[0.25, 0.75])
    _one_step(model, opt, X, Y)
    # step 2: a 2-D tensor of indices is flattened; weights as a tensor
    rec.log_batch(torch.tensor([[0, 1], [2, 3]]))
    rec.log_batch(torch.tensor([7]), weights=torch.tensor([2.0], requires_grad=True))
    _one_step(model, opt, X, Y)
    # step 3: nothing logged
    _one_step(model, opt, X, Y)
    traj = rec.close()

    b = traj.record(1).batches
    assert len(b) == 2
    assert b[0].indices.tolist() == [3, 3, 5] and b[0].indices.dtype == torch.int64
    assert b[0].weights.tolist() == pytest.approx([1 / 3] * 3)
    assert b[0].weights.dtype == torch.float64
    assert b[1].indices.tolist() == [1, 2]
    assert b[1].weights.tolist() == pytest.approx([0.25, 0.75])
    b = traj.record(2).batches
    assert [m.indices.tolist() for m in b] == [[0, 1, 2, 3], [7]]
    assert b[0].weights.tolist() == pytest.approx([0.25] * 4)
    assert b[1].weights.tolist() == pytest.approx([2.0])
    assert traj.record(3).batches == []


def test_log_batch_reduction_sum(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", reduction="sum")
    rec.log_batch([4, 4, 9, 1])
    _one_step(model, opt, X, Y)
    b = rec.close().record(1).batches
    assert b[0].indices.tolist() == [4, 4, 9, 1]
    assert b[0].weights.tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="reduction"):
        TrajectoryRecorder(model, opt, tmp_path / "bad", reduction="median")


def test_log_batch_rejects_bad_input(tmp_path):
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    with pytest.raises(TypeError, match="integers"):
        rec.log_batch(torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="integers"):
        rec.log_batch(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="non-negative"):
        rec.log_batch([1, -2])
    with pytest.raises(ValueError, match="2 weights for 3 indices"):
        rec.log_batch([1, 2, 3], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        rec.log_batch([1, 2], weights=[0.5, float("nan")])
    rec.close()


def test_unconsumed_and_discarded_batches(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    rec.log_batch([1, 2])
    rec.discard_batches()  # e.g. a step skipped by GradScaler
    rec.log_batch([5, 6, 7])
    _one_step(model, opt, X, Y)
    rec.log_batch([9])  # never followed by a step
    with pytest.warns(RuntimeWarning, match="not followed by an optimizer step"):
        traj = rec.close()
    assert traj.num_steps == 1
    assert [m.indices.tolist() for m in traj.record(1).batches] == [[5, 6, 7]]


# ============================================================================ track(loader)
class DictDataset(Dataset):
    """Map-style dataset whose samples carry their own index (so tests can check the recording)."""

    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(3)
        self.X = torch.randn(n, 5, generator=g)
        self.Y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int):
        return {"x": self.X[i], "y": self.Y[i], "idx": i}


class TupleDataset(DictDataset):
    def __getitem__(self, i: int):
        return (self.X[i], self.Y[i], i)


def tuple_collate(items):
    xs, ys, ids = zip(*items)
    return torch.stack(xs), torch.stack(ys), list(ids)


class Stream(IterableDataset):
    def __iter__(self):
        yield from ({"x": torch.zeros(5), "y": 0} for _ in range(4))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_track_records_the_batches_actually_consumed(tmp_path, num_workers):
    ds = DictDataset(10)
    loader = DataLoader(
        ds, batch_size=4, shuffle=True, drop_last=False, num_workers=num_workers,
        generator=torch.Generator().manual_seed(7),
    )
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    consumed = []
    with rec:
        for _epoch in range(2):
            tracked = rec.track(loader)
            assert len(tracked) == len(loader) == 3
            for batch in tracked:
                assert isinstance(batch, dict) and set(batch) == {"x", "y", "idx"}
                opt.zero_grad()
                nll(model(batch["x"]), batch["y"]).mean().backward()
                opt.step()
                consumed.append(batch["idx"].clone())
    traj = rec.trajectory
    assert traj.num_steps == 6
    assert [len(c) for c in consumed] == [4, 4, 2, 4, 4, 2]  # partial last batch kept
    for s, idx in enumerate(consumed, start=1):
        r = traj.record(s)
        assert len(r.batches) == 1
        assert torch.equal(r.batches[0].indices, idx.to(torch.int64))
        assert torch.allclose(r.batches[0].weights, torch.full((len(idx),), 1 / len(idx), dtype=torch.float64))
    for epoch in range(2):
        seen = torch.cat(consumed[3 * epoch: 3 * epoch + 3]).sort().values
        assert seen.tolist() == list(range(10))
    order = torch.cat(consumed[:3]).tolist()
    assert order != list(range(10))  # really shuffled
    assert torch.cat(consumed[3:]).tolist() != order  # a new permutation each epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_track_iterates_like_the_plain_loader_with_a_seeded_generator(num_workers):
    """Recording must not change the run: with the same seeded generator, the tracked loader
    yields the same batches, in the same order, as the loader the user passed in."""
    def loader():
        return DataLoader(DictDataset(10), batch_size=4, shuffle=True, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(7))

    plain = [b["idx"].tolist() for b in loader()]
    from captum_explaind.recording.indexing import TrackedDataLoader

    logged = []
    tracked = [b["idx"].tolist() for b in TrackedDataLoader(loader(), lambda i: logged.append(i.tolist()))]
    assert tracked == logged  # the indices handed to the recorder are those of the batch yielded
    assert tracked == plain


def test_track_with_custom_collate_and_sampling_with_replacement(tmp_path):
    ds = TupleDataset(4)  # batches of 5 out of 4 items: every full batch repeats an item
    sampler = RandomSampler(ds, replacement=True, num_samples=12, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(ds, batch_size=5, sampler=sampler, collate_fn=tuple_collate)
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    consumed = []
    with rec:
        for x, y, ids in rec.track(loader):
            assert isinstance(ids, list)  # the user's collate function produced this batch
            opt.zero_grad()
            nll(model(x), y).mean().backward()
            opt.step()
            consumed.append(ids)
    traj = rec.trajectory
    assert [len(c) for c in consumed] == [5, 5, 2]
    assert any(len(set(c)) < len(c) for c in consumed)  # duplicates drawn
    for s, ids in enumerate(consumed, start=1):
        assert traj.record(s).batches[0].indices.tolist() == ids


def test_track_breaking_out_early_with_prefetching_workers(tmp_path):
    """Workers prefetch batches ahead; only the batches handed to the loop are recorded."""
    ds = DictDataset(24)
    loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=2, prefetch_factor=2)
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    for k, batch in enumerate(rec.track(loader)):
        opt.zero_grad()
        nll(model(batch["x"]), batch["y"]).mean().backward()
        opt.step()
        if k == 1:
            break
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unconsumed micro-batches" warning
        traj = rec.close()
    assert traj.num_steps == 2
    assert [traj.record(s).batches[0].indices.tolist() for s in (1, 2)] == [[0, 1, 2], [3, 4, 5]]


def test_track_rejects_unsupported_loaders(tmp_path):
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    with pytest.raises(TypeError, match="IterableDataset"):
        rec.track(DataLoader(Stream(), batch_size=2))
    with pytest.raises(TypeError, match="batch_size is None"):
        rec.track(DataLoader(DictDataset(4), batch_size=None))
    with pytest.raises(TypeError, match="DataLoader"):
        rec.track([torch.zeros(3)])
    rec.close()


# ============================================================================ overwrite
def test_existing_trajectory_is_not_overwritten_by_default(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=3)
    model = TanhMLP()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path)
    assert Trajectory.open(path).num_steps == 3  # untouched


def test_existing_empty_directory_is_used(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    model = TanhMLP()
    rec = TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path)
    assert rec.close().num_steps == 0


def test_overwrite_replaces_a_previous_trajectory(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=4)
    X, Y = vector_data()
    model = TanhMLP(hidden=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = TrajectoryRecorder(model, opt, path, overwrite=True)
    with rec:
        opt.zero_grad()
        nll(model(X[:4]), Y[:4]).mean().backward()
        rec.log_batch(range(4))
        opt.step()
    traj = Trajectory.open(path)
    assert traj.num_steps == 1
    assert traj.family == "adam"
    assert traj.spec["fc1.weight"].shape == (5, 5)
    assert sorted(os.listdir(path / "steps")) == [fmt.step_filename(1)]


def test_overwrite_refuses_a_directory_that_is_not_a_trajectory(tmp_path):
    path = tmp_path / "precious"
    path.mkdir()
    (path / "data.txt").write_text("keep me")
    model = TanhMLP()
    with pytest.raises(FileExistsError, match="not a trajectory"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, overwrite=True)
    assert (path / "data.txt").read_text() == "keep me"
    assert not (path / "steps").exists()


def test_overwrite_refuses_a_directory_with_a_foreign_manifest_json(tmp_path):
    """A web app / dataset folder that happens to hold a manifest.json is not a trajectory:
    overwrite=True must not rmtree it."""
    path = tmp_path / "webapp"
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"name": "my-app", "version": 3}))
    (path / "index.html").write_text("<html></html>")
    model = TanhMLP()
    with pytest.raises(FileExistsError):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, overwrite=True)
    assert (path / "index.html").exists()


def test_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"x")
    model = TanhMLP()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a directory"):
            TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, overwrite=overwrite)
    assert path.read_bytes() == b"x"


# ============================================================================ crash safety
def test_exception_in_training_loop_keeps_completed_steps(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    live = []
    with pytest.warns(RuntimeWarning, match="not followed by an optimizer step"), pytest.raises(
        RuntimeError, match="boom"
    ):
        with rec:
            for s in range(10):
                opt.zero_grad()
                nll(model(X[s: s + 4]), Y[s: s + 4]).mean().backward()
                rec.log_batch(range(s, s + 4))
                if s == 3:
                    raise RuntimeError("boom")  # after 3 completed steps, batch logged
                opt.step()
                live.append(clone_params(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traj = Trajectory.open(tmp_path / "run")
    assert traj.num_steps == 3
    for s in range(1, 4):
        assert_params_equal(traj.params(s), live[s - 1])
        assert traj.state(s, "exp_avg_sq")
        assert traj.record(s).batches[0].indices.tolist() == list(range(s - 1, s + 3))
    assert "boom" in traj.manifest.get("aborted", "")
    # opening an aborted run must say so
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("interrupted" in m or "aborted" in m for m in messages), messages


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_failure_while_writing_a_step_keeps_the_completed_steps(tmp_path, monkeypatch):
    """The disk fills up while step 3 is written: steps 1–2 must stay readable."""
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == fmt.step_filename(3):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    live = []
    with pytest.raises(OSError, match="No space left"):
        with rec:
            for s in range(5):
                if s == 2:
                    monkeypatch.setattr(os, "replace", failing_replace)
                opt.zero_grad()
                nll(model(X[:4]), Y[:4]).mean().backward()
                rec.log_batch(range(4))
                opt.step()
                live.append(clone_params(model))
    monkeypatch.setattr(os, "replace", real_replace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traj = Trajectory.open(tmp_path / "run")
    assert traj.num_steps == 2
    for s in (1, 2):
        assert_params_equal(traj.params(s), live[s - 1])


def test_open_while_recording_returns_completed_steps_and_warns(tmp_path):
    """A process that never closes its recorder (killed): the manifest still says "recording"."""
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    live = []
    for s in range(3):
        opt.zero_grad()
        nll(model(X[:4]), Y[:4]).mean().backward()
        rec.log_batch(range(4))
        opt.step()
        live.append(clone_params(model))
    # a half-written next step, as left by a crash inside the atomic write
    partial = step_file(tmp_path / "run", 4).with_name(fmt.step_filename(4) + ".tmp")
    partial.write_bytes(step_file(tmp_path / "run", 3).read_bytes()[:100])
    with pytest.warns(RuntimeWarning) as caught:
        traj = Trajectory.open(tmp_path / "run")
    messages = " | ".join(str(w.message) for w in caught)
    assert "not closed" in messages and "3 complete step" in messages
    assert "incompletely written" in messages and fmt.step_filename(4) in messages
    assert traj.num_steps == 3 and traj.status == "recording"
    for s in range(1, 4):
        assert_params_equal(traj.params(s), live[s - 1])
    with pytest.warns(RuntimeWarning, match="incompletely written"):
        assert rec.close().num_steps == 3


_CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from captum_explaind import TrajectoryRecorder

    path, expected_path, k, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = TrajectoryRecorder(model, opt, path)
    X, Y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    expected = {}
    real_replace = os.replace

    def dying_replace(src, dst, *a, **kw):
        if os.path.basename(dst).startswith("step_"):
            os._exit(3)  # killed after the temporary file was written, before the rename
        return real_replace(src, dst, *a, **kw)

    for s in range(1, 100):
        if mode == "mid_write" and s == k + 1:
            os.replace = dying_replace
        idx = torch.tensor([s % 16, (3 * s) % 16])
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
        for n, p in model.named_parameters():
            expected[f"{s}/{n}"] = p.detach().clone()
            expected[f"{s}/state/{n}"] = opt.state[p]["exp_avg_sq"].clone()
        save_file(expected, expected_path)
        if mode == "after_step" and s == k:
            os._exit(3)  # killed without close()
    """
)


@pytest.mark.parametrize("mode", ["after_step", "mid_write"])
def test_process_killed_mid_recording_loses_no_completed_step(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    path, expected_path, k = tmp_path / "run", tmp_path / "expected.safetensors", 4
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(expected_path), str(k), mode],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    leftovers = os.listdir(path / "steps")
    if mode == "mid_write":
        assert fmt.step_filename(k + 1) + ".tmp" in leftovers
    with pytest.warns(RuntimeWarning) as caught:
        traj = Trajectory.open(path)
    messages = " | ".join(str(w.message) for w in caught)
    assert "not closed" in messages and f"{k} complete step" in messages
    if mode == "mid_write":
        assert "incompletely written" in messages and fmt.step_filename(k + 1) in messages
    assert traj.num_steps == k
    expected = load_file(str(expected_path))
    for s in range(1, k + 1):
        params = traj.params(s)
        state = traj.state(s, "exp_avg_sq")
        for n in params:
            assert torch.equal(params[n], expected[f"{s}/{n}"])
            assert torch.equal(state[n], expected[f"{s}/state/{n}"])
        assert traj.record(s).batches[0].indices.tolist() == [s % 16, (3 * s) % 16]
    traj.validate(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))


# ============================================================================ corrupted directories
@pytest.fixture
def closed_run(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=5)
    return path


def _rewrite_manifest(path, **changes):
    mpath = Path(path) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for k, v in changes.items():
        if v is None:
            manifest.pop(k, None)
        else:
            manifest[k] = v
    mpath.write_text(json.dumps(manifest))


def test_corrupt_missing_manifest(closed_run):
    (closed_run / "manifest.json").unlink()
    with pytest.raises(TrajectoryCorruptError, match=r"manifest\.json is missing"):
        Trajectory.open(closed_run)


def test_corrupt_not_a_directory(tmp_path):
    with pytest.raises(TrajectoryCorruptError, match="not a directory"):
        Trajectory.open(tmp_path / "nothing-here")


def test_corrupt_invalid_json_manifest(closed_run):
    text = (closed_run / "manifest.json").read_text()
    (closed_run / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(TrajectoryCorruptError, match=r"manifest\.json is not valid JSON"):
        Trajectory.open(closed_run)


def test_corrupt_manifest_of_another_format(closed_run):
    _rewrite_manifest(closed_run, format="someone.elses.format")
    with pytest.raises(TrajectoryCorruptError, match="not a captum_explaind trajectory manifest"):
        Trajectory.open(closed_run)


def test_corrupt_manifest_of_a_newer_version(closed_run):
    _rewrite_manifest(closed_run, version=fmt.FORMAT_VERSION + 98)
    with pytest.raises(TrajectoryCorruptError, match=rf"format version {fmt.FORMAT_VERSION + 98}.*<= {fmt.FORMAT_VERSION}"):
        Trajectory.open(closed_run)
    _rewrite_manifest(closed_run, version="1")
    with pytest.raises(TrajectoryCorruptError, match="format version '1'"):
        Trajectory.open(closed_run)


def test_corrupt_manifest_missing_section(closed_run):
    _rewrite_manifest(closed_run, optimizer=None)
    with pytest.raises(TrajectoryCorruptError, match="lacks the 'optimizer' section"):
        Trajectory.open(closed_run)


def test_corrupt_missing_initial(closed_run):
    (closed_run / "initial.safetensors").unlink()
    with pytest.raises(TrajectoryCorruptError, match=r"initial\.safetensors \(θ_0\) is missing"):
        Trajectory.open(closed_run)


def test_corrupt_truncated_initial(closed_run):
    f = closed_run / "initial.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(TrajectoryCorruptError, match=r"initial\.safetensors is truncated"):
        Trajectory.open(closed_run)


def test_corrupt_step_deleted_in_the_middle(closed_run):
    step_file(closed_run, 3).unlink()
    with pytest.raises(TrajectoryCorruptError, match=r"missing step\(s\) \[3\]"):
        Trajectory.open(closed_run)


def test_corrupt_steps_directory_missing(closed_run):
    shutil.rmtree(closed_run / "steps")
    with pytest.raises(TrajectoryCorruptError, match="records 5 steps but only 0"):
        Trajectory.open(closed_run)


@pytest.mark.parametrize("keep", ["half", "header_only", "4_bytes", "empty"])
def test_corrupt_truncated_step_file(closed_run, keep):
    f = step_file(closed_run, 4)
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut = {"half": len(data) // 2 + 8 + n // 2, "header_only": 8 + n, "4_bytes": 4, "empty": 0}[keep]
    cut = min(cut, len(data) - 1)
    f.write_bytes(data[:cut])
    with pytest.raises(TrajectoryCorruptError, match=fmt.step_filename(4)) as err:
        Trajectory.open(closed_run)
    assert "truncated" in str(err.value) or "not a readable safetensors" in str(err.value)


def test_corrupt_step_file_garbage_header(closed_run):
    f = step_file(closed_run, 2)
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(TrajectoryCorruptError, match=fmt.step_filename(2)):
        Trajectory.open(closed_run)


def test_corrupt_truncated_step_found_on_load_without_verify(closed_run):
    f = step_file(closed_run, 4)
    f.write_bytes(f.read_bytes()[:-16])
    traj = Trajectory.open(closed_run, verify=False)
    assert traj.num_steps == 5
    with pytest.raises(TrajectoryCorruptError, match=fmt.step_filename(4)):
        traj.params(4)
    traj.params(3)  # the others still load


def test_corrupt_manifest_declares_more_steps_than_exist(closed_run):
    step_file(closed_run, 5).unlink()
    with pytest.raises(TrajectoryCorruptError, match="manifest records 5 steps but only 4 step files exist"):
        Trajectory.open(closed_run)


def test_corrupt_step_files_swapped(closed_run):
    a, b = step_file(closed_run, 2), step_file(closed_run, 3)
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    traj = Trajectory.open(closed_run)
    with pytest.raises(TrajectoryCorruptError, match="holds the record of step 3, not 2"):
        traj.record(2)


def test_corrupt_step_file_lacking_a_parameter_or_its_record(closed_run):
    f = step_file(closed_run, 2)
    with safe_open(str(f), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    save_file({k: v for k, v in tensors.items() if k != "param/fc2.bias"}, str(f), metadata=meta)
    with pytest.raises(TrajectoryCorruptError, match=r"step_00000002\.safetensors lacks trainable parameter 'fc2\.bias'"):
        Trajectory.open(closed_run)
    save_file(tensors, str(f))  # no metadata
    with pytest.raises(TrajectoryCorruptError, match="lacks its step record metadata"):
        Trajectory.open(closed_run)


def test_corrupt_initial_lacking_a_parameter(closed_run):
    f = closed_run / "initial.safetensors"
    tensors = load_file(str(f))
    del tensors["param/fc1.bias"]
    save_file(tensors, str(f))
    with pytest.raises(TrajectoryCorruptError, match="lacks parameter 'fc1.bias'"):
        Trajectory.open(closed_run)


# ============================================================================ validate(model)
class Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)


class WithExtra(TanhMLP):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.zeros(2))


class WithBuffer(TanhMLP):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("stat", torch.zeros(n))


def test_validate_model(tmp_path):
    traj = record_small(tmp_path / "run", steps=1)
    traj.validate(TanhMLP())  # same architecture
    with pytest.raises(TrajectoryMismatchError, match=r"no parameter 'fc1\.weight'.*\[8, 5\]"):
        traj.validate(Renamed())
    with pytest.raises(TrajectoryMismatchError, match=r"parameter 'fc1\.weight' has shape \[9, 5\] in the model but \[8, 5\]"):
        traj.validate(TanhMLP(hidden=9))
    with pytest.raises(TrajectoryMismatchError, match=r"parameter 'fc1\.weight' has dtype torch\.float64.*torch\.float32"):
        traj.validate(TanhMLP().double())
    traj.validate(TanhMLP().double(), check_dtype=False)
    with pytest.raises(TrajectoryMismatchError, match=r"parameter 'extra', which was not recorded"):
        traj.validate(WithExtra())
    with pytest.raises(TypeError, match="nn.Module"):
        traj.validate("not a model")


def test_validate_model_buffers(tmp_path):
    X, Y = vector_data()
    model = WithBuffer(4)
    traj, _, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", X, Y, steps=1)
    traj.validate(WithBuffer(4))
    with pytest.raises(TrajectoryMismatchError, match="no buffer 'stat'"):
        traj.validate(TanhMLP())
    with pytest.raises(TrajectoryMismatchError, match=r"buffer 'stat' has shape \[3\]"):
        traj.validate(WithBuffer(3))


# ============================================================================ no pickle
def test_no_pickle_on_disk_or_on_the_load_path(tmp_path, monkeypatch):
    X, Y = vector_data()
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=3)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files), files
    assert {p.relative_to(tmp_path / "run").as_posix() for p in files} == {
        "manifest.json", "initial.safetensors", *(f"steps/{fmt.step_filename(s)}" for s in (1, 2, 3)),
    }
    for p in files:
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header

    def forbidden(*a, **k):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    t = Trajectory.open(tmp_path / "run")
    t.validate(BNNet())
    assert_params_equal(t.params(3), log[2]["params"])
    assert torch.equal(t.state(3, "max_exp_avg_sq")["fc1.weight"], log[2]["state"]["fc1.weight"]["max_exp_avg_sq"])
    assert len(list(t.records())) == 3
    assert set(t.buffers(3)) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert int(t.buffers(3)["bn.num_batches_tracked"]) == 3
    assert t.frozen_params() == {}


# ============================================================================ NaN
def test_nan_parameters_warn_at_record_time(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")

    def step(poison: bool):
        opt.zero_grad()
        nll(model(X[:4]), Y[:4]).mean().backward()
        if poison:
            model.fc2.bias.grad[0] = float("nan")
        rec.log_batch(range(4))
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(False)  # a finite step: no warning
    with pytest.warns(RuntimeWarning, match=r"step 2: parameter 'fc2\.bias' is not finite"):
        step(True)
    traj = rec.close()
    assert traj.num_steps == 2
    assert torch.isnan(traj.params(2)["fc2.bias"][0])
    # check_finite=False stays silent
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "quiet", check_finite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(True)
    rec.close()


# ============================================================================ optimizer wrappers
class DelegatingWrapper:
    """A tiny stand-in for wrappers such as accelerate's AcceleratedOptimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


class OptimizerSubclassWrapper(torch.optim.Optimizer):
    """Like AcceleratedOptimizer: an Optimizer subclass that delegates to ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # deliberately no super().__init__()
        self.optimizer = optimizer

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


@pytest.mark.parametrize("wrapper", [DelegatingWrapper, OptimizerSubclassWrapper, "nested"])
def test_wrapped_optimizer_is_unwrapped(tmp_path, wrapper):
    X, Y = vector_data()
    model = TanhMLP()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    if wrapper == "nested":
        opt = DelegatingWrapper(OptimizerSubclassWrapper(inner))
    else:
        opt = wrapper(inner)
    assert unwrap_optimizer(opt) is inner
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=3)
    assert traj.num_steps == 3
    assert traj.family == "adamw" and traj.optimizer_class == "AdamW"
    for s in range(1, 4):
        assert_params_equal(traj.params(s), log[s - 1]["params"])
        assert torch.equal(traj.state(s, "exp_avg_sq")["fc1.weight"], log[s - 1]["state"]["fc1.weight"]["exp_avg_sq"])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        TrajectoryRecorder(model, object(), tmp_path / "bad")


def test_accelerate_optimizer_is_unwrapped(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    X, Y = vector_data()
    model = TanhMLP()
    acc = accelerate.Accelerator(cpu=True)
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    model, opt = acc.prepare(model, inner)
    from accelerate.optimizer import AcceleratedOptimizer

    assert isinstance(opt, AcceleratedOptimizer)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    assert rec.optimizer is inner
    live = []
    with rec:
        for s in range(3):
            opt.zero_grad()
            acc.backward(nll(model(X[s: s + 4]), Y[s: s + 4]).mean())
            rec.log_batch(range(s, s + 4))
            opt.step()
            live.append(clone_params(model))
    traj = rec.trajectory
    assert traj.num_steps == 3 and traj.family == "adam"
    for s in range(1, 4):
        assert_params_equal(traj.params(s), live[s - 1])


# ============================================================================ optimizer family
class MySGD(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):  # a custom update rule: not torch's SGD any more
        return super().step(closure)


@pytest.mark.parametrize(
    "make, family",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "sgd"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), "sgd"),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), "adam"),
        (lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1), "adam"),
        (lambda ps: torch.optim.AdamW(ps, lr=0.1), "adamw"),
        (lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True), "adamw"),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.1), "other"),
        (lambda ps: MySGD(ps, lr=0.1), "other"),
    ],
    ids=["sgd", "sgd_nesterov", "adam", "adam_l2", "adamw", "adam_decoupled", "rmsprop", "sgd_subclass"],
)
def test_optimizer_family(tmp_path, make, family):
    model = TanhMLP()
    opt = make(model.parameters())
    assert optimizer_family(opt) == family
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    assert rec.family == family
    X, Y = vector_data()
    opt.zero_grad()
    nll(model(X[:4]), Y[:4]).mean().backward()
    rec.log_batch(range(4))
    opt.step()
    traj = rec.close()
    assert traj.family == family
    assert traj.manifest["optimizer"]["family"] == family
    assert traj.optimizer_class == type(opt).__qualname__
    if family in ("adam", "adamw"):
        assert traj.state(1, "exp_avg_sq")
    else:
        assert traj.state_keys == []
    assert_params_equal(traj.params(1), clone_params(model))
