"""Train-mode BatchNorm: every view reports the running-statistics change as ``buffers``, and the data
and similarity views differentiate each sample's loss through its batch's statistics.

The brute force here is independent of ``captum_explaind.epk``: a plain copy of the model in train
mode forwards each recorded micro-batch as a whole, and ``torch.autograd.grad`` differentiates one
sample's loss at a time; SGD's momentum sum is written out explicitly; Φ_s comes from 12-node
Gauss–Legendre on explicit Jacobians (``jacrev``) of the eval-mode model with the recorded buffers.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import TensorDataset

from captum_explaind import (
    ExactPathKernel,
    ParameterInfluence,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
    TrajectoryRecorder,
)
from captum_explaind.epk.train_grads import CoupledGrads, IndependentGrads, select_train_grads, training_modes

LR, MU = 0.1, 0.9


class BNNet(nn.Module):
    """Conv → BatchNorm2d → tanh → pool → Linear → BatchNorm1d → tanh → Linear (smooth)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(27, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.avg_pool2d(torch.tanh(self.bn(self.conv(x))), 2, ceil_mode=True)
        return self.fc2(torch.tanh(self.bn1(self.fc1(h.flatten(1)))))


# steps × micro-batches: step 3 accumulates two micro-batches (each normalized by its own statistics)
BATCHES = [[[0, 1, 2, 3, 4, 5]], [[6, 7, 8, 9, 10, 11]], [[1, 3, 5, 7], [12, 13, 14, 15]], [[2, 4, 6, 8, 10, 12]],
           [[0, 15, 14, 9, 3, 11]]]


def record(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, path) -> object:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MU)
    rec = TrajectoryRecorder(model, opt, path)
    model.train()
    with rec:
        for micros in BATCHES:
            opt.zero_grad()
            for idx in micros:
                i = torch.tensor(idx)
                (nn.functional.cross_entropy(model(X[i]), Y[i]) / len(micros)).backward()
                rec.log_batch(i)
            opt.step()
    return rec.trajectory


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = BNNet().double()
    X = torch.randn(16, 1, 5, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (16,))
    traj = record(model, X, Y, tmp_path_factory.mktemp("bn") / "run")
    return model, traj, X, Y, X[:3] + 0.1


# ----------------------------------------------------------------------------- brute force
def names_of(traj):
    return list(traj.trainable)


def flat(traj, s):
    p = traj.params(s, dtype=torch.float64)
    return torch.cat([p[n].reshape(-1) for n in names_of(traj)])


def unflat(traj, theta):
    out, start = {}, 0
    for n in names_of(traj):
        shape = traj.spec[n].shape
        size = int(np.prod(shape)) if len(shape) else 1
        out[n] = theta[start:start + size].reshape(shape)
        start += size
    return out


def brute_weighted_grads(model, traj, X, Y, s):
    """``[M, P]``: Σ over the micro-batches of step s of w_k ∇ℓ_k, each ℓ_k through a full-batch
    train-mode forward at θ_{s−1}, one sample at a time (autograd)."""
    m = copy.deepcopy(model).train()
    theta = flat(traj, s - 1)
    out = torch.zeros(len(X), theta.numel(), dtype=torch.float64)
    for mb in traj.record(s).batches:
        th = theta.clone().requires_grad_(True)
        bufs = {k: v.clone() for k, v in traj.buffers(s - 1, dtype=torch.float64).items()}
        losses = nn.functional.cross_entropy(functional_call(m, {**unflat(traj, th), **bufs}, (X[mb.indices],)),
                                             Y[mb.indices], reduction="none")
        for r, k in enumerate(mb.indices.tolist()):
            (g,) = torch.autograd.grad(losses[r], th, retain_graph=True)
            out[k] += float(mb.weights[r]) * g
    return out


def brute_phi(model, traj, x, s, nodes=12):
    """``[Q, O, P]`` = ∫ J_f(θ_{s−1} + tΔ_s; x) dt, eval mode with the buffers in effect before step s."""
    m = copy.deepcopy(model).eval()
    bufs = traj.buffers(s - 1, dtype=torch.float64)
    th0, th1 = flat(traj, s - 1), flat(traj, s)
    t, w = np.polynomial.legendre.leggauss(nodes)
    out = 0.0
    for tn, wn in zip((t + 1) / 2, w / 2):
        th = th0 + float(tn) * (th1 - th0)
        out = out + float(wn) * jacrev(lambda p: functional_call(m, {**unflat(traj, p), **bufs}, (x,)))(th)
    return out


def f_at(model, traj, x, s):
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        return functional_call(m, {**unflat(traj, flat(traj, s)), **traj.buffers(s, dtype=torch.float64)}, (x,))


@pytest.fixture(scope="module")
def brute(run):
    """Per-sample updates Δ_s^{(k)} (SGD momentum written out) and Φ_s for the test inputs."""
    model, traj, X, Y, x = run
    N = traj.num_steps
    G = [brute_weighted_grads(model, traj, X, Y, s) for s in range(1, N + 1)]
    c = []
    for s in range(1, N + 1):
        rec = traj.record(s)
        c.append(rec.grad_norm / float(G[s - 1].sum(0).norm()))
    per_sample = []  # Δ_s^{(k)} = −lr Σ_{i≤s} μ^{s−i} c_i w_{i,k} ∇ℓ_k^{(i)}
    b = torch.zeros_like(G[0])
    for s in range(N):
        b = MU * b + c[s] * G[s] if s else c[s] * G[s]
        per_sample.append(-LR * b)
    phis = [brute_phi(model, traj, x, s) for s in range(1, N + 1)]
    return {"G": G, "c": c, "per_sample": per_sample, "phi": phis}


# ----------------------------------------------------------------------------- tests
def test_modes_detected_from_the_recording_and_coupled_chosen(run):
    model, traj, X, Y, _ = run
    modes = training_modes(traj, model)
    assert set(modes.batch_norm) == {"bn", "bn1"}
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y))
    assert isinstance(select_train_grads(tdi.epk, tdi.train, tdi.loss_fn), CoupledGrads)
    forced = TrainingDataInfluence(model, traj, TensorDataset(X, Y), train_grads="independent")
    assert isinstance(select_train_grads(forced.epk, forced.train, forced.loss_fn), IndependentGrads)


def test_coupled_grads_equal_brute_force_through_batch_statistics(run, brute):
    model, traj, X, Y, _ = run
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y))
    grads = select_train_grads(tdi.epk, tdi.train, tdi.loss_fn)
    for s in range(1, traj.num_steps + 1):
        got = torch.zeros_like(brute["G"][s - 1])
        for idx, W in grads.weighted_grads(traj.record(s), flat(traj, s - 1)):
            got.index_add_(0, idx, W)
        torch.testing.assert_close(got, brute["G"][s - 1], rtol=0, atol=1e-13)
    # the replayed batch gradient is the one training applied: scale 1, and ½ for the accumulated step
    assert np.allclose(brute["c"], [1, 1, 0.5, 1, 1], atol=1e-12)


def test_data_view_equals_brute_force_with_a_round_off_residual(run, brute):
    model, traj, X, Y, x = run
    res = TrainingDataInfluence(model, traj, TensorDataset(X, Y)).explain(x, target=1)
    assert res.train_grads == "coupled"
    ref = sum(torch.einsum("qp,kp->qk", brute["phi"][s][:, 1], brute["per_sample"][s]) for s in range(traj.num_steps))
    torch.testing.assert_close(res.scores, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    change = (f_at(model, traj, x, traj.num_steps) - f_at(model, traj, x, 0))[:, 1]
    assert float(res.residual.abs().max()) < 1e-12 * float(change.abs().max())
    assert float(res.buffers.abs().max()) > 1e-3 * float(change.abs().max())
    total = res.scores.sum(1) + res.regularization + res.residual + res.buffers + res.delta
    torch.testing.assert_close(total, change, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.change, change, rtol=0, atol=1e-12)
    assert float(res.delta.abs().max()) < 1e-9 * float(change.abs().max())


def test_independent_per_sample_gradients_miss_under_batch_norm(run, brute):
    """Negative control: the same run explained sample by sample leaves a large residual."""
    model, traj, X, Y, x = run
    res = TrainingDataInfluence(model, traj, TensorDataset(X, Y), train_grads="independent").explain(x, target=1)
    change = res.change.abs().max()
    assert float(res.residual.abs().max()) > 1e-3 * float(change)


def test_similarity_through_batch_statistics_equals_brute_force(run, brute):
    model, traj, X, Y, x = run
    res = PredictionSimilarity(model, traj, TensorDataset(X, Y)).explain(x, target=1)
    assert res.train_grads == "coupled"
    gram = 0.0
    for s in range(traj.num_steps):
        D = (brute["per_sample"][s] ** 2).sum(0)
        ph = brute["phi"][s][:, 1]
        gram = gram + (ph * D) @ ph.T
    torch.testing.assert_close(res.gram, gram, rtol=1e-9, atol=0)
    change = (f_at(model, traj, x, traj.num_steps) - f_at(model, traj, x, 0))[:, 1:2]
    torch.testing.assert_close(res.change, change, rtol=0, atol=1e-12)
    assert res.buffers is not None and float(res.buffers.abs().max()) > 0


def test_every_view_reports_buffers_and_adds_up(run):
    model, traj, X, Y, x = run
    change = (f_at(model, traj, x, traj.num_steps) - f_at(model, traj, x, 0))[:, 2]
    parts = ExactPathKernel(model, traj).reconstruct(x)
    buffers = parts.buffers[:, 2]
    assert float(buffers.abs().max()) > 1e-3 * float(change.abs().max())
    pi = ParameterInfluence(model, traj).explain(x, target=2)
    si = StepInfluence(model, traj).explain(x, target=2, window=2)
    data = TrainingDataInfluence(model, traj, TensorDataset(X, Y)).explain(x, target=2)
    for name, total, bufs, delta, reported in [
        ("model", pi.scores["total"].sum(-1)[:, 0], pi.buffers[:, 0], pi.delta[:, 0], pi.change[:, 0]),
        ("training", si.scores["total"].sum((1, 2)), si.buffers.sum(1), si.delta.sum(1), si.change.sum(1)),
        ("data", data.scores.sum(1) + data.regularization + data.residual, data.buffers, data.delta, data.change),
    ]:
        torch.testing.assert_close(bufs, buffers, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(total + bufs + delta, change, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(reported, change, rtol=0, atol=1e-12, msg=name)
        assert float(delta.abs().max()) < 1e-9 * float(change.abs().max()), name


def test_attribute_says_that_buffers_are_outside_the_scores(run):
    model, traj, X, Y, x = run
    pi = ParameterInfluence(model, traj)
    with pytest.warns(UserWarning, match="BatchNorm running statistics"):
        scores, delta = pi.attribute(x, target=0, layers=["conv", "bn", "fc1", "bn1", "fc2"],
                                     return_convergence_delta=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per explainer
        pi.attribute(x, target=0, layers=["conv", "fc2"])
    change = (f_at(model, traj, x, traj.num_steps) - f_at(model, traj, x, 0))[:, 0]
    buffers = ExactPathKernel(model, traj).reconstruct(x).buffers[:, 0]
    # the delta stays the quadrature error: scores + buffers + delta = change
    torch.testing.assert_close(scores.sum(1) + buffers + delta, change, rtol=0, atol=1e-12)
    assert float(delta.abs().max()) < 1e-9 * float(change.abs().max())


def test_models_without_changing_buffers_use_independent_grads_and_zero_buffers(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, Y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = TrajectoryRecorder(model, opt, tmp_path / "plain")
    with rec:
        for s in range(3):
            i = torch.arange(3 * s, 3 * s + 4)
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i]), Y[i]).backward()
            rec.log_batch(i)
            opt.step()
    tdi = TrainingDataInfluence(model, rec.trajectory, TensorDataset(X, Y))
    res = tdi.explain(X[:2], target=0)
    assert res.train_grads == "independent"
    assert float(res.buffers.abs().max()) == 0.0
    pi = ParameterInfluence(model, rec.trajectory).explain(X[:2], target=0)
    assert pi.buffers is not None and float(pi.buffers.abs().max()) == 0.0
