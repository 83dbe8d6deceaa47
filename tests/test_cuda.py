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


# ----------------------------------------------------------------------------- paths beyond the defaults
def test_forward_mode_training_side_on_cuda_matches_cpu(cpu_run):
    """The data view's jvp training side (train_jvp=True) on the GPU equals the per-sample path on the CPU."""
    model, traj, X, Y = cpu_run
    x, y = X[:3], Y[:3]
    loss = loss_fn_for("nll")
    cpu = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss, device="cpu",
                                train_jvp=False).explain(x, target=y)
    gpu = TrainingDataInfluence(model, traj, TensorDataset(X.to(CUDA), Y.to(CUDA)), loss_fn=loss, device=CUDA,
                                train_jvp=True).explain(x.to(CUDA), target=y.to(CUDA))
    assert "jvp" in gpu.train_grads and "jvp" not in cpu.train_grads
    scale = float(cpu.scores.abs().max())
    assert float((gpu.scores.cpu() - cpu.scores).abs().max()) <= 1e-10 * scale
    total = gpu.scores.sum(1) + gpu.regularization + gpu.residual + gpu.buffers + gpu.delta
    assert float((total - gpu.change).abs().max()) <= 1e-10 * float(gpu.change.abs().max())


def test_memory_budget_on_cuda_bounds_the_gpu_peak(cpu_run):
    """max_memory= on the GPU: the same scores as unbatched, and the GPU's peak stays under the budget."""
    model, traj, X, Y = cpu_run
    x, y = X[:6].to(CUDA), Y[:6].to(CUDA)
    train = TensorDataset(X.to(CUDA), Y.to(CUDA))
    loss = loss_fn_for("nll")
    whole = TrainingDataInfluence(model, traj, train, loss_fn=loss, device=CUDA).explain(x, target=y)
    budget = 4 * 2**20
    on_gpu = CUDA.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(CUDA)
        torch.cuda.reset_peak_memory_stats(CUDA)
        before = torch.cuda.memory_allocated(CUDA)
    cut = TrainingDataInfluence(model, traj, train, loss_fn=loss, device=CUDA, max_memory=budget,
                                max_evaluations=64).explain(x, target=y)
    if on_gpu:
        torch.cuda.synchronize(CUDA)
        peak = torch.cuda.max_memory_allocated(CUDA) - before
        assert peak <= budget, f"GPU peak {peak / 2**20:.1f} MiB over the {budget / 2**20:.0f} MiB budget"
    scale = float(whole.scores.abs().max())
    assert float((cut.scores - whole.scores).abs().max()) <= 1e-12 * scale
    assert float((cut.regularization - whole.regularization).abs().max()) <= 1e-12 * scale


class _DropNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 8)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def test_dropout_masks_drawn_on_cuda_are_replayed(tmp_path):
    """Dropout trained on the GPU: the recorder keeps the CUDA RNG state of every micro-batch and the
    data view, on the GPU, replays the masks (complete to round-off; without them it misses)."""
    from captum_explaind.errors import ResidualWarning

    torch.manual_seed(0)
    model = _DropNet().double().to(CUDA)
    X = torch.randn(12, 5, dtype=torch.float64, device=CUDA)
    Y = torch.randint(0, 3, (12,), device=CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    with TrajectoryRecorder(model, opt, tmp_path / "drop") as rec:
        for s in range(4):
            idx = torch.arange(3 * s, 3 * s + 5, device=CUDA) % 12
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    if CUDA.type == "cuda":
        assert traj.record(1).batches[0].cuda_rng_state is not None
    res = TrainingDataInfluence(model, traj, TensorDataset(X, Y)).explain(X[:2], target=0)
    assert res.train_grads == "coupled" and res.scores.device.type == CUDA.type
    change = float(res.change.abs().max())
    assert float(res.residual.abs().max()) < 1e-12 * change
    total = res.scores.sum(1) + res.regularization + res.residual + res.buffers + res.delta
    assert float((total - res.change).abs().max()) <= 1e-12 * max(change, 1.0)
    with pytest.warns(ResidualWarning):  # negative control: without the masks the replay misses
        off = TrainingDataInfluence(model, traj, TensorDataset(X, Y), train_grads="independent").explain(
            X[:2], target=0)
    assert float(off.residual.abs().max()) > 1e-3 * change


def test_keep_every_polyline_on_cuda_matches_cpu(tmp_path):
    """keep_every=2: the training view (exact on the polyline) and the polyline data view on the GPU
    equal the CPU's."""
    from captum_explaind.errors import ResidualWarning

    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 24)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(2)
    loss = loss_fn_for("nll")
    with TrajectoryRecorder(model, opt, tmp_path / "kept", keep_every=2) as rec:
        for _ in range(6):
            idx = torch.randperm(len(X), generator=g)[:6]
            opt.zero_grad()
            loss(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    x, y = X[:3], Y[:3]
    s_cpu = StepInfluence(model, traj, device="cpu").attribute(x, target=y, layers=["fc1", "fc2"])
    s_gpu = StepInfluence(model, traj, device=CUDA).attribute(x.to(CUDA), target=y.to(CUDA), layers=["fc1", "fc2"])
    assert torch.allclose(s_gpu.cpu(), s_cpu, rtol=1e-9, atol=1e-12)
    views = []
    for dev, data in (("cpu", TensorDataset(X, Y)), (CUDA, TensorDataset(X.to(CUDA), Y.to(CUDA)))):
        with pytest.warns(ResidualWarning, match="polyline"):
            views.append(TrainingDataInfluence(model, traj, data, loss_fn=loss, device=dev, polyline=True).explain(
                x.to(dev), target=y.to(dev)))
    cpu, gpu = views
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, rtol=1e-9, atol=1e-12)
    assert torch.allclose(gpu.residual.cpu(), cpu.residual, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:vmap .* does not work:RuntimeWarning")
def test_trainer_on_cuda_records_and_every_view_runs_there(tmp_path):
    """A transformers.Trainer run on the GPU (the callback records there); reconstruction and the data
    view on the GPU are complete and equal the CPU's on the same recording."""
    pytest.importorskip("transformers")
    from captum_explaind.adapters.huggingface import TrajectoryCallback

    import hf_models as hf

    tok = hf.make_tokenizer()
    rows = hf.classification_rows(tok, hf.sentences(8, seed=5))
    model = hf.tiny_bert()
    cb = TrajectoryCallback(tmp_path / "traj")
    hf.trainer_run(model, hf.DictDataset(rows), hf.PadCollate(), tmp_path / "out", callbacks=[cb],
                   use_cpu=CUDA.type == "cpu", per_device_train_batch_size=4, num_train_epochs=2,
                   learning_rate=2e-3, weight_decay=0.01)
    traj = cb.trajectory
    assert next(model.parameters()).device.type == CUDA.type
    enc = dict(tok(hf.sentences(3, seed=8), padding=True, return_tensors="pt"))
    target = torch.tensor([0, 1, 1])
    gpu_enc = {k: v.to(CUDA) for k, v in enc.items()}
    parts = ExactPathKernel(model, traj).reconstruct(gpu_enc)
    assert parts.kernel.device.type == CUDA.type
    total = parts.initial + parts.kernel + parts.regularization + parts.buffers + parts.other + parts.delta
    assert float((parts.final - total).abs().max()) <= 1e-9
    gpu = TrainingDataInfluence(model, traj, hf.DictDataset(rows), collate_fn=hf.PadCollate()).explain(
        gpu_enc, target=target.to(CUDA))
    cpu_model = copy.deepcopy(model).cpu()
    cpu = TrainingDataInfluence(cpu_model, traj, hf.DictDataset(rows), collate_fn=hf.PadCollate()).explain(
        enc, target=target)
    change = float(cpu.change.abs().max())
    assert float((gpu.scores.sum(1) + gpu.regularization + gpu.residual + gpu.delta - gpu.change).abs().max()) <= 1e-9
    assert float((gpu.scores.cpu() - cpu.scores).abs().max()) <= 1e-9 * max(change, float(cpu.scores.abs().max()))
