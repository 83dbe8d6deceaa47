"""``Trajectory.step_data``: one opening of a step file gives what ``record``, ``params`` and
``state`` give separately, with the same errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from captum_explaind.errors import MissingOptimizerStateError, TrajectoryCorruptError, TrajectoryError
from captum_explaind.recording import StepData

from recording_utils import assert_params_equal, record_small, step_file


# ============================================================================ step_data
@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    return record_small(tmp_path_factory.mktemp("adam") / "run", steps=4, optimizer="adam")


def _assert_records_equal(a, b) -> None:
    assert (a.step, a.lr, a.groups, a.inactive, a.grad_sq, a.state_step) == (
        b.step, b.lr, b.groups, b.inactive, b.grad_sq, b.state_step
    )
    assert len(a.batches) == len(b.batches)
    for x, y in zip(a.batches, b.batches):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.weights, y.weights)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_step_data_equals_record_params_and_state(adam_run, dtype):
    traj = adam_run
    keys = ("exp_avg_sq", "max_exp_avg_sq")
    for s in range(1, traj.num_steps + 1):
        data = traj.step_data(s, dtype=dtype, device="cpu", state_keys=keys)
        assert isinstance(data, StepData) and data.step == s
        _assert_records_equal(data.record, traj.record(s))
        assert list(data.params) == traj.trainable
        assert_params_equal(data.params, traj.params(s, dtype=dtype, device="cpu"))
        assert set(data.state) == set(keys)
        for key in keys:
            assert_params_equal(data.state[key], traj.state(s, key, dtype=dtype, device="cpu"))
    assert set(data.state["exp_avg_sq"]) == set(traj.trainable)  # Adam has state for every parameter
    if dtype is not None:
        assert all(t.dtype == dtype for t in data.params.values())


def test_step_data_without_state_keys_and_frozen(tmp_path):
    traj = record_small(tmp_path / "sgd", steps=2)
    data = traj.step_data(2)
    assert data.state == {}
    assert_params_equal(data.params, traj.params(2))
    _assert_records_equal(data.record, traj.record(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.step = 3  # type: ignore[misc]


def test_step_data_rejects_what_record_and_state_reject(adam_run):
    traj = adam_run
    for bad in (0, traj.num_steps + 1):  # step 0 (θ_0) has no record
        with pytest.raises(TrajectoryError, match="outside the trajectory"):
            traj.step_data(bad)
    with pytest.raises(TypeError, match="step must be an int"):
        traj.step_data(True)
    with pytest.raises(MissingOptimizerStateError) as caught:
        traj.step_data(1, state_keys=("momentum_buffer",))
    with pytest.raises(MissingOptimizerStateError) as expected:
        traj.state(1, "momentum_buffer")
    assert str(caught.value) == str(expected.value)
    with pytest.raises(TypeError, match="sequence of state names"):
        traj.step_data(1, state_keys="exp_avg_sq")


def _corruption(traj, step: int, damage) -> None:
    """Damage the step file, then compare the errors of params() and step_data()."""
    path = step_file(traj.path, step)
    damage(path)
    with pytest.raises(TrajectoryCorruptError) as expected:
        traj.params(step)
    with pytest.raises(TrajectoryCorruptError) as caught:
        traj.step_data(step)
    assert type(caught.value) is type(expected.value)
    assert str(caught.value) == str(expected.value)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])


def _garble_header(path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16  # the JSON header no longer parses
    path.write_bytes(bytes(data))


def _drop_a_parameter(path) -> None:
    """A well-formed file that lacks one trainable parameter (it opens; reading it fails)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "param/fc1.weight"}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _drop_a_parameter],
                         ids=["truncated", "garbled-header", "missing-parameter"])
def test_step_data_on_a_corrupt_step_file_raises_what_params_raises(tmp_path, damage):
    traj = record_small(tmp_path / "run", steps=3)  # opened (and verified) before the damage
    _corruption(traj, 2, damage)
    # the other steps still read
    assert_params_equal(traj.step_data(3).params, traj.params(3))
