"""kill -9 at random moments (issue 13 item 8): every complete step of the recording is
bit-identical to what the training process itself saw, written to a side channel.

The child trains and records (synchronously or with the background writer) and, after each
``optimizer.step()``, atomically saves its parameters and Adam state to ``side/<s>``. The
parent SIGKILLs it at a random moment (the seed is in the test id). Whatever the moment, the
recording opens as a readable prefix, its steps match the side channel bit for bit, and it is at
most one step ahead of the side channel (killed between the two writes) — or, with the
background writer, behind it by at most the writer's queue.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captum_explaind import Trajectory

REPO_ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from captum_explaind import TrajectoryRecorder

    path, side, background = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    X, Y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    rec = TrajectoryRecorder(model, opt, path, background=background)
    os.makedirs(side)
    print("ready", flush=True)
    for s in range(1, 100000):
        idx = torch.tensor([s % 64, (7 * s) % 64, (13 * s) % 64])
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
        seen = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen.update({"state/" + n: opt.state[p]["exp_avg_sq"].clone() for n, p in model.named_parameters()})
        tmp = os.path.join(side, f"{s}.tmp")
        save_file(seen, tmp)
        os.replace(tmp, os.path.join(side, str(s)))
    """
)


@pytest.mark.parametrize("background,seed", [(False, 11), (True, 23)], ids=["sync-seed11", "background-seed23"])
def test_kill_9_at_a_random_moment_loses_and_mixes_nothing(tmp_path, background, seed):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    path, side = tmp_path / "run", tmp_path / "side"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(side), "1" if background else "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(random.Random(seed).uniform(0.3, 1.5))  # some steps, then a random moment
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not closed", maybe "incompletely written"
        traj = Trajectory.open(path)
    seen = sorted(int(n) for n in os.listdir(side) if n.isdigit())
    assert seen == list(range(1, len(seen) + 1))
    n = traj.num_steps
    assert n >= 1 and len(seen) >= 1, (n, len(seen))
    lag = 3 if background else 0  # the background writer may hold a few steps not yet on disk
    assert len(seen) - lag <= n <= len(seen) + 1, (n, len(seen))
    for s in range(1, min(n, len(seen)) + 1):
        expected = load_file(str(side / str(s)))
        params, state = traj.params(s), traj.state(s, "exp_avg_sq")
        for name in params:
            assert torch.equal(params[name], expected[name]), (s, name)
            assert torch.equal(state[name], expected["state/" + name]), (s, name)
        assert traj.record(s).batches[0].indices.tolist() == [s % 64, (7 * s) % 64, (13 * s) % 64]
    traj.check_integrity()
    assert (path / ".lock").exists()  # the dead recorder's lock stays, to be named by the next one
