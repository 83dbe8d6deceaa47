"""The data view's forward-mode training side (epk/train_jvp.py) equals the per-sample path.

Scores are ``-σ c w ∇ℓ_k·T``: the jvp path never builds per-sample gradients, so the test also
makes the per-sample gradient function fail while it runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import TrainingDataInfluence
from captum_explaind.epk import train_grads
from captum_explaind.epk.train_jvp import use_train_jvp

from training import OPTIMIZERS, RunConfig, TanhMLP, TinyTransformer, make_data, outputs_at, record_run


def nll(out, y):
    return nn.functional.nll_loss(out, y, reduction="none")


@pytest.fixture(scope="module", params=[("vector", "adamw_groups"), ("tokens", "sgd_nesterov")])
def run(request, tmp_path_factory):
    kind, opt = request.param
    torch.manual_seed(0)
    model = TanhMLP().double() if kind == "vector" else TinyTransformer().double()
    X, Y = make_data(kind, 30)
    cfg = RunConfig(OPTIMIZERS[opt], steps=7, micro=2, clip=0.5)
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("jvp") / "t", cfg)
    return model, traj, X, Y


def _no_per_sample_grads(*args, **kwargs):
    raise AssertionError("the forward-mode path built per-sample gradients")


@pytest.mark.parametrize("indexing", ["application", "gradient"])
def test_jvp_scores_equal_per_sample_scores(run, indexing, monkeypatch):
    model, traj, X, Y = run
    x, y = X[:3], Y[:3]
    steps = [range(1, 3), range(3, traj.num_steps + 1)]
    ref = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll, train_jvp=False).explain(
        x, target=y, steps=steps, indexing=indexing)
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll, train_jvp=True)
    monkeypatch.setattr(train_grads, "per_sample_loss_grads", _no_per_sample_grads)
    monkeypatch.setattr(train_grads, "weighted_param_grads", _no_per_sample_grads)
    got = tdi.explain(x, target=y, steps=steps, indexing=indexing)
    scale = float(ref.scores.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(got.residual, ref.residual, rtol=0, atol=1e-12 * scale)
    assert got.grad_scale == pytest.approx(ref.grad_scale, rel=1e-12)
    # complete against the real model: scores + regularization + residual + delta = f(θ_N) − f(θ_0)
    change = (outputs_at(model, traj, x, traj.num_steps) - outputs_at(model, traj, x, 0)).gather(1, y[:, None])[:, 0]
    total = got.scores.sum(dim=(1, 2)) + got.regularization + got.residual + got.delta
    torch.testing.assert_close(total, change, rtol=0, atol=1e-12)


def test_jvp_scores_per_layer_equal_per_sample(run):
    model, traj, X, Y = run
    layers = [n for n, _ in model.named_children()][:2]
    args = (model, traj, TensorDataset(X, Y), nll)
    ref = TrainingDataInfluence(*args, train_jvp=False).explain(X[:2], target=Y[:2], layers=layers)
    got = TrainingDataInfluence(*args, train_jvp=True, train_batch_size=3).explain(X[:2], target=Y[:2], layers=layers)
    assert got.scores.shape[-1] == 2
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=1e-12 * float(ref.scores.abs().max()))


def test_automatic_choice_is_by_the_size_of_the_per_sample_gradients():
    assert not use_train_jvp(None, 32, 10_000, torch.float64)
    assert use_train_jvp(None, 32, 10_000_000, torch.float64)  # 2.4 GiB of per-sample gradients
    assert use_train_jvp(None, 32, 10_000, torch.float64, budget=1 << 20)
    assert not use_train_jvp(False, 32, 10_000_000, torch.float64)
    assert use_train_jvp(True, 1, 1, torch.float64)


def test_train_jvp_option_is_validated():
    with pytest.raises(TypeError, match="train_jvp"):
        from captum_explaind import EPKOptions

        EPKOptions(train_jvp="yes")


class BatchNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x)))).log_softmax(-1)


def test_jvp_through_train_mode_batch_norm_equals_the_coupled_path(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = BatchNormMLP().double()  # trained in train mode: each sample's loss depends on its batch
    X, Y = make_data("vector", 30)
    traj, _ = record_run(model, X, Y, tmp_path / "t", RunConfig(OPTIMIZERS["sgd_momentum"], steps=5, micro=2))
    args = (model, traj, TensorDataset(X, Y), nll)
    ref = TrainingDataInfluence(*args, train_jvp=False).explain(X[:3], target=Y[:3])
    assert ref.train_grads == "coupled"
    monkeypatch.setattr(train_grads.CoupledGrads, "jacobian", _no_per_sample_grads)
    got = TrainingDataInfluence(*args, train_jvp=True).explain(X[:3], target=Y[:3])
    assert got.train_grads == "coupled+jvp"
    scale = float(ref.scores.abs().max())
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(got.residual, ref.residual, rtol=0, atol=1e-12 * scale)
