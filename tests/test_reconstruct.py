"""ExactPathKernel.reconstruct: completeness against the real model output.

Every test trains a real model with a real torch optimizer, records it, and checks that
``initial + kernel + regularization (+ other) + delta == final`` where ``final`` and ``initial``
come from plain forward passes, and that ``delta`` is as small as promised.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from captum_explaind import ExactPathKernel, TrajectoryRecorder
from captum_explaind.errors import TrajectoryError, TrajectoryMismatchError

from training import (
    OPTIMIZERS,
    SCHEDULERS,
    ReLUMLP,
    RunConfig,
    TanhMLP,
    TinyCNN,
    TinyTransformer,
    make_data,
    outputs_at,
    record_run,
)

MODELS = {
    "tanh_mlp": (TanhMLP, "vector"),
    "transformer": (TinyTransformer, "tokens"),
    "cnn": (TinyCNN, "image"),
    "relu_mlp": (ReLUMLP, "vector"),
}
SMOOTH = {"tanh_mlp", "cnn"}


def _run(tmp_path, model_name, opt_name, *, sched=None, clip=None, micro=1, steps=8, dtype=torch.float64,
         sizes=(4, 6, 3, 8, 5, 7), seed=0):
    cls, kind = MODELS[model_name]
    torch.manual_seed(seed)
    model = cls().to(dtype)
    X, Y = make_data(kind, 40, dtype=dtype, seed=seed)
    cfg = RunConfig(OPTIMIZERS[opt_name], steps=steps, micro=micro, clip=clip, sizes=sizes,
                    scheduler=None if sched is None else SCHEDULERS[sched], seed=seed)
    traj, _ = record_run(model, X, Y, tmp_path / f"{model_name}_{opt_name}", cfg)
    return model, traj, X


def _true_outputs(model, traj, x):
    """f(θ_0) and f(θ_N) by loading the recorded weights into a plain copy of the model."""
    return [outputs_at(model, traj, x, s) for s in (0, traj.num_steps)]


def _check_complete(r, model, traj, x, rel):
    f0, fN = _true_outputs(model, traj, x)
    torch.testing.assert_close(r.initial, f0, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.final, fN, rtol=0, atol=1e-12)
    recon = r.initial + r.kernel + r.regularization + r.residual + r.buffers + r.other
    scale = float((fN - f0).abs().max())
    err = float((recon - fN).abs().max())
    assert err <= rel * scale, f"completeness error {err:.3e} > {rel:.1e} × {scale:.3e}"
    torch.testing.assert_close(r.delta, fN - recon, rtol=0, atol=1e-12)
    return err / scale


OPTS = ["sgd_plain", "sgd_momentum", "sgd_dampening", "sgd_nesterov", "sgd_decay",
        "adam", "adam_l2", "adam_l2_amsgrad", "adamw", "adamw_groups"]


@pytest.mark.parametrize("opt", OPTS)
@pytest.mark.parametrize("sched", [None, "step", "cosine", "onecycle"])
def test_completeness_tanh_mlp_all_optimizers_and_schedules(tmp_path, opt, sched):
    model, traj, X = _run(tmp_path, "tanh_mlp", opt, sched=sched, clip=0.5, micro=2)
    r = ExactPathKernel(model, traj).reconstruct(X[:5])
    _check_complete(r, model, traj, X[:5], rel=1e-9)
    if opt in ("sgd_dampening", "sgd_nesterov", "sgd_decay", "adam_l2", "adam_l2_amsgrad", "adamw", "adamw_groups"):
        assert float(r.regularization.abs().max()) > 1e-6  # decay is really present and split off
    else:
        assert float(r.regularization.abs().max()) == 0.0


@pytest.mark.parametrize("model_name", ["transformer", "cnn", "relu_mlp"])
@pytest.mark.parametrize("opt", ["sgd_nesterov", "adam_l2_amsgrad", "adamw_groups"])
def test_completeness_other_architectures(tmp_path, model_name, opt):
    model, traj, X = _run(tmp_path, model_name, opt, sched="warmup_cosine", clip=1.0, micro=3,
                          sizes=(5, 2, 7, 3))
    x = X[:5]
    r = ExactPathKernel(model, traj).reconstruct(x)
    # Default tolerance is rtol=1e-10 per step: smooth models sit at round-off, ReLU kinks
    # (transformer MLP, relu MLP) are localised and refined until the tolerance is met.
    _check_complete(r, model, traj, x, rel=1e-9)
    assert r.unconverged == 0


def test_partial_last_batch_and_duplicate(tmp_path):
    # 40 samples, sizes cycling with a last short batch and a duplicated index (see training.make_batches)
    model, traj, X = _run(tmp_path, "tanh_mlp", "adamw", sizes=(16, 16, 8), steps=6)
    sizes = [sum(len(b.indices) for b in traj.record(s).batches) for s in range(1, 7)]
    assert sizes == [16, 16, 8, 16, 16, 8]
    r = ExactPathKernel(model, traj).reconstruct(X[:4])
    _check_complete(r, model, traj, X[:4], rel=1e-9)


def test_error_falls_as_nodes_grow_without_control(tmp_path):
    model, traj, X = _run(tmp_path, "tanh_mlp", "sgd_momentum", steps=10)
    errs = [
        ExactPathKernel(model, traj, nodes=n, error_control=False).reconstruct(X[:5]).max_abs_delta()
        for n in (1, 2, 3, 4)
    ]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[1] / errs[3] > 1e3  # Gauss–Legendre gains ~10^3 per node on smooth steps
    mids = [
        ExactPathKernel(model, traj, quadrature="midpoint", nodes=n).reconstruct(X[:5]).max_abs_delta()
        for n in (5, 50)
    ]
    assert 50 < mids[0] / mids[1] < 200  # midpoint rule is O(n^-2)


def test_relu_error_control_beats_fixed_rules(tmp_path):
    model, traj, X = _run(tmp_path, "relu_mlp", "adamw", steps=10)
    fixed = ExactPathKernel(model, traj, nodes=8, error_control=False).reconstruct(X[:6])
    for rtol in (1e-4, 1e-8):
        adaptive = ExactPathKernel(model, traj, nodes=4, rtol=rtol).reconstruct(X[:6])
        steps_change = (fixed.final - fixed.initial).abs().max()
        assert adaptive.max_abs_delta() <= max(10 * rtol * float(steps_change), 1e-13)
    assert fixed.relative_delta() > 1e-6  # a fixed rule stalls on the kinks
    assert adaptive.relative_delta() < 1e-7


def test_float32_trajectory(tmp_path):
    model, traj, X = _run(tmp_path, "tanh_mlp", "adamw", dtype=torch.float32)
    r32 = ExactPathKernel(model, traj, dtype=None).reconstruct(X[:5])  # None: the trajectory's dtype
    assert r32.final.dtype == torch.float32
    # float32 floor: ~10 ulps of |f| (MATH.md §6)
    assert r32.max_abs_delta() < 5e-6
    r64 = ExactPathKernel(model, traj).reconstruct(X[:5])  # the "exact" preset computes in float64
    assert r64.final.dtype == torch.float64 and r64.options["dtype"] == "float64"
    assert r64.relative_delta() < 1e-12  # the recorded float32 path is exact in float64


def test_parameter_subset_and_other(tmp_path):
    model, traj, X = _run(tmp_path, "tanh_mlp", "adamw")
    full = ExactPathKernel(model, traj).reconstruct(X[:4])
    sub = ExactPathKernel(model, traj, parameters=[model.fc1]).reconstruct(X[:4])
    rest = ExactPathKernel(model, traj, parameters="fc2.*").reconstruct(X[:4])
    torch.testing.assert_close(sub.kernel + rest.kernel, full.kernel, rtol=0, atol=1e-12)
    torch.testing.assert_close(sub.regularization + rest.regularization, full.regularization, rtol=0, atol=1e-12)
    torch.testing.assert_close(sub.other, rest.kernel + rest.regularization, rtol=0, atol=1e-11)
    assert sub.max_abs_delta() < 1e-12


def test_batching_invariance(tmp_path):
    model, traj, X = _run(tmp_path, "transformer", "adamw")
    a = ExactPathKernel(model, traj).reconstruct(X[:7])
    b = ExactPathKernel(model, traj, batch_size=3).reconstruct(X[:7])
    for name in ("kernel", "regularization", "final", "initial"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-11)


def test_additional_forward_args(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TanhMLP()

        def forward(self, x, scale):
            return self.net(x * scale)

    torch.manual_seed(0)
    model = Scaled().double()
    X, Y = make_data("vector", 20)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrajectoryRecorder(model, opt, tmp_path / "t") as rec:
        for s in range(5):
            idx = torch.arange(4 * s, 4 * s + 4)
            opt.zero_grad()
            nn.functional.nll_loss(model(X[idx], 2.0), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    scale = torch.full((6, 1), 2.0, dtype=torch.float64)
    r = ExactPathKernel(model, traj).reconstruct(X[:6], additional_forward_args=(scale,))
    assert r.relative_delta() < 1e-9
    r2 = ExactPathKernel(model, traj).reconstruct(X[:6], additional_forward_args=2.0)
    torch.testing.assert_close(r.kernel, r2.kernel)


def test_batchnorm_buffers_are_a_state_term(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3), nn.LogSoftmax(-1)).double()
    X, Y = make_data("vector", 24)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, tmp_path / "bn") as rec:
        for s in range(6):
            idx = torch.arange(4 * s, 4 * s + 4)
            model.train()
            opt.zero_grad()
            nn.functional.nll_loss(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    assert traj.buffer_steps() == list(range(1, 7))
    r = ExactPathKernel(model, traj).reconstruct(X[:5])
    assert float(r.buffers.abs().max()) > 1e-4  # running statistics moved the eval-mode output
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(r.final, model(X[:5]), rtol=0, atol=1e-12)
    assert r.relative_delta() < 1e-9


def test_unsupported_optimizer_warns_and_stays_complete(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 40)
    cfg = RunConfig(lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, weight_decay=0.01), steps=5)
    traj, _ = record_run(model, X, Y, tmp_path / "rms", cfg)
    with pytest.warns(UserWarning, match="RMSprop has no update model"):
        epk = ExactPathKernel(model, traj)
    r = epk.reconstruct(X[:4])
    assert float(r.regularization.abs().max()) == 0.0
    assert r.relative_delta() < 1e-9


def test_model_mismatch_is_named(tmp_path):
    model, traj, X = _run(tmp_path, "tanh_mlp", "adamw", steps=2)
    with pytest.raises(TrajectoryMismatchError, match="fc1.weight"):
        ExactPathKernel(TanhMLP(hidden=9).double(), traj)
    with pytest.raises(TrajectoryMismatchError, match="dtype"):
        ExactPathKernel(TanhMLP().float(), traj)
    with pytest.raises(TrajectoryMismatchError, match="has no parameter 'fc1.weight'"):
        ExactPathKernel(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double(), traj)
    with pytest.raises(TrajectoryMismatchError, match="fc3.weight.*not recorded"):
        ExactPathKernel(_Extra().double(), traj)


def test_nan_parameters_are_refused(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 20)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrajectoryRecorder(model, opt, tmp_path / "nan") as rec:
        for s in range(4):
            opt.zero_grad()
            nn.functional.nll_loss(model(X[:4]), Y[:4]).backward()
            if s == 2:
                model.fc2.weight.grad[0, 0] = float("nan")
            rec.log_batch(torch.arange(4))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
    epk = ExactPathKernel(model, rec.trajectory)
    with pytest.raises(TrajectoryError, match=r"fc2.weight.*NaN or infinite at step 3"):
        epk.reconstruct(X[:2])


def test_bad_arguments(tmp_path):
    model, traj, X = _run(tmp_path, "tanh_mlp", "adamw", steps=2)
    with pytest.raises(ValueError, match="quadrature"):
        ExactPathKernel(model, traj, quadrature="simpson")
    with pytest.raises(ValueError, match="nodes"):
        ExactPathKernel(model, traj, nodes=0)
    with pytest.raises(ValueError, match="dtype"):
        ExactPathKernel(model, traj, dtype=torch.int64)
    with pytest.raises(KeyError, match="matches no parameter"):
        ExactPathKernel(model, traj, parameters="decoder.*")
    epk = ExactPathKernel(model, traj)
    with pytest.raises(ValueError, match="at least one example"):
        epk.reconstruct(X[:0])
    with pytest.raises(ValueError, match="same number of examples"):
        epk.reconstruct((X[:3], X[:2]))
    # A tuple output is explained through its first element (the default output_fn) ...
    tup = _TupleOut()
    parts = ExactPathKernel(tup, _trajectory_for(tup, tmp_path)).reconstruct(X[:2])
    assert parts.final.shape == (2, 3) and parts.max_abs_delta() < 1e-12
    # ... an output with no tensor to explain is named, and so is an output_fn of the wrong shape.
    odd = _DictOut()
    with pytest.raises(TypeError, match="output_fn"):
        ExactPathKernel(odd, _trajectory_for(odd, tmp_path / "d")).reconstruct(X[:2])
    with pytest.raises(ValueError, match="one row per example"):
        ExactPathKernel(tup, tmp_path / "tuple", output_fn=lambda o: o[0].sum()).reconstruct(X[:2])
    with pytest.raises(TypeError, match="output_fn must be callable"):
        ExactPathKernel(tup, tmp_path / "tuple", output_fn="logits")


class _Extra(TanhMLP):
    def __init__(self):
        super().__init__()
        self.fc3 = nn.Linear(3, 3)


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.lin(x), x


class _DictOut(_TupleOut):
    def forward(self, x):
        return {"hidden": self.lin(x)}


def _first_tensor(out):
    return out[0] if isinstance(out, tuple) else out["hidden"]


def _trajectory_for(model, tmp_path):
    X, Y = make_data("vector", 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrajectoryRecorder(model, opt, tmp_path / "tuple") as rec:
        opt.zero_grad()
        _first_tensor(model(X)).sum().backward()
        opt.step()
    return rec.trajectory


def test_progress_bar(tmp_path, capsys):
    model, traj, X = _run(tmp_path, "tanh_mlp", "adamw", steps=3)
    ExactPathKernel(model, traj, show_progress=True).reconstruct(X[:2])
    err = capsys.readouterr().err
    assert "reconstruct" in err and "3/3" in err
