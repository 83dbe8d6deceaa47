"""A recorded run on disk: overwrite rules, crash safety, corrupted directories, validation
against a model, no pickle, NaN parameters.

Real files under ``tmp_path``; every corruption is made with real file operations and must be
reported by ``Trajectory.open`` (or on load) with an error that names it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from captum_explaind import (
    Trajectory,
    TrajectoryCorruptError,
    TrajectoryMismatchError,
    TrajectoryRecorder,
)
from captum_explaind.recording import format as fmt

from recording_utils import BNNet, assert_params_equal, clone_params, nll, record_small, step_file, train, vector_data
from training import TanhMLP

REPO_ROOT = Path(__file__).resolve().parents[1]


# ============================================================================ crash safety
def test_exception_in_training_loop_keeps_completed_steps(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    live = []
    with pytest.warns(RuntimeWarning, match="not followed by an optimizer step"), pytest.raises(
        RuntimeError, match="boom"
    ):
        with rec:
            for s in range(10):
                opt.zero_grad()
                nll(model(X[s: s + 4]), Y[s: s + 4]).mean().backward()
                rec.log_batch(range(s, s + 4))
                if s == 3:
                    raise RuntimeError("boom")  # after 3 completed steps, batch logged
                opt.step()
                live.append(clone_params(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traj = Trajectory.open(tmp_path / "run")
    assert traj.num_steps == 3
    for s in range(1, 4):
        assert_params_equal(traj.params(s), live[s - 1])
        assert traj.state(s, "exp_avg_sq")
        assert traj.record(s).batches[0].indices.tolist() == list(range(s - 1, s + 3))
    assert "boom" in traj.manifest.get("aborted", "")
    # opening an aborted run must say so
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("interrupted" in m or "aborted" in m for m in messages), messages


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_failure_while_writing_a_step_keeps_the_completed_steps(tmp_path, monkeypatch):
    """The disk fills up while step 3 is written: steps 1–2 must stay readable."""
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == fmt.step_filename(3):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    live = []
    with pytest.raises(OSError, match="No space left"):
        with rec:
            for s in range(5):
                if s == 2:
                    monkeypatch.setattr(os, "replace", failing_replace)
                opt.zero_grad()
                nll(model(X[:4]), Y[:4]).mean().backward()
                rec.log_batch(range(4))
                opt.step()
                live.append(clone_params(model))
    monkeypatch.setattr(os, "replace", real_replace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traj = Trajectory.open(tmp_path / "run")
    assert traj.num_steps == 2
    for s in (1, 2):
        assert_params_equal(traj.params(s), live[s - 1])


def test_open_while_recording_returns_completed_steps_and_warns(tmp_path):
    """A process that never closes its recorder (killed): the manifest still says "recording"."""
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    live = []
    for _ in range(3):
        opt.zero_grad()
        nll(model(X[:4]), Y[:4]).mean().backward()
        rec.log_batch(range(4))
        opt.step()
        live.append(clone_params(model))
    # a half-written next step, as left by a crash inside the atomic write
    partial = step_file(tmp_path / "run", 4).with_name(fmt.step_filename(4) + ".tmp")
    partial.write_bytes(step_file(tmp_path / "run", 3).read_bytes()[:100])
    with pytest.warns(RuntimeWarning) as caught:
        traj = Trajectory.open(tmp_path / "run")
    messages = " | ".join(str(w.message) for w in caught)
    assert "not closed" in messages and "3 complete step" in messages
    assert "incompletely written" in messages and fmt.step_filename(4) in messages
    assert traj.num_steps == 3 and traj.status == "recording"
    for s in range(1, 4):
        assert_params_equal(traj.params(s), live[s - 1])
    with pytest.warns(RuntimeWarning, match="incompletely written"):
        assert rec.close().num_steps == 3


_CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from captum_explaind import TrajectoryRecorder

    path, expected_path, k, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = TrajectoryRecorder(model, opt, path)
    X, Y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    expected = {}
    real_replace = os.replace

    def dying_replace(src, dst, *a, **kw):
        if os.path.basename(dst).startswith("step_"):
            os._exit(3)  # killed after the temporary file was written, before the rename
        return real_replace(src, dst, *a, **kw)

    for s in range(1, 100):
        if mode == "mid_write" and s == k + 1:
            os.replace = dying_replace
        idx = torch.tensor([s % 16, (3 * s) % 16])
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
        for n, p in model.named_parameters():
            expected[f"{s}/{n}"] = p.detach().clone()
            expected[f"{s}/state/{n}"] = opt.state[p]["exp_avg_sq"].clone()
        save_file(expected, expected_path)
        if mode == "after_step" and s == k:
            os._exit(3)  # killed without close()
    """
)


@pytest.mark.parametrize("mode", ["after_step", "mid_write"])
def test_process_killed_mid_recording_loses_no_completed_step(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    path, expected_path, k = tmp_path / "run", tmp_path / "expected.safetensors", 4
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(expected_path), str(k), mode],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    leftovers = os.listdir(path / "steps")
    if mode == "mid_write":
        assert fmt.step_filename(k + 1) + ".tmp" in leftovers
    with pytest.warns(RuntimeWarning) as caught:
        traj = Trajectory.open(path)
    messages = " | ".join(str(w.message) for w in caught)
    assert "not closed" in messages and f"{k} complete step" in messages
    if mode == "mid_write":
        assert "incompletely written" in messages and fmt.step_filename(k + 1) in messages
    assert traj.num_steps == k
    expected = load_file(str(expected_path))
    for s in range(1, k + 1):
        params = traj.params(s)
        state = traj.state(s, "exp_avg_sq")
        for n in params:
            assert torch.equal(params[n], expected[f"{s}/{n}"])
            assert torch.equal(state[n], expected[f"{s}/state/{n}"])
        assert traj.record(s).batches[0].indices.tolist() == [s % 16, (3 * s) % 16]
    traj.validate(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))


# ============================================================================ corrupted directories
@pytest.fixture
def closed_run(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=5)
    return path


def _rewrite_manifest(path, **changes):
    mpath = Path(path) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for k, v in changes.items():
        if v is None:
            manifest.pop(k, None)
        else:
            manifest[k] = v
    mpath.write_text(json.dumps(manifest))


def test_corrupt_missing_manifest(closed_run):
    (closed_run / "manifest.json").unlink()
    with pytest.raises(TrajectoryCorruptError, match=r"manifest\.json is missing"):
        Trajectory.open(closed_run)


def test_corrupt_not_a_directory(tmp_path):
    with pytest.raises(TrajectoryCorruptError, match="not a directory"):
        Trajectory.open(tmp_path / "nothing-here")


def test_corrupt_invalid_json_manifest(closed_run):
    text = (closed_run / "manifest.json").read_text()
    (closed_run / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(TrajectoryCorruptError, match=r"manifest\.json is not valid JSON"):
        Trajectory.open(closed_run)


def test_corrupt_manifest_of_another_format(closed_run):
    _rewrite_manifest(closed_run, format="someone.elses.format")
    with pytest.raises(TrajectoryCorruptError, match="not a captum_explaind trajectory manifest"):
        Trajectory.open(closed_run)


def test_corrupt_manifest_of_a_newer_version(closed_run):
    _rewrite_manifest(closed_run, version=fmt.FORMAT_VERSION + 98)
    newer = fmt.FORMAT_VERSION + 98
    with pytest.raises(TrajectoryCorruptError, match=rf"format version {newer}.*<= {fmt.FORMAT_VERSION}"):
        Trajectory.open(closed_run)
    _rewrite_manifest(closed_run, version="1")
    with pytest.raises(TrajectoryCorruptError, match="format version '1'"):
        Trajectory.open(closed_run)


def test_corrupt_manifest_missing_section(closed_run):
    _rewrite_manifest(closed_run, optimizer=None)
    with pytest.raises(TrajectoryCorruptError, match="lacks the 'optimizer' section"):
        Trajectory.open(closed_run)


def test_corrupt_missing_initial(closed_run):
    (closed_run / "initial.safetensors").unlink()
    with pytest.raises(TrajectoryCorruptError, match=r"initial\.safetensors \(θ_0\) is missing"):
        Trajectory.open(closed_run)


def test_corrupt_truncated_initial(closed_run):
    f = closed_run / "initial.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(TrajectoryCorruptError, match=r"initial\.safetensors is truncated"):
        Trajectory.open(closed_run)


def test_corrupt_step_deleted_in_the_middle(closed_run):
    step_file(closed_run, 3).unlink()
    with pytest.raises(TrajectoryCorruptError, match=r"missing step\(s\) \[3\]"):
        Trajectory.open(closed_run)


def test_corrupt_steps_directory_missing(closed_run):
    shutil.rmtree(closed_run / "steps")
    with pytest.raises(TrajectoryCorruptError, match="records 5 steps but only 0"):
        Trajectory.open(closed_run)


@pytest.mark.parametrize("keep", ["half", "header_only", "4_bytes", "empty"])
def test_corrupt_truncated_step_file(closed_run, keep):
    f = step_file(closed_run, 4)
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut = {"half": len(data) // 2 + 8 + n // 2, "header_only": 8 + n, "4_bytes": 4, "empty": 0}[keep]
    cut = min(cut, len(data) - 1)
    f.write_bytes(data[:cut])
    with pytest.raises(TrajectoryCorruptError, match=fmt.step_filename(4)) as err:
        Trajectory.open(closed_run)
    assert "truncated" in str(err.value) or "not a readable safetensors" in str(err.value)


def test_corrupt_step_file_garbage_header(closed_run):
    f = step_file(closed_run, 2)
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(TrajectoryCorruptError, match=fmt.step_filename(2)):
        Trajectory.open(closed_run)


def test_corrupt_truncated_step_found_on_load_without_verify(closed_run):
    f = step_file(closed_run, 4)
    f.write_bytes(f.read_bytes()[:-16])
    traj = Trajectory.open(closed_run, verify=False)
    assert traj.num_steps == 5
    with pytest.raises(TrajectoryCorruptError, match=fmt.step_filename(4)):
        traj.params(4)
    traj.params(3)  # the others still load


def test_corrupt_manifest_declares_more_steps_than_exist(closed_run):
    step_file(closed_run, 5).unlink()
    with pytest.raises(TrajectoryCorruptError, match="manifest records 5 steps but only 4 step files exist"):
        Trajectory.open(closed_run)


def test_corrupt_step_files_swapped(closed_run):
    a, b = step_file(closed_run, 2), step_file(closed_run, 3)
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(TrajectoryCorruptError, match="holds the record of step 3, not 2"):
        Trajectory.open(closed_run)  # found when opening (records are checked with the headers)
    traj = Trajectory.open(closed_run, verify=False)
    with pytest.raises(TrajectoryCorruptError, match="holds the record of step 3, not 2"):
        traj.record(2)


def test_corrupt_step_file_lacking_a_parameter_or_its_record(closed_run):
    f = step_file(closed_run, 2)
    with safe_open(str(f), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    save_file({k: v for k, v in tensors.items() if k != "param/fc2.bias"}, str(f), metadata=meta)
    with pytest.raises(
        TrajectoryCorruptError, match=r"step_00000002\.safetensors lacks trainable parameter 'fc2\.bias'"
    ):
        Trajectory.open(closed_run)
    save_file(tensors, str(f))  # no metadata
    with pytest.raises(TrajectoryCorruptError, match="lacks its step record metadata"):
        Trajectory.open(closed_run)


def test_corrupt_initial_lacking_a_parameter(closed_run):
    f = closed_run / "initial.safetensors"
    tensors = load_file(str(f))
    del tensors["param/fc1.bias"]
    save_file(tensors, str(f))
    with pytest.raises(TrajectoryCorruptError, match="lacks parameter 'fc1.bias'"):
        Trajectory.open(closed_run)


# ============================================================================ validate(model)
class Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)


class WithExtra(TanhMLP):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.zeros(2))


class WithBuffer(TanhMLP):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("stat", torch.zeros(n))


def test_validate_model(tmp_path):
    traj = record_small(tmp_path / "run", steps=1)
    traj.validate(TanhMLP())  # same architecture
    with pytest.raises(TrajectoryMismatchError, match=r"no parameter 'fc1\.weight'.*\[8, 5\]"):
        traj.validate(Renamed())
    with pytest.raises(
        TrajectoryMismatchError, match=r"parameter 'fc1\.weight' has shape \[9, 5\] in the model but \[8, 5\]"
    ):
        traj.validate(TanhMLP(hidden=9))
    with pytest.raises(
        TrajectoryMismatchError, match=r"parameter 'fc1\.weight' has dtype torch\.float64.*torch\.float32"
    ):
        traj.validate(TanhMLP().double())
    traj.validate(TanhMLP().double(), check_dtype=False)
    with pytest.raises(TrajectoryMismatchError, match=r"parameter 'extra', which was not recorded"):
        traj.validate(WithExtra())
    with pytest.raises(TypeError, match="nn.Module"):
        traj.validate("not a model")


def test_validate_model_buffers(tmp_path):
    X, Y = vector_data()
    model = WithBuffer(4)
    traj, _, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", X, Y, steps=1)
    traj.validate(WithBuffer(4))
    with pytest.raises(TrajectoryMismatchError, match="no buffer 'stat'"):
        traj.validate(TanhMLP())
    with pytest.raises(TrajectoryMismatchError, match=r"buffer 'stat' has shape \[3\]"):
        traj.validate(WithBuffer(3))


# ============================================================================ no pickle
def test_no_pickle_on_disk_or_on_the_load_path(tmp_path, monkeypatch):
    X, Y = vector_data()
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    traj, _, log = train(model, opt, tmp_path / "run", X, Y, steps=3)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files), files
    assert {p.relative_to(tmp_path / "run").as_posix() for p in files} == {
        "manifest.json", "initial.safetensors", *(f"steps/{fmt.step_filename(s)}" for s in (1, 2, 3)),
    }
    for p in files:
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header

    def forbidden(*a, **k):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    t = Trajectory.open(tmp_path / "run")
    t.validate(BNNet())
    assert_params_equal(t.params(3), log[2]["params"])
    assert torch.equal(t.state(3, "max_exp_avg_sq")["fc1.weight"], log[2]["state"]["fc1.weight"]["max_exp_avg_sq"])
    assert len(list(t.records())) == 3
    assert set(t.buffers(3)) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert int(t.buffers(3)["bn.num_batches_tracked"]) == 3
    assert t.frozen_params() == {}


# ============================================================================ NaN
def test_nan_parameters_warn_at_record_time(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")

    def step(poison: bool):
        opt.zero_grad()
        nll(model(X[:4]), Y[:4]).mean().backward()
        if poison:
            model.fc2.bias.grad[0] = float("nan")
        rec.log_batch(range(4))
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(False)  # a finite step: no warning
    with pytest.warns(RuntimeWarning, match=r"step 2: parameter 'fc2\.bias' is not finite"):
        step(True)
    traj = rec.close()
    assert traj.num_steps == 2
    assert torch.isnan(traj.params(2)["fc2.bias"][0])
    # check_finite=False stays silent
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "quiet", check_finite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(True)
    rec.close()


# ============================================================================ overwrite
def test_existing_trajectory_is_not_overwritten_by_default(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=3)
    model = TanhMLP()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path)
    assert Trajectory.open(path).num_steps == 3  # untouched


def test_existing_empty_directory_is_used(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    model = TanhMLP()
    rec = TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path)
    assert rec.close().num_steps == 0


def test_overwrite_replaces_a_previous_trajectory(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=4)
    X, Y = vector_data()
    model = TanhMLP(hidden=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = TrajectoryRecorder(model, opt, path, overwrite=True)
    with rec:
        opt.zero_grad()
        nll(model(X[:4]), Y[:4]).mean().backward()
        rec.log_batch(range(4))
        opt.step()
    traj = Trajectory.open(path)
    assert traj.num_steps == 1
    assert traj.family == "adam"
    assert traj.spec["fc1.weight"].shape == (5, 5)
    assert sorted(os.listdir(path / "steps")) == [fmt.step_filename(1)]


def test_overwrite_refuses_a_directory_that_is_not_a_trajectory(tmp_path):
    path = tmp_path / "precious"
    path.mkdir()
    (path / "data.txt").write_text("keep me")
    model = TanhMLP()
    with pytest.raises(FileExistsError, match="not a trajectory"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, overwrite=True)
    assert (path / "data.txt").read_text() == "keep me"
    assert not (path / "steps").exists()


def test_overwrite_refuses_a_directory_with_a_foreign_manifest_json(tmp_path):
    """A web app / dataset folder that happens to hold a manifest.json is not a trajectory:
    overwrite=True must not rmtree it."""
    path = tmp_path / "webapp"
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"name": "my-app", "version": 3}))
    (path / "index.html").write_text("<html></html>")
    model = TanhMLP()
    with pytest.raises(FileExistsError):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, overwrite=True)
    assert (path / "index.html").exists()


def test_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"x")
    model = TanhMLP()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a directory"):
            TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, overwrite=overwrite)
    assert path.read_bytes() == b"x"
