"""Recording a training run and reading it back: TrajectoryRecorder, Trajectory, the on-disk format.

Everything here uses real torch optimizers, schedulers and DataLoaders and real files under
``tmp_path``. Values recorded on disk are compared with what the live training loop saw (the
parameters after every step, the learning rate and betas in the groups right before the step,
the gradients the optimizer read, the optimizer state after the step) and, where the update
rule is simple, with what the update itself implies (``Δ = −lr·(g + λθ)`` for SGD).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from captum_explaind import (
    MissingOptimizerStateError,
    Trajectory,
    TrajectoryError,
    TrajectoryRecorder,
)
from captum_explaind.recording import format as fmt

from recording_utils import (
    BNNet,
    TwoHead,
    assert_params_equal,
    clone_params,
    clone_state,
    nll,
    step_file,
    train,
    vector_data,
)
from training import TanhMLP, groups_no_decay_on_bias

REPO_ROOT = Path(__file__).resolve().parents[1]


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
            for _ in range(4):
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
