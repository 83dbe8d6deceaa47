"""The same computations on a CUDA device: recording there, and every view computed there.

Skipped where no GPU is present (CI has none). Each result computed on the GPU is checked
against the real model output (completeness) and against the same computation on the CPU, which
the other test modules check against the brute-force reference.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils.data import TensorDataset

from captum_explaind import (
    ExactPathKernel,
    ParameterInfluence,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
    TrajectoryRecorder,
)

from training import (
    OPTIMIZERS,
    SCHEDULERS,
    RunConfig,
    TanhMLP,
    TinyTransformer,
    loss_fn_for,
    make_data,
    outputs_at,
    record_run,
)

# EXPLAIND_TEST_DEVICE=cpu runs this module on the CPU (a dry run of the tests themselves)
CUDA = torch.device(os.environ.get("EXPLAIND_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """A run recorded on the CPU (mini-batches, accumulation, clipping, a schedule)."""
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 24)
    cfg = RunConfig(OPTIMIZERS["adam_l2"], steps=6, micro=2, clip=0.5, scheduler=SCHEDULERS["onecycle"])
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("cuda") / "t", cfg)
    return model, traj, X, Y


def test_reconstruct_on_cuda_matches_cpu_and_model(cpu_run):
    model, traj, X, _ = cpu_run
    x = X[:6]
    cpu = ExactPathKernel(model, traj, device="cpu").reconstruct(x)
    gpu = ExactPathKernel(model, traj, device=CUDA).reconstruct(x.to(CUDA))
    assert gpu.kernel.device.type == CUDA.type
    change = (outputs_at(model, traj, x.to(CUDA), traj.num_steps) - outputs_at(model, traj, x.to(CUDA), 0))
    scale = float(change.abs().max())
    parts = gpu.kernel + gpu.regularization + gpu.residual
    assert float((parts - change).abs().max()) <= 1e-9 * scale
    assert float(gpu.delta.abs().max()) <= 1e-9 * scale
    for name in ("initial", "kernel", "regularization", "final"):
        assert torch.allclose(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=0, atol=1e-10 * max(scale, 1.0)), name


def test_views_on_cuda_match_cpu(cpu_run):
    model, traj, X, _ = cpu_run
    x = X[:4]
    p_cpu = ParameterInfluence(model, traj, device="cpu").attribute(x, target=1)
    p_gpu = ParameterInfluence(model, traj, device=CUDA).attribute(x.to(CUDA), target=1)
    assert set(p_cpu) == set(p_gpu)
    for name in p_cpu:
        assert p_gpu[name].device.type == CUDA.type
        assert torch.allclose(p_gpu[name].cpu(), p_cpu[name], rtol=1e-9, atol=1e-12), name
    s_cpu, d_cpu = StepInfluence(model, traj, device="cpu").attribute(
        x, target=1, layers=["fc1", "fc2"], return_convergence_delta=True)
    s_gpu, d_gpu = StepInfluence(model, traj, device=CUDA).attribute(
        x.to(CUDA), target=1, layers=["fc1", "fc2"], return_convergence_delta=True)
    assert s_gpu.shape == s_cpu.shape == (4, traj.num_steps, 2)
    assert torch.allclose(s_gpu.cpu(), s_cpu, rtol=1e-9, atol=1e-12)
    assert float(d_gpu.abs().max()) < 1e-9


def test_data_view_and_similarity_on_cuda_match_cpu(cpu_run):
    model, traj, X, Y = cpu_run
    x, y = X[:3], Y[:3]
    loss = loss_fn_for("nll")
    cpu = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss, device="cpu")
    gpu = TrainingDataInfluence(model, traj, TensorDataset(X.to(CUDA), Y.to(CUDA)), loss_fn=loss, device=CUDA)
    d_cpu = cpu.decompose(x, target=y)
    d_gpu = gpu.decompose(x.to(CUDA), target=y.to(CUDA))
    assert d_gpu.scores.device.type == CUDA.type
    assert torch.allclose(d_gpu.scores.cpu(), d_cpu.scores, rtol=1e-9, atol=1e-12)
    assert torch.allclose(d_gpu.residual.cpu(), d_cpu.residual, rtol=1e-9, atol=1e-12)
    total = d_gpu.scores.sum(1) + d_gpu.regularization + d_gpu.residual + d_gpu.delta
    assert torch.allclose(total, d_gpu.change, rtol=0, atol=1e-9)
    # Captum's influence contract on the GPU: labels are the last element of the inputs tuple
    idx, vals = gpu.influence((x.to(CUDA), y.to(CUDA)), k=3)
    assert torch.equal(idx.cpu(), d_cpu.scores.topk(3, dim=1).indices)

    sim_cpu = PredictionSimilarity(model, traj, TensorDataset(X, Y), loss_fn=loss, device="cpu").attribute(x, target=y)
    sim_gpu = PredictionSimilarity(model, traj, TensorDataset(X.to(CUDA), Y.to(CUDA)), loss_fn=loss,
                                   device=CUDA).attribute(x.to(CUDA), target=y.to(CUDA))
    assert torch.allclose(sim_gpu.cpu(), sim_cpu, rtol=1e-9, atol=1e-12)


def test_record_on_cuda_then_explain_anywhere(tmp_path):
    """A run trained and recorded on the GPU reconstructs on the GPU and on the CPU alike."""
    torch.manual_seed(1)
    model = TinyTransformer().double().to(CUDA)
    X, Y = make_data("tokens", 16)
    X, Y = X.to(CUDA), Y.to(CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, tmp_path / "gpu_run") as rec:
        for step in range(5):
            idx = torch.arange(step, step + 8) % len(X)
            opt.zero_grad()
            torch.nn.functional.nll_loss(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    assert traj.num_steps == 5
    x = X[:4]
    change = outputs_at(model, traj, x, 5) - outputs_at(model, traj, x, 0)
    opts = dict(error_control=True, rtol=1e-8)
    gpu = ExactPathKernel(model, traj, **opts).reconstruct(x)  # device=None: the model's device
    assert gpu.kernel.device.type == CUDA.type
    cpu_model = copy.deepcopy(model).cpu()
    cpu = ExactPathKernel(cpu_model, traj, **opts).reconstruct(x.cpu())
    scale = float(change.abs().max())
    assert float((gpu.kernel + gpu.regularization - change).abs().max()) <= 1e-6 * scale
    assert torch.allclose(gpu.kernel.cpu(), cpu.kernel, rtol=0, atol=1e-6 * scale)
