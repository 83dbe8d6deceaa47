"""The live model against its recording, at analysis time.

The explanation always uses the recorded θ_0..θ_N. A model trained (or changed) after the
recording ended is named with a :class:`ModelMismatchWarning` that lists the tensors and their
largest difference; the model the recorder watched (at θ_N) and an untrained copy (at θ_0) are
silent. Buffers are compared too (BatchNorm statistics updated by a train-mode forward after the
recording), and a model buffer that the trajectory does not hold is named.
"""

from __future__ import annotations

import copy
import warnings

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
from captum_explaind.errors import ModelMismatchWarning, TrajectoryMismatchError

from recording_utils import BNNet, nll
from training import TanhMLP, make_data

CONSTRUCTORS = {
    "core": lambda m, t, d: ExactPathKernel(m, t),
    "parameters": lambda m, t, d: ParameterInfluence(m, t),
    "steps": lambda m, t, d: StepInfluence(m, t, "fast"),
    "data": lambda m, t, d: TrainingDataInfluence(m, t, d, nll),
    "similarity": lambda m, t, d: PredictionSimilarity(m, t, d, nll),
}


def _record(model, path, X, Y, steps=3, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    with TrajectoryRecorder(model, opt, path) as rec:
        for s in range(steps):
            idx = torch.arange(4 * s, 4 * s + 4)
            opt.zero_grad()
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, opt


def _silent(fn):
    """Call ``fn`` and fail on any ModelMismatchWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelMismatchWarning)
        return fn()


@pytest.mark.parametrize("entry", list(CONSTRUCTORS))
def test_training_after_the_recording_is_named(tmp_path, entry):
    torch.manual_seed(0)
    model = TanhMLP().double()
    untrained = copy.deepcopy(model)
    X, Y = make_data("vector", 24)
    traj, opt = _record(model, tmp_path / "run", X, Y)
    data = TensorDataset(X, Y)
    make = CONSTRUCTORS[entry]
    _silent(lambda: make(model, traj, data))  # the model the recorder watched: at θ_N
    _silent(lambda: make(untrained, traj, data))  # an untrained copy: at θ_0, its weights are not used
    # one more step outside the recorder
    opt.zero_grad()
    nll(model(X[:4]), Y[:4]).mean().backward()
    opt.step()
    moved = float((model.fc1.weight.detach() - traj.params(3)["fc1.weight"]).abs().max())
    with pytest.warns(ModelMismatchWarning, match="trained after the recording ended") as caught:
        make(model, traj, data)
    msg = str(caught[0].message)
    assert f"fc1.weight (max |diff| {moved:.3g})" in msg and "θ_3" in msg
    assert caught[0].filename == __file__  # points at the user's call, not into the library


def test_buffers_changed_after_the_recording_are_named(tmp_path):
    torch.manual_seed(0)
    model = BNNet().double()
    X, Y = make_data("vector", 24)
    traj, _ = _record(model, tmp_path / "bn", X, Y)
    _silent(lambda: ExactPathKernel(model, traj))
    model.train()
    with torch.no_grad():
        model(X[10:20])  # a train-mode forward: running statistics move, parameters do not
    with pytest.warns(ModelMismatchWarning, match=r"buffers differ .*bn\.running_mean \(max \|diff\|"):
        ExactPathKernel(model, traj)


def test_a_model_buffer_the_trajectory_lacks_is_named(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 24)
    traj, _ = _record(model, tmp_path / "run", X, Y)
    model.register_buffer("scale", torch.ones(3, dtype=torch.float64))
    # Trajectory.validate refuses it (the recording holds no values of that buffer over training).
    with pytest.raises(TrajectoryMismatchError, match=r"buffer 'scale', which was not recorded"):
        ExactPathKernel(model, traj)


def test_a_frozen_parameter_changed_after_the_recording_is_named(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP().double()
    model.fc1.bias.requires_grad_(False)  # frozen: stored once, with θ_0
    X, Y = make_data("vector", 24)
    traj, _ = _record(model, tmp_path / "frozen", X, Y)
    assert "fc1.bias" in traj.frozen
    _silent(lambda: ExactPathKernel(model, traj))
    with torch.no_grad():
        model.fc1.bias.add_(0.25)
    with pytest.warns(ModelMismatchWarning, match=r"fc1\.bias \(max \|diff\| 0\.25\)"):
        ExactPathKernel(model, traj)


def test_rounding_between_precisions_is_not_a_mismatch(tmp_path):
    # a float32 model recorded and explained in float64 (dtype=): the live weights are θ_N exactly
    torch.manual_seed(0)
    model = TanhMLP()
    X, Y = make_data("vector", 24, dtype=torch.float32)
    traj, opt = _record(model, tmp_path / "f32", X, Y)
    _silent(lambda: ExactPathKernel(model, traj, dtype=torch.float64))
    with torch.no_grad():
        model.fc2.weight.mul_(1.5)
    with pytest.warns(ModelMismatchWarning, match=r"fc2\.weight"):
        ExactPathKernel(model, traj, dtype=torch.float64)

