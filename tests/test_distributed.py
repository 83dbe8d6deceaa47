"""Every view under a real ``torchrun`` process group (gloo, 2 processes, CPU) equals one process.

The test records a run, computes every view in this process, then launches
``python -m torch.distributed.run --nproc_per_node=2 distributed_views.py`` and compares what
*each* rank returns (the full result on every rank) with the single-process numbers, in float64
to 1e-10 relative. One launch runs all views (process-group start-up costs seconds).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captum_explaind import ExactPathKernel, distributed

from distributed_views import all_views, step_work
from training import OPTIMIZERS, RunConfig, TanhMLP, make_data, record_run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Launch ``script`` under ``torch.distributed.run`` on CPU (gloo), one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


ROUND_OFF = ("delta", "step_error", "residual")


def assert_equal_results(got: dict, want: dict, rtol: float = 1e-10) -> None:
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, key
        if not w.is_floating_point():
            assert torch.equal(g, w), key
            continue
        scale = float(w.abs().max()) if w.numel() else 0.0
        if key.split(".")[-1] in ROUND_OFF:
            # a round-off quantity (delta, error, residual): relative to the view's own numbers
            family = key.split(".")[0]
            scale = max(float(v.abs().max()) for k, v in want.items()
                        if k.split(".")[0] == family and v.is_floating_point() and v.numel())
        err = float((g - w).abs().max()) if w.numel() else 0.0
        assert err <= rtol * max(scale, 1e-300), f"{key}: max error {err:.3g} against scale {scale:.3g}"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 40)
    cfg = RunConfig(OPTIMIZERS["adamw_groups"], steps=9, micro=2, clip=0.5)
    path = tmp_path_factory.mktemp("dist") / "t"
    traj, _ = record_run(model, X, Y, path, cfg)
    return model, traj, X, Y, path


def test_outside_a_process_group_nothing_is_sharded():
    assert not distributed.active()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_writer()
    t = torch.arange(3.0)
    distributed.all_reduce_sum_([t])
    assert torch.equal(t, torch.arange(3.0))
    assert distributed.shard(list(range(7))) == list(range(7))
    distributed.shutdown()  # nothing to leave: a no-op, not an error
    assert not torch.distributed.is_initialized()


def test_shard_parts_are_contiguous_balanced_and_cover_everything():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [distributed.shard(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_pair_segment_parts_cover_everything_once_and_name_the_front_rank():
    for n in range(0, 12):
        for world in (1, 2, 3, 4, 5):
            parts = [distributed.pair_segment(list(range(n)), r, world) for r in range(world)]
            for r, (part, pair, front) in enumerate(parts):
                assert pair == r // 2 and front == (r % 2 == 0)  # a lone last rank (odd world) is even
                if r % 2:  # both ranks of a pair share one part
                    assert part == parts[r - 1][0]
            firsts = [parts[r][0] for r in range(0, world, 2)]
            assert sum(firsts, []) == list(range(n))


class _ScriptedClaims:
    """Stands in for the shared counter: this side takes ``limit`` steps, then the other side's turn."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0


class _NoBar:
    def update(self, n: int) -> None:
        pass


@pytest.mark.parametrize("steps", [None, [2, 3, 5, 6, 9]])
def test_pair_sweep_meeting_anywhere_integrates_every_step_once(recorded, steps):
    """The two ranks of a pair meet wherever their times balance: for every meeting point, the
    front rank's steps and the back rank's add up to one process's sweep — a step dropped or
    integrated on both sides, or a wrong shared end point (θ, outputs), fails here."""
    from captum_explaind.epk.pair_sweep import pair_sweep
    from captum_explaind.epk.reconstruct_view import ReconstructView
    from captum_explaind.epk.sweep_split import SweepLog

    model, traj, X, Y, _ = recorded
    epk = ExactPathKernel(model, traj)
    batch = epk.prepare_inputs(X[:4])
    shape = epk.output_shape(batch)
    one = ReconstructView(epk, batch.n, shape)
    epk.sweep(batch, one, steps=steps)
    todo = list(range(1, traj.num_steps + 1)) if steps is None else steps
    for k in range(len(todo) + 1):
        log = SweepLog(todo, batch.n, epk.dtype)
        parts, done = [], []
        for front, limit in ((True, k), (False, len(todo) - k)):
            view = ReconstructView(epk, batch.n, shape)
            done += pair_sweep(epk, batch, view, todo, front, _ScriptedClaims(limit), False, log, _NoBar())
            parts.append(view.parts)
        assert sorted(done) == todo, (k, done)
        torch.testing.assert_close(parts[0] + parts[1], one.parts, rtol=1e-12, atol=1e-14)
        assert log.evaluations > 0


def _views_in_one_process(model, traj, X, Y):
    """Every view in this process, and how many (step, input) pairs it integrated."""
    calls = []
    original = ExactPathKernel._integrate

    def counted(self, seg, chunks, *args):
        calls.append((seg.step, sum(ch.n for ch in chunks)))
        return original(self, seg, chunks, *args)

    ExactPathKernel._integrate = counted
    try:
        want = all_views(model, traj, X, Y)
    finally:
        ExactPathKernel._integrate = original
    return want, step_work(calls)


@pytest.fixture(scope="module")
def launched(recorded, tmp_path_factory):
    """One torchrun launch (2 ranks) for every distributed check: the views, then a DDP run."""
    model, traj, X, Y, path = recorded
    out = tmp_path_factory.mktemp("ranks")
    data = out / "data.pt"
    torch.save((X, Y), data)
    bn_path, bn_data = bn_recorded(out)
    from test_keep_every import _train

    _train(out / "kept", 3, X, Y)  # keep_every=3: the polyline data view
    torchrun(HERE / "distributed_views.py", str(path), str(data), str(out / "out"), str(bn_path), str(bn_data),
             str(out / "kept"))
    return out


def bn_recorded(out: Path):
    """A train-mode BatchNorm run (the data view's coupled training side) and its data on disk."""
    from test_batchnorm_data_view import BNNet, record

    torch.manual_seed(0)
    X = torch.randn(16, 1, 5, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (16,))
    path = out / "bn"
    record(BNNet().double(), X, Y, path)
    torch.save((X, Y), out / "bn_data.pt")
    return path, out / "bn_data.pt"


@pytest.mark.slow
def test_every_view_under_torchrun_equals_one_process(recorded, launched):
    model, traj, X, Y, path = recorded
    want, step_total = _views_in_one_process(model, traj, X, Y)
    total = int(step_total.sum())
    tmp_path = launched
    work, train_work, rows_work, steps_work = [], [], [], []
    total_train = int(want.pop("data.train_work"))
    from distributed_views import bn_views

    bn_want = bn_views(str(tmp_path / "bn"), str(tmp_path / "bn_data.pt"))
    for r in range(2):
        got = torch.load(tmp_path / f"out.rank{r}.pt")
        assert int(got.pop("world_size")) == 2
        work.append(int(got.pop("work")))
        steps_work.append(got.pop("work_steps"))
        train_work.append(int(got.pop("data.train_work")))
        rows_work.append(int(got.pop("rows.data.train_work")))
        rows = {k[len("rows."):]: got.pop(k) for k in list(got) if k.startswith("rows.")}
        for side in (0, 1):  # one rank integrated both blocks' steps and handed the other's over
            forced = {k[len(f"side{side}."):]: got.pop(k) for k in list(got) if k.startswith(f"side{side}.")}
            assert forced and set(forced) <= set(want), sorted(forced)
            assert_equal_results(forced, {k: want[k] for k in forced})
        assert_equal_results(rows, {k: v for k, v in {**want, **bn_want}.items() if k.split(".")[0] in
                                    {k2.split(".")[0] for k2 in rows}})
        assert int(got.pop("mismatch")) == 1  # different inputs per rank: the named error, on every rank
        alone = ExactPathKernel(model, traj).reconstruct(X[r : r + 2]).kernel
        assert_equal_results({"alone.kernel": got.pop("alone")}, {"alone.kernel": alone})
        assert_equal_results(got, want)
    # BatchNorm in train mode: coupled per-sample gradients (by steps; by each micro-batch's rows above)
    for r in range(2):
        assert_equal_results(torch.load(tmp_path / f"out.bn.rank{r}.pt"), bn_want)
    # keep_every: the polyline data view (by option), split alike
    from distributed_views import polyline_views

    poly_want = polyline_views(str(tmp_path / "kept"), X, Y)
    for r in range(2):
        assert_equal_results(torch.load(tmp_path / f"out.polyline.rank{r}.pt"), poly_want)
    # each rank integrated its own part: (step, input) pairs add up to one process's. How evenly they
    # split depends on timing (the pairs meet where their times balance; on a loaded machine one rank
    # may take most): a benchmark matter (benchmarks/scaling.py), not asserted here.
    assert sum(work) == total, (work, total)
    # step by step (the pairs of ranks meet where their time balances): no step dropped or integrated twice
    assert torch.equal(steps_work[0] + steps_work[1], step_total), (steps_work, step_total)
    # and its share of every step's training samples: per-sample gradients add up, split ~evenly
    assert sum(train_work) == total_train and max(train_work) <= 0.6 * total_train, (train_work, total_train)
    assert sum(rows_work) == total_train and max(rows_work) <= 0.6 * total_train, (rows_work, total_train)
    # the comparison can fail: a rank's share alone is not the result
    half = dict(want)
    half["data.scores"] = want["data.scores"].clone()
    half["data.scores"][3:] = 0
    with pytest.raises(AssertionError):
        assert_equal_results(half, want)


@pytest.mark.slow
def test_ddp_recorder_records_every_rank_and_the_data_view_replays_it(recorded, launched):
    from torch.utils.data import TensorDataset

    from captum_explaind import TrainingDataInfluence, Trajectory

    from distributed_views import ddp_sampler_indices, nll

    model, _, X, Y, _ = recorded
    X, Y = X[:20], Y[:20]
    traj = Trajectory.open(launched / "out.ddp")
    # one writer: every step holds both ranks' micro-batches of the DistributedSampler, in rank order
    per_rank = [[ddp_sampler_indices(len(X), 2, r, e) for e in range(2)] for r in range(2)]
    assert traj.num_steps == 2 * 3  # 2 epochs × ceil(10 per rank / 4) steps
    for s in range(1, traj.num_steps + 1):
        epoch, j = divmod(s - 1, 3)
        rec = traj.record(s)
        want = [per_rank[r][epoch][4 * j : 4 * j + 4] for r in range(2)]
        assert [mb.indices.tolist() for mb in rec.batches] == want
        for mb, idx in zip(rec.batches, want):  # DDP averages the ranks' mean losses
            torch.testing.assert_close(mb.weights, torch.full((len(idx),), 1 / (2 * len(idx)), dtype=torch.float64))
    # the data view replays it exactly: complete against the real model, nothing left as residual
    one = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll).explain(X[:5], target=Y[:5])
    torch.testing.assert_close(one.scores.sum(1) + one.regularization + one.residual + one.delta, one.change,
                               rtol=0, atol=1e-12)
    assert float(one.residual.abs().max()) < 1e-10 * float(one.scores.abs().sum(1).max())
    for r in range(2):  # and the sharded data view on both ranks equals this process's
        got = torch.load(launched / f"out.ddp_data.rank{r}.pt")
        assert_equal_results({f"data.{k}": v for k, v in got.items()},
                             {f"data.{k}": getattr(one, k) for k in got})
    # a recorder created on rank 0 only (ddp=False) recorded that process alone
    alone = Trajectory.open(launched / "out.alone")
    assert alone.num_steps == 3 and [mb.indices.tolist() for mb in alone.record(3).batches] == [[2, 3]]


@pytest.mark.slow
def test_data_view_over_three_ranks_chains_the_carry(recorded, tmp_path):
    """Three blocks of steps: the carry into the first crosses two later blocks. And the forward
    sweeps with an odd world: a pair meeting in its part, the last rank alone in its own."""
    from distributed_views import data_views, forward_views

    model, traj, X, Y, path = recorded
    torch.save((X, Y), tmp_path / "data.pt")
    torchrun(HERE / "distributed_views.py", "--data", str(path), str(tmp_path / "data.pt"), str(tmp_path / "d"),
             nproc=3)
    want = data_views(model, traj, X, Y, X[:5], Y[:5])
    want.update(forward_views(model, traj, X[:5], Y[:5]))
    total = int(want.pop("data.train_work"))
    work = []
    for r in range(3):
        got = torch.load(tmp_path / f"d.rank{r}.pt")
        work.append(int(got.pop("data.train_work")))
        assert_equal_results(got, want)
    assert sum(work) == total and max(work) < 0.5 * total, (work, total)
