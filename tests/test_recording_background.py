"""The background writer (issue 9 item 4): the training thread only takes a snapshot.

A background-written recording equals a synchronous one bit for bit (parameters, optimizer
state, the float64 gradient norms the writer thread now takes); the snapshot buffers are reused,
never reallocated; at most ``max_pending`` steps wait in memory and the step after them waits
before the optimizer moves (backpressure); failures fail closed at the failed step even when
they surface while a later step is being taken; a step that raises between its hooks leaks
nothing; NaN parameters are still reported (at the next step or close). Real files, real
threads, no mocks of the writer.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import pytest
import torch
from safetensors import safe_open

from captum_explaind import TrajectoryRecorder
from captum_explaind.errors import TrajectoryWriteError
from captum_explaind.recording import format as fmt

from recording_utils import assert_params_equal, clone_params, nll, vector_data
from training import TanhMLP


def _step(model, opt, rec, X, Y, s, clip=None):
    idx = torch.tensor([s % len(X), (3 * s + 1) % len(X), (5 * s + 2) % len(X)])
    opt.zero_grad()
    nll(model(X[idx]), Y[idx]).mean().backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if rec is not None:
        rec.log_batch(idx)
    opt.step()


def _record(path, steps=6, **kwargs):
    X, Y = vector_data()
    torch.manual_seed(0)
    model = TanhMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rec = TrajectoryRecorder(model, opt, path, **kwargs)
    for s in range(1, steps + 1):
        _step(model, opt, rec, X, Y, s, clip=0.05)
    return rec, rec.close()


def _file(path, s):
    with safe_open(os.path.join(path, fmt.STEPS_DIR, fmt.step_filename(s)), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.parametrize("store_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_background_files_equal_synchronous_ones_bit_for_bit(tmp_path, store_dtype):
    _, sync = _record(tmp_path / "sync", store_dtype=store_dtype)
    for pending in (1, 3):
        path = tmp_path / f"bg{pending}"
        rec, bg = _record(path, store_dtype=store_dtype, background=True, max_pending=pending)
        assert rec.writer_cpu_seconds > 0
        assert bg.num_steps == sync.num_steps == 6
        bg.check_integrity()
        for s in range(1, 7):
            a, b = _file(sync.path, s), _file(bg.path, s)
            assert a.keys() == b.keys() and not any(k.startswith("grad/") for k in b)
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (s, k)
            ra, rb = sync.record(s), bg.record(s)
            # clipping made the optimizer see a scaled gradient: the norms taken in the writer
            # thread on the snapshot are the very numbers the training thread would have taken
            assert ra.grad_sq == rb.grad_sq and rb.grad_sq and abs(rb.grad_norm - 0.05) < 1e-6
            assert ra.lr == rb.lr and ra.state_step == rb.state_step
    assert _record(tmp_path / "sync2")[0].writer_cpu_seconds == 0.0


def test_background_macro_steps_equal_synchronous_ones(tmp_path):
    """keep_every > 1 takes the snapshot at the kept step's post-hook (norms in the training thread)."""
    _, sync = _record(tmp_path / "sync", steps=7, keep_every=3)
    _, bg = _record(tmp_path / "bg", steps=7, keep_every=3, background=True, max_pending=1)
    assert bg.num_steps == sync.num_steps == 3  # 3 + 3 + the last 1, kept at close
    for s in range(1, 4):
        a, b = _file(sync.path, s), _file(bg.path, s)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (s, k)
        assert sync.record(s).grad_sq == bg.record(s).grad_sq


def _snapshot_buffers(rec):
    rec._writer.flush()
    snaps = list(rec._writer._free.queue)
    return snaps, {(k, b.data_ptr()) for s in snaps for k, b in s._buffers.items()}


def test_snapshot_buffers_are_allocated_once_and_reused(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", background=True, max_pending=2)
    for s in (1, 2, 3):
        _step(model, opt, rec, X, Y, s)
    snaps, before = _snapshot_buffers(rec)
    assert len(snaps) == 2
    # parameters, exp_avg_sq and gradients of every parameter, in each snapshot
    assert len(before) == 2 * 3 * len(list(model.parameters()))
    for s in range(4, 10):
        _step(model, opt, rec, X, Y, s)
    assert _snapshot_buffers(rec)[1] == before
    assert rec.close().num_steps == 9


def test_at_most_max_pending_steps_wait_and_the_next_one_waits_before_the_optimizer_moves(tmp_path, monkeypatch):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    disk = threading.Event()
    real = fmt.write_safetensors

    def slow_disk(path, tensors, metadata=None):
        if os.path.basename(path).startswith("step_"):
            disk.wait(60)
        return real(path, tensors, metadata)

    monkeypatch.setattr(fmt, "write_safetensors", slow_disk)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", background=True, max_pending=2)
    taken, seen = [], []

    def loop():
        for s in range(1, 6):
            _step(model, opt, rec, X, Y, s)
            taken.append(s)
            seen.append(clone_params(model))

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    deadline = time.time() + 30
    while len(taken) < 2 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # step 3 is now waiting for a snapshot (its pre-hook), not training on
    assert taken == [1, 2] and rec.num_steps == 0
    assert_params_equal(clone_params(model), seen[1])  # the optimizer did not move for step 3
    disk.set()
    worker.join(60)
    assert taken == [1, 2, 3, 4, 5] and rec._writer.wait_seconds > 0.4
    traj = rec.close()
    assert traj.num_steps == 5
    for s in range(1, 6):
        assert_params_equal(traj.params(s), seen[s - 1])


def test_a_failure_surfacing_while_a_later_step_is_taken_fails_closed_at_the_failed_step(tmp_path, monkeypatch):
    """Step 2's write fails after step 3's pre-hook looked: step 3's post-hook raises, naming
    step 2, and the trajectory keeps exactly step 1 (no renumbering)."""
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    go = threading.Event()
    real = fmt.write_safetensors

    def failing_step_2(path, tensors, metadata=None):
        if os.path.basename(path) == fmt.step_filename(2):
            go.wait(60)
            raise OSError(28, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(fmt, "write_safetensors", failing_step_2)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", background=True, max_pending=2)
    _step(model, opt, rec, X, Y, 1)
    rec._writer.flush()
    _step(model, opt, rec, X, Y, 2)

    def fail_now(*_):  # runs after the recorder's pre-hook of step 3: the writer fails now
        go.set()
        while rec._writer.error is None:
            time.sleep(0.001)

    handle = opt.register_step_pre_hook(fail_now)
    with pytest.raises(TrajectoryWriteError, match=r"failed at step 2 \(OSError.*moved past the recording"):
        _step(model, opt, rec, X, Y, 3)
    handle.remove()
    with pytest.raises(TrajectoryWriteError, match="failed at step 2"):
        _step(model, opt, rec, X, Y, 4)  # refused before the optimizer moves
    with pytest.warns(RuntimeWarning, match="failed at step 2"):
        traj = rec.close()
    assert traj.num_steps == 1 and traj.manifest["aborted_at_step"] == 2
    assert sorted(os.listdir(tmp_path / "run" / "steps")) == [fmt.step_filename(1)]


class _FlakySGD(torch.optim.SGD):
    """Raises inside step() (between the recorder's pre- and post-hook) on the given calls."""

    def __init__(self, params, raise_on):
        super().__init__(params, lr=0.1)
        self.raise_on, self.calls = raise_on, 0

    @torch.no_grad()
    def step(self, closure=None):
        self.calls += 1
        if self.calls in self.raise_on:
            raise RuntimeError("optimizer failed")
        return super().step(closure)


def test_a_step_that_raises_between_the_hooks_leaks_no_snapshot(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = _FlakySGD(model.parameters(), raise_on={2, 3, 5})
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", background=True, max_pending=1)
    outcome = []

    def loop():
        for s in range(1, 8):
            try:
                _step(model, opt, rec, X, Y, s)
                outcome.append("ok")
            except RuntimeError:
                rec.discard_batches()
                outcome.append("raised")

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "a snapshot leaked: the next step waits for it forever"
    assert outcome == ["ok", "raised", "raised", "ok", "raised", "ok", "ok"]
    assert rec.close().num_steps == 4


def test_background_nan_parameters_are_reported_at_the_next_step_or_at_close(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", background=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, opt, rec, X, Y, 1)
    opt.zero_grad()
    nll(model(X[:4]), Y[:4]).mean().backward()
    model.fc2.bias.grad[0] = float("nan")
    rec.log_batch(range(4))
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"step 2: parameter 'fc2\.bias' is not finite"):
        rec._writer.flush()
        _step(model, opt, rec, X, Y, 3)
    traj = rec.close()
    assert traj.num_steps == 3 and torch.isnan(traj.params(2)["fc2.bias"][0])
    # found by the writer only at close: reported there
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "last", background=True)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"step 1: parameter 'fc1\.weight' is not finite"):
        _step(model, opt, rec, X, Y, 1)
        rec.close()


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_max_pending_must_be_a_positive_int(tmp_path, bad):
    from captum_explaind.adapters.huggingface import TrajectoryCallback

    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_pending must be an int >= 1"):
        TrajectoryRecorder(model, opt, tmp_path / "r", background=True, max_pending=bad)
    with pytest.raises(ValueError, match="max_pending must be an int >= 1"):
        TrajectoryCallback(tmp_path / "cb", max_pending=bad)
    assert not os.path.exists(tmp_path / "r")


def test_finish_finalizes_without_opening_and_close_still_returns_the_trajectory(tmp_path, monkeypatch):
    from captum_explaind import Trajectory

    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", background=True)
    for s in (1, 2, 3):
        _step(model, opt, rec, X, Y, s)
    opened = []
    real_open = Trajectory.open.__func__
    monkeypatch.setattr(Trajectory, "open",
                        classmethod(lambda cls, *a, **k: opened.append(1) or real_open(cls, *a, **k)))
    rec.finish()
    assert opened == [] and rec.num_steps == 3
    assert rec.close().num_steps == 3 and opened == [1]  # idempotent: finish, then open
