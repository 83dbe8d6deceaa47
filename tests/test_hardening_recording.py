"""Recording never destroys or mixes data (issue 13, items 1–2, 6 and 8).

Overwrite removes only the library's files; one recorder per directory (lock, in this process
and across processes; stale locks of killed recorders are named); a recorder whose directory
vanishes is told; resume appends after checking the model and optimizer; any failed write fails
the recording closed (no renumbering). Real files, real processes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_explaind import Trajectory, TrajectoryError, TrajectoryMismatchError, TrajectoryRecorder
from captum_explaind.errors import TrajectoryWriteError
from captum_explaind.recording import format as fmt
from captum_explaind.recording.lock import TrajectoryLockError

from recording_utils import assert_params_equal, clone_params, nll, record_small, vector_data
from training import TanhMLP

REPO_ROOT = Path(__file__).resolve().parents[1]


def _step(model, opt, rec, X, Y, s):
    """One deterministic optimizer step on the samples of step ``s``."""
    idx = torch.tensor([s % len(X), (3 * s + 1) % len(X), (5 * s + 2) % len(X)])
    opt.zero_grad()
    nll(model(X[idx]), Y[idx]).mean().backward()
    if rec is not None:
        rec.log_batch(idx)
    opt.step()


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


_CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys, time
    import torch
    from torch import nn
    from captum_explaind import TrajectoryRecorder
    mode, path = sys.argv[1], sys.argv[2]

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.LogSoftmax(-1))

    def step(model, opt, rec, X, Y, s):
        idx = torch.tensor([s % len(X), (3 * s + 1) % len(X), (5 * s + 2) % len(X)])
        opt.zero_grad()
        nn.functional.nll_loss(model(X[idx]), Y[idx]).backward()
        rec.log_batch(idx)
        opt.step()

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    if mode == "contend":  # a second process tries to record into a directory in use
        try:
            TrajectoryRecorder(model, opt, path, overwrite=True)
        except Exception as err:
            print(type(err).__name__, "::", err)
            sys.exit(0)
        sys.exit(1)
    if mode == "killed":  # record 3 steps, save a checkpoint after each, die without closing
        rec = TrajectoryRecorder(model, opt, path)
        for s in range(1, 4):
            step(model, opt, rec, X, Y, s)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, sys.argv[3])
        os._exit(9)
    if mode == "disk_full":  # a file size limit: the third step's file cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        rec = TrajectoryRecorder(model, opt, path)
        size = os.path.getsize(os.path.join(path, "initial.safetensors"))
        step(model, opt, rec, X, Y, 1)
        one = os.path.getsize(os.path.join(path, "steps", "step_00000001.safetensors"))
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (one + one // 2, hard))
        errors = []
        for s in range(2, 7):
            try:
                step(model, opt, rec, X, Y, s)
                # a growing record: make the third step's file too big for the limit
                rec.log_batch(torch.arange(24).repeat(40)) if s == 2 else None
            except Exception as err:
                errors.append(type(err).__name__)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        try:
            rec.close()
        except Exception as err:
            errors.append("close:" + type(err).__name__)
        print(",".join(errors))
    """
)


def _child(tmp_path, *args, timeout=120):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.LogSoftmax(-1))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)


# ============================================================================ overwrite
def test_overwrite_removes_only_the_files_the_library_wrote(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=3)
    (path / "my_notes.txt").write_text("keep me")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "model.pt").write_bytes(b"weights")
    (path / "steps" / "README").write_text("mine too")
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, Y = vector_data()
    with TrajectoryRecorder(model, opt, path, overwrite=True) as rec:
        _step(model, opt, rec, X, Y, 1)
    assert (path / "my_notes.txt").read_text() == "keep me"
    assert (path / "checkpoints" / "model.pt").read_bytes() == b"weights"
    assert (path / "steps" / "README").read_text() == "mine too"
    traj = Trajectory.open(path)
    assert traj.num_steps == 1 and sorted(os.listdir(path / "steps")) == ["README", fmt.step_filename(1)]
    assert not (path / ".lock").exists()


def test_existing_recording_error_recommends_resume(tmp_path):
    path = tmp_path / "run"
    record_small(path, steps=2)
    model = TanhMLP()
    with pytest.raises(FileExistsError, match="resume=True"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path)
    assert not (path / ".lock").exists()  # the refused recorder left nothing behind
    with pytest.raises(ValueError, match="not both"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, overwrite=True, resume=True)
    with pytest.raises(FileNotFoundError, match="no trajectory to resume"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "new", resume=True)


# ============================================================================ one recorder per directory
def test_second_recorder_of_the_same_directory_in_this_process_is_refused(tmp_path):
    path = tmp_path / "run"
    X, Y = vector_data()
    m1, m2 = TanhMLP(), TanhMLP()
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    rec = TrajectoryRecorder(m1, o1, path)
    _step(m1, o1, rec, X, Y, 1)
    with pytest.raises(TrajectoryLockError, match="already being recorded by another TrajectoryRecorder in this"):
        TrajectoryRecorder(m2, o2, path, overwrite=True)
    with pytest.raises(TrajectoryLockError):
        TrajectoryRecorder(m2, o2, path, resume=True)
    _step(m1, o1, rec, X, Y, 2)  # the first recorder is unharmed
    traj = rec.close()
    assert traj.num_steps == 2 and not (path / ".lock").exists()
    # once closed, the directory can be taken over
    with TrajectoryRecorder(m2, o2, path, overwrite=True):
        pass


def test_second_process_cannot_record_into_a_directory_in_use_and_a_dead_recorders_lock_is_named(tmp_path):
    path, ckpt = tmp_path / "run", tmp_path / "ckpt.pt"
    X, Y = _data()
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with TrajectoryRecorder(model, opt, path) as rec:
        _step(model, opt, rec, X, Y, 1)
        proc = _child(tmp_path, "contend", path)
        assert proc.returncode == 0, proc.stderr
        assert "TrajectoryLockError" in proc.stdout and f"process {os.getpid()}" in proc.stdout, proc.stdout
        _step(model, opt, rec, X, Y, 2)
    assert Trajectory.open(path).num_steps == 2

    # a recorder killed without closing leaves its lock; the next one names it and says what to do
    proc = _child(tmp_path, "killed", tmp_path / "killed", ckpt)
    assert proc.returncode == 9, proc.stderr
    killed = tmp_path / "killed"
    assert (killed / ".lock").exists()
    model, opt = _net(), None
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with pytest.raises(FileExistsError, match=r"died without closing it \(stale lock\).*resume=True"):
        TrajectoryRecorder(model, opt, killed)
    # resume from the checkpoint of step 3 and go on to step 5: the same run as one without the kill
    state = torch.load(ckpt)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    with pytest.warns(RuntimeWarning, match="took over the stale lock"):
        rec = TrajectoryRecorder(model, opt, killed, resume=True)
    with rec:
        for s in (4, 5):
            _step(model, opt, rec, X, Y, s)
    resumed = Trajectory.open(killed)
    assert resumed.num_steps == 5 and resumed.manifest["resumed"][0]["at_step"] == 3
    ref_model = _net()
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    with TrajectoryRecorder(ref_model, ref_opt, tmp_path / "ref") as ref_rec:
        for s in range(1, 6):
            _step(ref_model, ref_opt, ref_rec, X, Y, s)
    ref = Trajectory.open(tmp_path / "ref")
    for s in range(0, 6):
        assert_params_equal(resumed.params(s), ref.params(s))
    for s in range(1, 6):
        assert_params_equal(resumed.state(s, "exp_avg_sq"), ref.state(s, "exp_avg_sq"))
        assert resumed.record(s).batches[0].indices.tolist() == ref.record(s).batches[0].indices.tolist()


# ============================================================================ resume checks
def test_resume_refuses_a_model_or_optimizer_not_at_the_last_complete_step(tmp_path):
    path = tmp_path / "run"
    X, Y = _data()
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = TrajectoryRecorder(model, opt, path)
    for s in (1, 2):
        _step(model, opt, rec, X, Y, s)
    after2 = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for h in rec._handles:  # the process dies (its hooks gone, its lock released by the kernel) ...
        h.remove()
    rec._lock.release(keep_stale=True)
    rec._closed = True
    _step(model, opt, None, X, Y, 3)  # ... after training on past the recording's end

    fresh = _net()
    with pytest.raises(TrajectoryMismatchError, match=r"parameter '0.weight'.*differs from its last complete step 2"):
        TrajectoryRecorder(fresh, torch.optim.Adam(fresh.parameters(), lr=0.01), path, resume=True)
    fresh.load_state_dict(after2[0])
    with pytest.raises(TrajectoryMismatchError, match="no 'exp_avg_sq' state"):
        TrajectoryRecorder(fresh, torch.optim.Adam(fresh.parameters(), lr=0.01), path, resume=True)
    with pytest.raises(TrajectoryMismatchError, match="optimizer.class"):
        TrajectoryRecorder(fresh, torch.optim.SGD(fresh.parameters(), lr=0.01), path, resume=True)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=0.01)
    opt2.load_state_dict(after2[1])
    with TrajectoryRecorder(fresh, opt2, path, resume=True) as rec2:  # the right state: accepted
        _step(fresh, opt2, rec2, X, Y, 3)
    assert Trajectory.open(path).num_steps == 3


# ============================================================================ directory lost
def test_recorder_whose_directory_was_deleted_is_told_at_its_next_step(tmp_path):
    path = tmp_path / "run"
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, path)
    _step(model, opt, rec, X, Y, 1)
    shutil.rmtree(path)
    before = clone_params(model)
    with pytest.raises(TrajectoryError, match="removed, moved or replaced while recording"):
        _step(model, opt, rec, X, Y, 2)
    assert_params_equal(clone_params(model), before)  # the step was not taken
    with pytest.raises(TrajectoryWriteError, match="failed at step 2"):
        _step(model, opt, rec, X, Y, 3)
    with pytest.warns(RuntimeWarning, match="failed at step 2"):
        rec._close(status="closed")
    assert not path.exists()  # nothing recreated behind the user's back


def test_replaced_layer_is_refused_at_the_next_step(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    _step(model, opt, rec, X, Y, 1)
    model.fc2 = nn.Linear(model.fc2.in_features, model.fc2.out_features)
    with pytest.raises(TrajectoryError, match=r"parameter 'fc2.weight' is no longer the tensor being recorded"):
        _step(model, opt, rec, X, Y, 2)
    with pytest.warns(RuntimeWarning, match="failed at step 2"):
        traj = rec.close()
    assert traj.num_steps == 1 and traj.manifest["aborted_at_step"] == 2


# ============================================================================ fail closed
@pytest.mark.parametrize("background", [False, True])
def test_a_failed_write_fails_the_recording_closed_without_renumbering(tmp_path, monkeypatch, background):
    """The training loop catches the write error and goes on: no later step may be recorded."""
    path = tmp_path / "run"
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real_write = fmt.atomic_write_bytes
    calls = {"n": 0}

    def write_once_failing(p, data):
        if os.path.basename(p) == fmt.step_filename(3):
            calls["n"] += 1
            raise OSError(28, "No space left on device")
        return real_write(p, data)

    monkeypatch.setattr(fmt, "atomic_write_bytes", write_once_failing)
    rec = TrajectoryRecorder(model, opt, path, background=background)
    live, errors = [], []
    for s in range(1, 7):
        try:
            _step(model, opt, rec, X, Y, s)
            live.append(clone_params(model))
        except (OSError, TrajectoryError) as err:
            errors.append((s, err))
        if background:  # let the disk catch up: the failure then surfaces at the next step (4)
            rec._writer.flush()
    assert calls["n"] == 1
    assert errors, "the failure was never reported"
    first_refused = 3 if not background else 4
    assert isinstance(errors[0][1], OSError if not background else TrajectoryWriteError)
    for s, err in errors:
        if s > 3:
            assert isinstance(err, TrajectoryWriteError) and "failed at step 3" in str(err), err
    assert [s for s, _ in errors] == list(range(first_refused, 7))
    with pytest.warns(RuntimeWarning, match="failed at step 3"):
        traj = rec.close()
    assert traj.num_steps == 2
    assert traj.manifest["aborted_at_step"] == 3 and "No space left" in traj.manifest["aborted"]
    assert "refused" in traj.manifest["aborted"]
    assert sorted(os.listdir(path / "steps")) == [fmt.step_filename(1), fmt.step_filename(2)]
    for s in (1, 2):
        assert_params_equal(traj.params(s), live[s - 1])


def test_disk_full_from_a_file_size_limit_keeps_the_complete_prefix(tmp_path):
    path = tmp_path / "run"
    proc = _child(tmp_path, "disk_full", path)
    assert proc.returncode == 0, proc.stderr
    errors = proc.stdout.strip().split(",")
    assert errors[0] == "OSError" and set(errors[1:]) == {"TrajectoryWriteError"}, errors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traj = Trajectory.open(path)
    assert traj.num_steps == 2 and traj.manifest["aborted_at_step"] == 3
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "closed" and manifest["num_steps"] == 2


# ============================================================================ drift from the model
def test_changes_outside_optimizer_step_and_steps_after_close_are_reported(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    _step(model, opt, rec, X, Y, 1)
    with torch.no_grad():
        model.fc1.weight.mul_(0.5)  # an edit between steps: the recorded step 2 update includes it
    with pytest.warns(RuntimeWarning, match=r"changed outside optimizer.step\(\) before step 2"):
        _step(model, opt, rec, X, Y, 2)
    with pytest.warns(RuntimeWarning, match="no logged batch"):
        opt.zero_grad()
        nll(model(X[:3]), Y[:3]).mean().backward()
        opt.step()
    traj = rec.close()
    assert traj.manifest["modified_outside_step"] == [2] and traj.manifest["steps_without_batch"] == 1
    assert rec.modified_since_close() == []
    with pytest.warns(RuntimeWarning, match=r"called after the recorder .* was closed.*θ_3"):
        _step(model, opt, None, X, Y, 4)
    assert set(rec.modified_since_close()) == {n for n, _ in model.named_parameters()}


def test_a_background_write_failure_nobody_saw_is_raised_at_close(tmp_path, monkeypatch):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real_write = fmt.atomic_write_bytes

    def failing_last(p, data):
        if os.path.basename(p) == fmt.step_filename(2):
            raise OSError(5, "Input/output error")
        return real_write(p, data)

    monkeypatch.setattr(fmt, "atomic_write_bytes", failing_last)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", background=True)
    with pytest.warns(RuntimeWarning, match="failed at step 2"):
        with pytest.raises(TrajectoryWriteError, match=r"failed at step 2 \(OSError"):
            with rec:
                for s in (1, 2):
                    _step(model, opt, rec, X, Y, s)
    assert rec.num_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rec.close().num_steps == 1  # reported once; the trajectory opens with its prefix
