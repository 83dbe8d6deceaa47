"""Half-precision storage and background writes (issue 9 item 4, issue 13).

The rounding of a bfloat16/float16 recording must be *reported* by the data view's residual
(never folded into scores), completeness must hold on the stored path (the model evaluated at the
stored θ), and a background-written recording must equal a synchronously written one bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from captum_explaind import ExactPathKernel, TrainingDataInfluence, Trajectory, TrajectoryRecorder

from recording_utils import assert_params_equal, nll
from training import TanhMLP, make_data


def _train(path, store_dtype=None, background=False, steps=5, seed=0):
    torch.manual_seed(seed)
    model = TanhMLP(log_softmax=True).double()
    X, Y = make_data("vector", 24)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    with TrajectoryRecorder(model, opt, path, store_dtype=store_dtype, background=background) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(X), (6,), generator=g)
            opt.zero_grad()
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
    return model, X, Y, Trajectory.open(path)


def _forward_at(model, traj, step, x):
    m = copy.deepcopy(model)
    m.load_state_dict({k: v.double() for k, v in traj.params(step).items()}, strict=False)
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("store_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounding_is_reported_in_the_residual_and_completeness_holds_on_the_stored_path(
        tmp_path, store_dtype):
    model, X, Y, exact = _train(tmp_path / "f64")
    _, _, _, half = _train(tmp_path / "half", store_dtype=store_dtype)
    assert half.params(1)["fc1.weight"].dtype == store_dtype
    assert exact.bytes_per_step - half.bytes_per_step > 75 * 5  # 75 values in 2 instead of 8 bytes (+ header)
    x, target = X[:4], Y[:4]
    ds = TensorDataset(X, Y)
    res_exact = TrainingDataInfluence(model, exact, ds, loss_fn=nll).decompose(x, target=target)
    res_half = TrainingDataInfluence(model, half, ds, loss_fn=nll).decompose(x, target=target)
    # float64 storage: nothing unexplained; half storage: the rounding is there, reported
    assert float(res_exact.residual.abs().max()) < 1e-10
    assert float(res_half.residual.abs().max()) > 1e3 * max(float(res_exact.residual.abs().max()), 1e-14)
    # completeness on the stored path: the change is f(stored θ_N) - f(stored θ_0), all of it accounted
    q = torch.arange(4)
    change = (_forward_at(model, half, half.num_steps, x) - _forward_at(model, half, 0, x))[q, target]
    torch.testing.assert_close(res_half.change, change, rtol=0, atol=1e-10)
    total = res_half.scores.sum(1) + res_half.regularization + res_half.residual + res_half.delta
    torch.testing.assert_close(total, change, rtol=0, atol=1e-10)
    # the model view on the same stored path is complete too
    rec = ExactPathKernel(model, half).reconstruct(x)
    torch.testing.assert_close(rec.final, _forward_at(model, half, half.num_steps, x), rtol=0, atol=1e-10)
    parts = rec.initial + rec.kernel + rec.regularization + rec.residual + rec.buffers + rec.other + rec.delta
    torch.testing.assert_close(parts, rec.final, rtol=0, atol=1e-10)


def test_background_writer_records_the_same_files_and_reports_bytes_per_step(tmp_path):
    _, _, _, sync = _train(tmp_path / "sync")
    _, _, _, bg = _train(tmp_path / "bg", background=True)
    assert bg.num_steps == sync.num_steps == 5
    for s in range(bg.num_steps + 1):
        assert_params_equal(bg.params(s), sync.params(s))
    for s in range(1, bg.num_steps + 1):
        assert bg.record(s).batches[0].indices.tolist() == sync.record(s).batches[0].indices.tolist()
    assert "/step" in repr(bg) and bg.bytes_per_step > 0
