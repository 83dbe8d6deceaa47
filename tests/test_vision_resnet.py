"""torchvision models through the adapter: a ResNet's BatchNorm handled exactly in every view (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from captum_explaind import ExactPathKernel, ParameterInfluence, TrainingDataInfluence, TrajectoryRecorder
from captum_explaind.epk.train_grads import CoupledGrads, select_train_grads

tv = pytest.importorskip("captum_explaind.adapters.torchvision")
import torchvision  # noqa: E402  (importable through the adapter on a CPU torch)

LAYERS = {"body": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"], "head": ["fc"]}
# 11 M parameters on 2 CPU cores: a fixed 2-node rule (no refinement) keeps the tests short; the delta is then
# the quadrature error of that rule, and everything else is checked against plain forward passes
FAST = {"options": "fast", "dtype": torch.float64}


def record(model, X, Y, path, steps=2, batch=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    rec = TrajectoryRecorder(model, opt, path)
    model.train()
    with rec:
        for s in range(steps):
            idx = torch.arange(s * batch, (s + 1) * batch) % len(X)
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def plain_output(model, traj, x, step, buffer_step=None):
    """f(θ_step, b_step; x) (or with the buffers of ``buffer_step``) from a plain eval-mode copy."""
    m = copy.deepcopy(model).eval()
    state = {**m.state_dict(), **traj.params(step), **traj.buffers(step if buffer_step is None else buffer_step)}
    m.load_state_dict(state)
    with torch.no_grad():
        return m(x)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).double()
    X = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    Y = torch.randint(0, 3, (8,))
    traj = record(model, X, Y, tmp_path_factory.mktemp("resnet") / "run")
    return model, traj, X, Y


@pytest.mark.slow
def test_resnet18_model_view_with_batchnorm_buffers_is_complete(resnet):
    model, traj, X, _ = resnet
    x = X[:1] + 0.05
    change = (plain_output(model, traj, x, traj.num_steps) - plain_output(model, traj, x, 0))[:, 1]
    res = ParameterInfluence(model, traj, **FAST).explain(x, target=1, layers=LAYERS, method="jvp")
    buffers = res.buffers[:, 0]
    assert float(buffers.abs().max()) > 1e-3 * float(change.abs().max())  # BatchNorm statistics moved
    scale = float(change.abs().max()) + float(buffers.abs().max())
    total = res.scores["total"][:, 0].sum(-1) + buffers + res.delta[:, 0]
    torch.testing.assert_close(total, change, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(res.change[:, 0], change, rtol=0, atol=1e-12 * scale)
    # the buffers component is the jumps f(θ_s, b_s) − f(θ_s, b_{s−1}) of plain forward passes
    jumps = sum(plain_output(model, traj, x, s) - plain_output(model, traj, x, s, s - 1)
                for s in range(1, traj.num_steps + 1))[:, 1]
    torch.testing.assert_close(buffers, jumps, rtol=0, atol=1e-12 * scale)


@pytest.fixture(scope="module")
def tdi18(resnet):
    model, traj, X, Y = resnet
    return TrainingDataInfluence(model, traj, TensorDataset(X, Y), **FAST)


@pytest.mark.slow
def test_resnet18_coupled_gradients_equal_per_sample_autograd_through_the_batch(resnet, tdi18):
    model, traj, X, Y = resnet
    tdi = tdi18
    grads = select_train_grads(tdi.epk, tdi.train, tdi.loss_fn)
    assert isinstance(grads, CoupledGrads)
    rec = traj.record(2)
    theta = tdi.epk.theta(1)
    got = dict((int(i), w) for idx, W in grads.weighted_grads(rec, theta) for i, w in zip(idx, W))
    # brute force: the whole micro-batch in train mode, one sample's loss differentiated at a time
    m = copy.deepcopy(model).train()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in traj.params(1).items()}
    bufs = {k: v.clone() for k, v in traj.buffers(1).items()}
    mb = rec.batches[0]
    losses = nn.functional.cross_entropy(functional_call(m, {**params, **bufs}, (X[mb.indices],)), Y[mb.indices],
                                         reduction="none")
    for r, k in enumerate(mb.indices.tolist()):
        g = torch.autograd.grad(losses[r], list(params.values()), retain_graph=True)
        ref = float(mb.weights[r]) * torch.cat([t.reshape(-1) for t in g])
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.slow
def test_resnet18_data_view_residual_is_round_off(resnet, tdi18):
    """Fixed 2-node rule (no refinement): the delta is quadrature error, the residual is round-off."""
    model, traj, X, Y = resnet
    x = X[:1] + 0.05
    res = tdi18.explain(x, target=0)
    # coupled through the batch statistics (for 11 M parameters possibly by forward mode: "coupled+jvp")
    assert res.train_grads.startswith("coupled")
    change = plain_output(model, traj, x, traj.num_steps)[:, 0] - plain_output(model, traj, x, 0)[:, 0]
    assert float(res.residual.abs().max()) < 1e-10 * float(change.abs().max())
    total = res.scores.sum(1) + res.regularization + res.residual + res.buffers + res.delta
    torch.testing.assert_close(total, change, rtol=0, atol=1e-12 * (float(change.abs().max()) + 1))
    assert res.grad_scale == pytest.approx({1: 1.0, 2: 1.0}, abs=1e-12)


def test_resnet9_records_and_explains(tmp_path):
    torch.manual_seed(0)
    model = tv.ResNet9(num_classes=2, width=2, in_channels=1).double()
    X, Y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 2, (8,))
    traj = record(model, X, Y, tmp_path / "r9")
    x = X[:2]
    change = plain_output(model, traj, x, traj.num_steps) - plain_output(model, traj, x, 0)
    parts = ExactPathKernel(model, traj).reconstruct(x)
    total = parts.initial + parts.kernel + parts.regularization + parts.buffers + parts.delta
    torch.testing.assert_close(total, plain_output(model, traj, x, traj.num_steps), rtol=0, atol=1e-12)
    assert float(parts.buffers.abs().max()) > 0 and float(parts.delta.abs().max()) < 1e-8 * float(change.abs().max())
