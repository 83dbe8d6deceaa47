"""Hostile and damaged recordings (issue 13, items 3, 4, 8, 9 of Why): every case ends in a
:class:`TrajectoryCorruptError` that names the file (and the field), within a time limit and a
memory cap.

A real recording is damaged with real file operations (FIFOs, sparse files, symlinks out of the
run, edited headers and records, flipped bits). All cases are then opened and read in full by
ONE child process under ``RLIMIT_AS`` (1.5 GiB above what it uses after importing torch) with a
per-case alarm, so that a hang or a runaway allocation is a failed case, not a hung CI job.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
from torch import nn

from captum_explaind import Trajectory, TrajectoryRecorder
from captum_explaind.recording import format as fmt

REPO_ROOT = Path(__file__).resolve().parents[1]
S2 = "steps/" + fmt.step_filename(2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x))))).log_softmax(-1)


def _record(path: Path, steps: int = 4) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    X, Y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with TrajectoryRecorder(model, opt, path) as rec:
        for s in range(steps):
            opt.zero_grad()
            for j in range(2):
                idx = torch.arange(4 * j, 4 * j + 4) + s
                nn.functional.nll_loss(model(X[idx]), Y[idx]).backward()
                rec.log_batch(idx)
            opt.step()


# ============================================================================ damage helpers
def _read_st(path: Path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def _write_st(path: Path, header: Any, body: bytes, raw_header: bytes = None) -> None:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _edit_header(rel: str, fn: Callable[[Dict[str, Any]], None], fix_checksum: bool = True):
    """Edit a safetensors header in place; recompute the record checksum unless told not to, so
    the case tests the check it is about (and not only the checksum)."""
    def damage(run: Path) -> None:
        header, body = _read_st(run / rel)
        fn(header)
        meta = header.get("__metadata__")
        if fix_checksum and isinstance(meta, dict) and isinstance(meta.get("record"), str):
            meta["record_checksum"] = fmt.text_checksum(meta["record"])
        _write_st(run / rel, header, body)
    return damage


def _edit_record(fn: Callable[[Dict[str, Any]], None], rel: str = S2, fix_checksum: bool = True):
    def edit(header: Dict[str, Any]) -> None:
        rec = json.loads(header["__metadata__"]["record"])
        fn(rec)
        header["__metadata__"]["record"] = json.dumps(rec)
    return _edit_header(rel, edit, fix_checksum)


def _edit_manifest(fn: Callable[[Any], Any], fix_checksum: bool = True):
    def damage(run: Path) -> None:
        m = json.loads((run / "manifest.json").read_text())
        m = fn(m) or m
        if fix_checksum and isinstance(m, dict):
            m["checksum"] = fmt.manifest_checksum(m)
        (run / "manifest.json").write_text(json.dumps(m))
    return damage


def _raw(rel: str, data: bytes):
    def damage(run: Path) -> None:
        (run / rel).write_bytes(data)
    return damage


def _fifo(rel: str):
    def damage(run: Path) -> None:
        (run / rel).unlink()
        os.mkfifo(run / rel)
    return damage


def _symlink_out(rel: str):
    """Replace ``rel`` by a symlink to the same file of another (valid) run."""
    def damage(run: Path) -> None:
        other = run.parent / (run.name + "_other")
        shutil.copytree(run.parent / "base", other, symlinks=True)
        target = run / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        target.symlink_to(other / rel)
    return damage


def _sparse(rel: str, key: str, shape, dtype: str = "F32"):
    """A sparse file whose header declares a huge tensor (gigabytes announced, kilobytes on disk)."""
    def damage(run: Path) -> None:
        header, body = _read_st(run / rel)
        item = {"F32": 4, "I64": 8}[dtype]
        n = item
        for d in shape:
            n *= d
        end = len(body)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [end, end + n]}
        _write_st(run / rel, header, body)
        with open(run / rel, "r+b") as fh:
            fh.truncate(os.path.getsize(run / rel) + n)
    return damage


def _flip_bit(rel: str):
    def damage(run: Path) -> None:
        data = bytearray((run / rel).read_bytes())
        data[-3] ^= 0x10  # in the last tensor's bytes
        (run / rel).write_bytes(bytes(data))
    return damage


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _set(d: Dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if isinstance(d, list):
        d[int(keys[-1])] = value
    elif value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()


def _hdr_set(key: str, field: str, value: Any):
    def edit(h: Dict[str, Any]) -> None:
        h[key][field] = value
    return edit


# (case id, damage, text the error must contain)
CASES = [
    # --- files that are not regular files, or not inside the run (Why 4, 8)
    ("manifest-fifo", _fifo("manifest.json"), "manifest.json is not a regular file"),
    ("initial-fifo", _fifo("initial.safetensors"), "initial.safetensors is not a regular file"),
    ("step-fifo", _fifo(S2), "step_00000002.safetensors is not a regular file"),
    ("manifest-symlink-out", _symlink_out("manifest.json"), "outside the trajectory directory"),
    ("initial-symlink-out", _symlink_out("initial.safetensors"), "outside the trajectory directory"),
    ("step-symlink-out", _symlink_out(S2), "outside the trajectory directory"),
    ("steps-dir-symlink-out", _symlink_out("steps"), "outside the trajectory directory"),
    ("step-symlink-inside-to-another-step",
     lambda run: ((run / S2).unlink(), (run / S2).symlink_to(run / "steps" / fmt.step_filename(3))),
     "holds the record of step 3, not 2"),
    ("initial-is-a-directory", lambda run: ((run / "initial.safetensors").unlink(),
                                            (run / "initial.safetensors").mkdir()), "not a regular file"),
    ("steps-is-a-file", lambda run: (shutil.rmtree(run / "steps"), (run / "steps").write_text("x")),
     "steps is not a directory"),
    # --- step numbers (Why 4, 9)
    ("huge-step-number", _raw("steps/step_99999999999999999.safetensors", b"x"), "missing step(s) [5, 6, 7"),
    ("overlong-step-number", _raw("steps/step_" + "9" * 40 + ".safetensors", b"x"), "named like a step file"),
    ("superscript-step-number", _raw("steps/step_\u00b2.safetensors", b"x"), "named like a step file"),
    ("second-name-for-step-1", _raw("steps/step_000000001.safetensors", b"x"), "named like a step file"),
    # --- sizes announced but not held (Why 4)
    ("sparse-parameter", _sparse(S2, "param/fc1.weight", (20000, 20000)), "step_00000002.safetensors"),
    ("sparse-extra-batch-index", _sparse(S2, "batch/extra", (400_000_000,), "I64"), "step_00000002.safetensors"),
    ("n_micro-1e8", _edit_record(lambda r: (r.update(n_micro=10**8), r.pop("micro_sizes"))), "n_micro"),
    ("micro_sizes-lie", _edit_record(lambda r: r.update(micro_sizes=[1, 7])), "micro_sizes"),
    # --- malformed JSON and headers (Why 9)
    ("manifest-list", _edit_manifest(lambda m: [1, 2]), "manifest.json is a JSON list"),
    ("manifest-null", _raw("manifest.json", b"null"), "manifest.json is a JSON NoneType"),
    ("manifest-2000-deep", _raw("manifest.json", _deep(2000).encode()), "manifest.json"),
    ("manifest-missing-model-params", _edit_manifest(lambda m: _set(m, "model.params", _DELETE)), "model.params"),
    ("manifest-param-shape-string", _edit_manifest(lambda m: _set(m, "model.params.0.shape", "abc")),
     "model.params[0].shape"),
    ("manifest-num_steps-string", _edit_manifest(lambda m: m.update(num_steps="5")), "num_steps"),
    ("manifest-num_steps-huge", _edit_manifest(lambda m: m.update(num_steps=10**20)), "records 100000000000000000000"),
    ("manifest-n_groups-zero", _edit_manifest(lambda m: _set(m, "optimizer.n_groups", 0)), "optimizer.n_groups"),
    ("step-header-null", lambda run: _write_st(run / S2, None, b"", raw_header=b"null"), "not an object"),
    ("step-header-list", lambda run: _write_st(run / S2, None, b"", raw_header=b"[1, 2]"), "not an object"),
    ("step-header-entry-list", _edit_header(S2, lambda h: h.update({"param/fc1.bias": [1]})), "'param/fc1.bias'"),
    ("step-metadata-list", _edit_header(S2, lambda h: h.update(__metadata__=["x"])), "__metadata__"),
    ("step-record-2000-deep", _edit_header(S2, lambda h: h["__metadata__"].update(record=_deep(2000))),
     "step_00000002.safetensors"),
    ("step-record-list", _edit_header(S2, lambda h: h["__metadata__"].update(record="[1]")), "step record is a list"),
    ("step-record-missing-lr", _edit_record(lambda r: r.pop("lr")), "'lr' is missing"),
    ("step-record-grad_sq-string", _edit_record(lambda r: r.update(grad_sq="x")), "'grad_sq'"),
    ("step-record-inactive-unknown", _edit_record(lambda r: r.update(inactive=["nope"])), "'inactive'"),
    # --- headers against the manifest, before any allocation (Why 4, 7)
    ("header-dtype-edit", _edit_header(S2, _hdr_set("param/fc1.weight", "dtype", "I32")), "dtype torch.int32"),
    ("header-shape-edit", _edit_header(S2, _hdr_set("param/fc1.weight", "shape", [4, 6])), "has shape [4, 6]"),
    ("header-offset-edit", _edit_header(S2, lambda h: h["param/fc1.bias"].update(
        data_offsets=[h["param/fc1.bias"]["data_offsets"][0] + 4, h["param/fc1.bias"]["data_offsets"][1] + 4])),
     "step_00000002.safetensors"),
    ("state-shape-edit", _edit_header(S2, _hdr_set("state/fc1.bias/exp_avg_sq", "shape", [3, 2])), "exp_avg_sq"),
    ("buffer-shape-edit", _edit_header(S2, _hdr_set("buffer/bn.running_mean", "shape", [2, 3])), "bn.running_mean"),
    ("initial-buffer-dtype-edit", _edit_header("initial.safetensors", _hdr_set("buffer/bn.num_batches_tracked",
                                                                               "dtype", "F64")), "num_batches_tracked"),
    ("unexpected-tensor", _edit_header(S2, lambda h: h.update({"evil/x": dict(h["param/fc1.bias"])})), "'evil/x'"),
    ("rng-state-wrong-dtype", _edit_header(S2, _hdr_set("batch/rng_state/0", "dtype", "I8")), "rng_state/0"),
    # --- integrity (Why 7)
    ("bit-flip-in-tensor", _flip_bit(S2), "fails its checksum"),
    ("bit-flip-in-initial", _flip_bit("initial.safetensors"), "fails its checksum"),
    ("lr-changed", _edit_record(lambda r: r.update(lr=[0.5]), fix_checksum=False), "fails its checksum"),
    ("beta-changed", _edit_record(lambda r: _set(r, "groups.0.betas", [0.5, 0.999]), fix_checksum=False),
     "fails its checksum"),
    ("grad_sq-changed", _edit_record(lambda r: r["grad_sq"].update({"fc1.bias": 1.0}), fix_checksum=False),
     "fails its checksum"),
    ("manifest-family-sgd-on-adam", _edit_manifest(lambda m: _set(m, "optimizer.family", "sgd"), fix_checksum=False),
     "field 'checksum'"),
    ("family-sgd-on-adam-checksum-fixed", _edit_manifest(lambda m: _set(m, "optimizer.family", "sgd")),
     "family"),
    ("state_step-edited-checksum-fixed", _edit_record(lambda r: r["state_step"].update({"fc1.bias": 7})),
     "'state_step'"),
    ("lr-for-missing-group", _edit_record(lambda r: r.update(lr=[0.01, 0.01])), "2 learning rates for 1"),
    ("negative-batch-index", None, "negative dataset index"),  # made below (tensor bytes)
    ("micro-not-monotone", None, "non-decreasing"),
]


def _rewrite_tensor(key: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    def damage(run: Path) -> None:
        from safetensors.torch import load_file, save_file

        f = run / S2
        header, _ = _read_st(f)
        tensors = load_file(str(f))
        tensors[key] = fn(tensors[key])
        meta = header["__metadata__"]
        sums = json.loads(meta["checksums"])
        sums[key] = fmt.tensor_checksum(tensors[key])
        meta["checksums"] = json.dumps(sums)
        save_file(tensors, str(f), metadata=meta)
    return damage


_TENSOR_CASES = {
    "negative-batch-index": _rewrite_tensor("batch/index", lambda t: t - 100),
    "micro-not-monotone": _rewrite_tensor("batch/micro", lambda t: t.flip(0)),
}
CASES = [(c, _TENSOR_CASES.get(c, d), m) for c, d, m in CASES]

_CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys, time, traceback
    import torch
    from captum_explaind import Trajectory
    import warnings
    warnings.simplefilter("ignore")

    def vm_bytes():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        return 4 << 30

    cap = vm_bytes() + (3 << 29)  # 1.5 GiB above what torch needs here
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    class Hung(Exception):
        pass

    def alarm(*_):
        raise Hung("time limit")

    signal.signal(signal.SIGALRM, alarm)
    out = {}
    for case in sys.argv[2:]:
        path = os.path.join(sys.argv[1], case)
        t0 = time.perf_counter()
        signal.alarm(10)
        try:
            traj = Trajectory.open(path)
            for s in range(traj.num_steps + 1):
                traj.params(s), traj.buffers(s)
                if s:
                    traj.record(s), traj.state(s, "exp_avg_sq")
            traj.check_integrity()
            result = {"error": None, "message": ""}
        except BaseException as err:
            result = {"error": type(err).__name__, "message": str(err)[:2000],
                      "trace": traceback.format_exc()[-1500:]}
        finally:
            signal.alarm(0)
        result["seconds"] = time.perf_counter() - t0
        out[case] = result
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    _record(root / "base")
    Trajectory.open(root / "base")  # the undamaged run opens cleanly
    for case, damage, _ in CASES:
        run = root / case
        shutil.copytree(root / "base", run, symlinks=True)
        damage(run)
    script = root / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(root), *[c for c, _, _ in CASES]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case,expected", [(c, m) for c, _, m in CASES], ids=[c for c, _, _ in CASES])
def test_hostile_recording_raises_a_named_trajectory_corrupt_error(outcomes, case, expected):
    got = outcomes[case]
    assert got["error"] == "TrajectoryCorruptError", got
    assert expected in got["message"], got
    assert got["seconds"] < 10


def test_undamaged_recording_reads_fully_and_older_recordings_without_checksums_still_open(tmp_path):
    """A version-1 recording (no checksums: written before format 2) opens and reads as before."""
    run = tmp_path / "v1"
    _record(run, steps=2)
    traj = Trajectory.open(run)
    traj.check_integrity()
    assert "KB/step" in repr(traj) or "B/step" in repr(traj)
    expected = {s: (traj.params(s)["fc1.weight"], traj.record(s).batches[1].indices.tolist()) for s in (1, 2)}
    m = json.loads((run / "manifest.json").read_text())
    m.update(version=1)
    m.pop("checksum")
    (run / "manifest.json").write_text(json.dumps(m))
    for rel in ["initial.safetensors"] + [f"steps/{fmt.step_filename(s)}" for s in (1, 2)]:
        header, body = _read_st(run / rel)
        header["__metadata__"].pop("checksums")
        header["__metadata__"].pop("record_checksum", None)
        _write_st(run / rel, header, body)
    old = Trajectory.open(run)
    for s in (1, 2):
        assert torch.equal(old.params(s)["fc1.weight"], expected[s][0])
        assert old.record(s).batches[1].indices.tolist() == expected[s][1]
