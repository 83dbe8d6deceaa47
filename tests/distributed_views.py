"""Every view on one recorded run, as plain tensors — computed once in the test process and once
per rank under ``torchrun`` (``python -m torch.distributed.run ... distributed_views.py``), so
the test can compare the sharded results with one process.

Run as a script: ``distributed_views.py TRAJECTORY DATA OUT_PREFIX`` (inside a process group:
each rank writes ``OUT_PREFIX.rank<r>.pt``).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Dict, Iterator, List

import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import (
    ExactPathKernel,
    ParameterInfluence,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
)


def nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.nll_loss(out, y, reduction="none")


@contextlib.contextmanager
def counted_train_grads() -> Iterator[List[int]]:
    """Count the per-sample training gradients computed inside (the data view's dominant work)."""
    from captum_explaind.epk import train_grads

    counts: List[int] = []
    names = ("per_sample_loss_grads", "weighted_param_grads")  # flat, and per parameter
    originals = {name: getattr(train_grads, name) for name in names}

    def counting(original):
        def counted(fm, train, loss_fn, theta, indices, *args, **kwargs):
            counts.append(int(len(indices)))
            return original(fm, train, loss_fn, theta, indices, *args, **kwargs)
        return counted

    for name in names:
        setattr(train_grads, name, counting(originals[name]))
    try:
        yield counts
    finally:
        for name in names:
            setattr(train_grads, name, originals[name])


def step_work(calls: List, steps: int = 64) -> torch.Tensor:
    """(step, inputs) integrations as inputs integrated per step: a step dropped or integrated by
    two ranks changes its entry."""
    work = torch.zeros(steps + 1, dtype=torch.int64)
    for step, n in calls:
        work[step] += n
    return work


def data_views(model: nn.Module, traj, X: torch.Tensor, Y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               **options) -> Dict[str, torch.Tensor]:
    """The data view: one window, gradient windows, one input, application windows with groups,
    forward mode; and the per-sample gradients computed for the first."""
    out: Dict[str, torch.Tensor] = {}
    train = TensorDataset(X, Y)
    tdi = TrainingDataInfluence(model, traj, train, nll, **options)
    with counted_train_grads() as train_work:
        d = tdi.explain(x, target=y)
    out["data.train_work"] = torch.tensor(sum(train_work))
    for k in ("scores", "regularization", "residual", "change", "delta"):
        out[f"data.{k}"] = getattr(d, k)
    out["data.grad_scale"] = torch.tensor(list(d.grad_scale.values()))
    dw = tdi.explain(x, target=y, steps=[range(1, 4), range(4, traj.num_steps + 1)], indexing="gradient")
    out["data_windows.scores"] = dw.scores
    one = tdi.explain(x[:1], target=y[:1])
    out["data_one.scores"] = one.scores
    out["data_one.grad_scale"] = torch.tensor(list(one.grad_scale.values()))
    # application windows (momentum carries credit across them: the sweep runs past the first),
    # parameter groups, and the forward-mode training side (split by test rows, not samples)
    # (overlapping: step 3 lies in two windows, one sweep serves both)
    da = tdi.explain(x, target=y, steps=[range(2, 4), range(3, 5), range(6, traj.num_steps + 1)], layers=["fc1", "fc2"])
    for k in ("scores", "regularization", "residual"):
        out[f"data_app.{k}"] = getattr(da, k)
    assert da.per_window is not None
    # (the per-window residuals and deltas are round-off here: no relative comparison)
    out.update({f"data_app.window_{k}": da.per_window[k] for k in ("regularization", "change")})
    # a group leaving fc1 out: per-sample gradients of fc2 only, fc1's share in `other`
    dp = tdi.explain(x, target=y, steps=[range(2, 4), range(6, traj.num_steps + 1)], layers={"dec": "fc2"})
    for k in ("scores", "other", "residual"):
        out[f"data_part.{k}"] = getattr(dp, k)
    jv = TrainingDataInfluence(model, traj, train, nll, train_jvp=True, **options).explain(x, target=y)
    for k in ("scores", "residual"):
        out[f"data_jvp.{k}"] = getattr(jv, k)
    return out


def data_pair_views(model: nn.Module, traj, X: torch.Tensor, Y: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                    ) -> Dict[str, torch.Tensor]:
    """Two of :func:`data_views`' explanations (one window; application windows with groups)."""
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll)
    d = tdi.explain(x, target=y)
    out = {f"data.{k}": getattr(d, k) for k in ("scores", "regularization", "residual", "change", "delta")}
    da = tdi.explain(x, target=y, steps=[range(2, 4), range(3, 5), range(6, traj.num_steps + 1)], layers=["fc1", "fc2"])
    out.update({f"data_app.{k}": getattr(da, k) for k in ("scores", "regularization", "residual")})
    assert da.per_window is not None
    # (the per-window residuals and deltas are round-off here: no relative comparison)
    out.update({f"data_app.window_{k}": da.per_window[k] for k in ("regularization", "change")})
    return out


def forward_views(model: nn.Module, traj, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The forward sweeps (reconstruction, training view): split over pairs of ranks meeting in
    their part, a lone rank with an odd world."""
    rec = ExactPathKernel(model, traj).reconstruct(x)
    out = {f"fwd_reconstruct.{k}": getattr(rec, k) for k in ("kernel", "regularization", "delta")}
    steps = StepInfluence(model, traj).explain(x, target=y, window=1, layers=["fc1", "fc2"])
    out.update({f"fwd_steps.{c}": v for c, v in steps.scores.items()})
    return out


def all_views(model: nn.Module, traj, X: torch.Tensor, Y: torch.Tensor, n_test: int = 5,
              **options) -> Dict[str, torch.Tensor]:
    """Reconstruction, model view (per parameter and per layer), training view, data view (two
    windowings, one input — fewer inputs than ranks), similarity: every number as a tensor."""
    x, y = X[:n_test], Y[:n_test]
    out: Dict[str, torch.Tensor] = {}
    rec = ExactPathKernel(model, traj, **options).reconstruct(x)
    for k in ("kernel", "regularization", "buffers", "delta"):
        out[f"reconstruct.{k}"] = getattr(rec, k)
    out["reconstruct.step_error"] = rec.stats.step_error
    out["reconstruct.evaluations"] = torch.tensor(rec.stats.evaluations)
    pi = ParameterInfluence(model, traj, **options)
    scores, delta = pi.attribute(x, target=y, return_convergence_delta=True)
    for name, v in scores.items():
        out[f"model.{name}"] = v
    out["model.delta"] = delta
    layers = pi.explain(x, target=y, layers=["fc1", "fc2"])
    for comp, v in layers.scores.items():
        out[f"model_layers.{comp}"] = v
    steps = StepInfluence(model, traj, **options).explain(x, target=y, window=2, component=["kernel",
                                                                                           "regularization"])
    for comp, v in steps.scores.items():
        out[f"steps.{comp}"] = v
    out["steps.delta"] = steps.delta
    out.update(data_views(model, traj, X, Y, x, y, **options))
    train = TensorDataset(X, Y)
    sim = PredictionSimilarity(model, traj, train, nll, **options).explain(x, target=y, steps=range(2, traj.num_steps))
    out["similarity.gram"] = sim.gram
    return out


def bn_views(traj_path: str, data_path: str) -> Dict[str, torch.Tensor]:
    """The data view of a train-mode BatchNorm run (coupled per-sample gradients: each rank takes a
    share of every micro-batch's Jacobian rows), per-sample and forward mode."""
    from test_batchnorm_data_view import BNNet

    from captum_explaind import Trajectory
    from captum_explaind.errors import ModelMismatchWarning

    X, Y = torch.load(data_path)
    traj = Trajectory.open(traj_path)
    out: Dict[str, torch.Tensor] = {}
    warnings.filterwarnings("ignore", category=ModelMismatchWarning)  # a fresh instance of the architecture
    tdi = TrainingDataInfluence(BNNet().double(), traj, TensorDataset(X, Y))
    d = tdi.explain(X[:3] + 0.1, target=1)
    assert d.train_grads == "coupled", d.train_grads
    for k in ("scores", "regularization", "residual", "buffers", "delta"):
        out[f"bn.{k}"] = getattr(d, k)
    jv = TrainingDataInfluence(BNNet().double(), traj, TensorDataset(X, Y), train_jvp=True).explain(X[:3] + 0.1,
                                                                                                     target=1)
    out["bn_jvp.scores"] = jv.scores
    return out


def polyline_views(traj_path: str, X: torch.Tensor, Y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The data view of a ``keep_every`` run by option (``polyline=True``), with windows and groups."""
    from captum_explaind import Trajectory

    from training import TanhMLP

    warnings.filterwarnings("ignore", message=".*residual")  # the approximation, reported in the residual
    traj = Trajectory.open(traj_path)
    d = TrainingDataInfluence(TanhMLP().double(), traj, TensorDataset(X, Y), nll, polyline=True).explain(
        X[:3], target=Y[:3], steps=[range(1, 3), range(2, 4), range(3, traj.num_steps + 1)], layers=["fc1", "fc2"])
    out = {f"polyline.{k}": getattr(d, k) for k in ("scores", "regularization", "residual", "change")}
    part = TrainingDataInfluence(TanhMLP().double(), traj, TensorDataset(X, Y), nll, polyline=True).explain(
        X[:3], target=Y[:3], steps=[range(1, 3), range(3, traj.num_steps + 1)], layers=["fc2"])
    out.update({f"polyline_part.{k}": getattr(part, k) for k in ("scores", "other", "residual")})
    return out


def ddp_sampler_indices(n: int, world: int, rank: int, epoch: int) -> "list[int]":
    """What a ``DistributedSampler`` (shuffle, seed 0) gives ``rank`` in ``epoch``."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    return list(sampler)


def ddp_train_and_record(path: str, X: torch.Tensor, Y: torch.Tensor, epochs: int = 2, batch: int = 4) -> None:
    """Real DDP training (gloo, CPU) on a ``DistributedSampler``, recorded by every rank's recorder
    (rank 0 writes; each rank logs its own micro-batches)."""
    from torch.nn.parallel import DistributedDataParallel

    from captum_explaind import TrajectoryRecorder, distributed

    from training import TanhMLP

    torch.manual_seed(0)
    model = TanhMLP().double()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, path) as rec:
        for epoch in range(epochs):
            mine = ddp_sampler_indices(len(X), distributed.world_size(), distributed.rank(), epoch)
            for start in range(0, len(mine), batch):
                idx = torch.tensor(mine[start : start + batch])
                opt.zero_grad()
                nll(ddp(X[idx]), Y[idx]).mean().backward()
                rec.log_batch(idx)
                opt.step()


def data_main(argv) -> None:
    """``distributed_views.py --data TRAJECTORY DATA OUT_PREFIX``: the data views only (a launch
    of more ranks: the reverse-time carry crosses several blocks)."""
    from captum_explaind import Trajectory, distributed

    from training import TanhMLP

    traj_path, data_path, prefix = argv[2:5]
    torch.distributed.init_process_group("gloo")
    try:
        X, Y = torch.load(data_path)
        got = data_views(TanhMLP().double(), Trajectory.open(traj_path), X, Y, X[:5], Y[:5])
        got.update(forward_views(TanhMLP().double(), Trajectory.open(traj_path), X[:5], Y[:5]))
        torch.save(got, f"{prefix}.rank{distributed.rank()}.pt")
    finally:
        distributed.shutdown()  # not destroy_process_group alone: see its docstring


def main(argv) -> None:
    from captum_explaind import Trajectory, TrajectoryRecorder, distributed

    from training import TanhMLP

    traj_path, data_path, prefix = argv[1:4]
    torch.distributed.init_process_group("gloo")
    try:
        X, Y = torch.load(data_path)
        model = TanhMLP().double()
        # count this rank's (step, input-chunk) integrations: the work must really be split
        calls = []
        original = ExactPathKernel._integrate

        def counted(self, seg, chunks, *args):
            calls.append((seg.step, sum(ch.n for ch in chunks)))
            return original(self, seg, chunks, *args)

        ExactPathKernel._integrate = counted
        out = all_views(model, Trajectory.open(traj_path), X, Y)
        out["work"] = torch.tensor(sum(n for _, n in calls))
        out["work_steps"] = step_work(calls)
        ExactPathKernel._integrate = original
        # the data view split by test inputs and training samples (what it does when a rank's
        # block of steps would not fit): the same numbers
        from captum_explaind.epk import data_view

        saved, data_view.STEP_SPLIT_BYTES = data_view.STEP_SPLIT_BYTES, 0
        rows = data_views(model, Trajectory.open(traj_path), X, Y, X[:5], Y[:5])
        if len(argv) > 5:
            rows.update(bn_views(argv[4], argv[5]))
        data_view.STEP_SPLIT_BYTES = saved
        out.update({f"rows.{k}": v for k, v in rows.items()})
        # the pair's meeting point forced to either end: one rank integrates every step of both
        # blocks and hands the other's η D φ over (the exchange, both ways)
        from captum_explaind.epk import pair_sweep

        saved_limit = pair_sweep.PAIR_LIMIT
        for side in (0, 1):
            pair_sweep.PAIR_LIMIT = 1.0 if distributed.rank() == side else 0.0
            out.update({f"side{side}.{k}": v for k, v in data_pair_views(model, Trajectory.open(traj_path), X, Y,
                                                                         X[:5], Y[:5]).items()})
        pair_sweep.PAIR_LIMIT = saved_limit
        # ranks asking different questions: a named error on every rank, or each alone by option
        r = distributed.rank()
        traj = Trajectory.open(traj_path)
        try:
            ExactPathKernel(model, traj).reconstruct(X[r : r + 2])
            out["mismatch"] = torch.tensor(0)
        except ValueError as err:
            out["mismatch"] = torch.tensor(1 if "rank(s) [1] differ" in str(err) else 2)
        out["alone"] = ExactPathKernel(model, traj, distributed=False).reconstruct(X[r : r + 2]).kernel
        out["world_size"] = torch.tensor(distributed.world_size())
        torch.save(out, f"{prefix}.rank{distributed.rank()}.pt")
        ExactPathKernel._integrate = original
        if len(argv) > 5:  # a BatchNorm run: the coupled training side, split
            torch.save(bn_views(argv[4], argv[5]), f"{prefix}.bn.rank{distributed.rank()}.pt")
        if len(argv) > 6:  # a keep_every run: the polyline data view, split
            torch.save(polyline_views(argv[6], X, Y), f"{prefix}.polyline.rank{distributed.rank()}.pt")
        # DDP on a DistributedSampler: one trajectory on disk; then the data view of it, sharded
        ddp_path = f"{prefix}.ddp"
        ddp_train_and_record(ddp_path, X[:20], Y[:20])
        traj = Trajectory.open(ddp_path)
        d = TrainingDataInfluence(TanhMLP().double(), traj, TensorDataset(X[:20], Y[:20]), nll).explain(
            X[:5], target=Y[:5])
        torch.save({"scores": d.scores, "residual": d.residual, "delta": d.delta, "change": d.change,
                    "regularization": d.regularization},
                   f"{prefix}.ddp_data.rank{distributed.rank()}.pt")
        if distributed.rank() == 0:  # one process recording alone inside the group: no waiting for others
            m = TanhMLP().double()
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            with TrajectoryRecorder(m, opt, f"{prefix}.alone", ddp=False) as rec:
                for i in range(3):
                    opt.zero_grad()
                    nll(m(X[i : i + 2]), Y[i : i + 2]).mean().backward()
                    rec.log_batch(torch.arange(i, i + 2))
                    opt.step()
        distributed.barrier()
    finally:
        distributed.shutdown()  # not destroy_process_group alone: see its docstring


if __name__ == "__main__":
    data_main(sys.argv) if sys.argv[1] == "--data" else main(sys.argv)
