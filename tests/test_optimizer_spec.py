"""Which optimizer the recorder sees: wrappers (delegating, subclassing, accelerate) are unwrapped
to the torch optimizer underneath, and each optimizer is classified into its update family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captum_explaind import (
    TrajectoryRecorder,
)
from captum_explaind.recording.optim_spec import optimizer_family, unwrap_optimizer

from recording_utils import assert_params_equal, clone_params, nll, train, vector_data
from training import TanhMLP

REPO_ROOT = Path(__file__).resolve().parents[1]




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
