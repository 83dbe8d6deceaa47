"""Scaling benchmark: time and peak memory against P, N, n_train and n_test; 1 vs 2 ranks.

Runs this library only (the peers are in ``data_view.py``, ``reconstruct.py`` and ``views.py``),
on one recorded run per setting of a tanh MLP ``d_in → h → h → classes`` (SGD with momentum,
float64), for three jobs: reconstruction (``ExactPathKernel.reconstruct``), the per-layer
training view (``StepInfluence(..., layers=...)``) and the data view
(``TrainingDataInfluence.explain``). Every row passes its options explicitly. Peak memory is the
peak resident-set-size increase of the process during the call (``VmHWM`` reset through
``/proc/self/clear_refs``), the same measurement as the other benchmarks.

Sweeps (each varies one quantity, the others at their base value): P ≈ 1e4 … 1e7 (hidden width),
N steps, n_train (fixed batch size) and the training batch size (fixed n_train) for the data
view, n_test. Growth exponents are least-squares slopes of log(time) and log(memory) against
log(x). Then the ≥ 10M-parameter data view under ``max_memory="4GiB"`` (forward-mode training
side, chosen automatically), and the same job by one process and split over 2 ranks under
``torchrun`` at one thread each, interleaved in one launch (``--only ranks``).

Usage::

    python benchmarks/scaling.py                 # everything, writes benchmarks/results/scaling.{md,png}
    python benchmarks/scaling.py --quick         # smaller sweeps (a smoke run)
    python benchmarks/scaling.py --device cuda   # GPU rows (not run on the CPU-only machine)
    python benchmarks/scaling.py --only ranks    # only the 1 vs 2 ranks rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from benchmarks.peers.explaind_peer import foreign_load, measure  # noqa: E402
from benchmarks.reconstruct import environment, fmt_mem  # noqa: E402
from captum_explaind import ExactPathKernel, StepInfluence, TrainingDataInfluence, TrajectoryRecorder  # noqa: E402

D_IN, CLASSES = 32, 10
BASE = dict(P=100_000, N=8, n_train=256, batch=16, n_test=4)


# ----------------------------------------------------------------------------- workload
class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))).log_softmax(-1)


def hidden_for(P: int) -> int:
    """Hidden width whose parameter count is closest to P (P = h² + (D_IN + CLASSES + 2) h + CLASSES)."""
    b = D_IN + CLASSES + 2
    return max(2, round((-b + math.sqrt(b * b + 4 * max(P - CLASSES, 1))) / 2))


def nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.nll_loss(out, y, reduction="none")


@dataclass
class Setting:
    P: int
    N: int
    n_train: int
    batch: int
    n_test: int


def record(s: Setting, path: str, seed: int = 0):
    """Train and record: N steps of SGD (momentum 0.9) on random batches; returns (model, traj, X, Y)."""
    torch.manual_seed(seed)
    model = MLP(hidden_for(s.P)).double()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(s.n_train + s.n_test, D_IN, generator=g, dtype=torch.float64)
    Y = torch.randint(0, CLASSES, (s.n_train + s.n_test,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with TrajectoryRecorder(model, opt, path, overwrite=True) as rec:
        for _ in range(s.N):
            idx = torch.randperm(s.n_train, generator=g)[: s.batch]
            opt.zero_grad()
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory, X[: s.n_train], Y[: s.n_train], X[s.n_train :], Y[s.n_train :]


def options(device: str, **extra: Any) -> Dict[str, Any]:
    """Every row's options, explicit: float64, GL-4 with error control (the 'exact' preset)."""
    return dict(options="exact", dtype=torch.float64, device=device, **extra)


def run_job(job: str, model, traj, X, Y, x, y, device: str, **extra: Any) -> "tuple[float, str]":
    """One call of ``job``; returns max |delta| (what the result misses of the true change) and, for the
    data view, the training-gradient computer that ran."""
    o = options(device, **extra)
    if job == "reconstruct":
        return ExactPathKernel(model, traj, **o).reconstruct(x).max_abs_delta(), ""
    if job == "training view":
        res = StepInfluence(model, traj, **o).explain(x, target=y, window=1, layers=["fc1", "fc2", "out"])
        return float(res.delta.abs().max()), ""
    if job == "data view":
        data = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll, **o).explain(x, target=y)
        return float(data.delta.abs().max()), f"train_grads={data.train_grads}"
    raise ValueError(job)


@dataclass
class Row:
    sweep: str
    job: str
    P: int
    N: int
    n_train: int
    batch: int
    n_test: int
    seconds: float
    peak: Optional[int]
    delta: float
    foreign: Optional[float]
    note: str = ""
    info: str = ""
    #: peak GPU memory allocated during the call beyond what was allocated before it (CUDA rows)
    gpu_peak: Optional[int] = None


def mem_of(r: Row) -> Optional[int]:
    """The memory a row is judged by: GPU memory on a GPU row, else the RSS increase."""
    return r.gpu_peak if r.gpu_peak is not None else r.peak


def measure_rows(sweep: str, jobs: Sequence[str], s: Setting, device: str, workdir: str, note: str = "",
                 **extra: Any) -> List[Row]:
    """Record the setting's run once, then time each job on it (after a one-input warm-up)."""
    path = os.path.join(workdir, "traj")
    model, traj, X, Y, x, y = record(s, path)
    # everything on the device, the training set included (no host round trips inside the timing)
    model = model.to(device)
    X, Y, x, y = X.to(device), Y.to(device), x.to(device), y.to(device)
    on_gpu = torch.device(device).type == "cuda"
    real_P = sum(p.numel() for p in model.parameters())
    rows = []
    for job in jobs:
        run_job(job, model, traj, X, Y, x[:1], y[:1], device, **extra)  # warm-up (imports, vmap decisions)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with measure() as u:
            delta, info = run_job(job, model, traj, X, Y, x, y, device, **extra)
            if on_gpu:  # the clock stops when the GPU's work is done, not when it is queued
                torch.cuda.synchronize()
        gpu_peak = torch.cuda.max_memory_allocated() - before if on_gpu else None
        rows.append(Row(sweep, job, real_P, s.N, s.n_train, s.batch, s.n_test, u.seconds, u.peak_rss_bytes, delta,
                        u.foreign_cpu, note, info, gpu_peak))
        print(f"  {sweep:>8} {job:<14} P={real_P:>10,} N={s.N:<3} n_train={s.n_train:<5} batch={s.batch:<4} "
              f"n_test={s.n_test:<3} {u.seconds:8.2f} s  {fmt_mem(u.peak_rss_bytes):>9}"
              + (f"  GPU {fmt_mem(gpu_peak):>9}" if on_gpu else "")
              + f"  |delta| {delta:.1e}  others' CPU {0 if u.foreign_cpu is None else 100 * u.foreign_cpu:.0f}% {info}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- sweeps
def sweeps(quick: bool) -> List[Any]:
    """``(sweep, setting, jobs' extra options, note)`` for every measured setting."""
    b = BASE
    P = [10_000, 100_000, 1_000_000] + ([] if quick else [10_000_000])
    Ns = [4, 8, 16] if quick else [4, 8, 16, 32]
    trains = [64, 256, 1024] if quick else [64, 256, 1024, 4096]
    batches = [8, 32, 128] if quick else [8, 32, 128, 512]
    tests = [2, 4, 8] if quick else [2, 4, 8, 16]
    out: List[Any] = [("P", Setting(p, 4, b["n_train"], b["batch"], 2), {}, "") for p in P]
    out += [("N", Setting(b["P"], n, b["n_train"], b["batch"], b["n_test"]), {}, "") for n in Ns]
    out += [("n_train", Setting(b["P"], b["N"], m, b["batch"], b["n_test"]), {}, "") for m in trains]
    for extra, note in (({}, "defaults"), ({"max_memory": "2GiB"}, "max_memory='2GiB'"),
                        ({"train_jvp": True}, "train_jvp=True")):
        out += [("batch", Setting(b["P"], b["N"], 1024, m, b["n_test"]), extra, note) for m in batches]
    out += [("n_test", Setting(b["P"], b["N"], b["n_train"], b["batch"], n), {}, "") for n in tests]
    return out


JOBS_OF = {"P": ["reconstruct", "training view", "data view"], "N": ["reconstruct", "training view", "data view"],
           "n_train": ["data view"], "batch": ["data view"], "n_test": ["reconstruct", "training view", "data view"]}


def slope(xs: Sequence[float], ys: Sequence[Optional[float]]) -> Optional[float]:
    """Least-squares slope of log y against log x (None with fewer than 2 usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y is not None and y > 0 and x > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den > 0 else None


def exponents(rows: List[Row]) -> List[Dict[str, Any]]:
    out = []
    for sweep, job, note in _series(rows):
        rs = [r for r in rows if (r.sweep, r.job, r.note) == (sweep, job, note)]
        if len(rs) < 2:
            continue
        xs = [float(getattr(r, sweep)) for r in rs]
        out.append({"sweep": sweep, "job": job + (f" ({note})" if note else ""),
                    "time": slope(xs, [r.seconds for r in rs]),
                    "memory": slope(xs, [None if (m := mem_of(r)) is None else float(m) for r in rs])})
    return out


def _series(rows: List[Row]) -> List[Any]:
    seen: List[Any] = []
    for r in rows:
        if r.sweep in JOBS_OF and (r.sweep, r.job, r.note) not in seen:
            seen.append((r.sweep, r.job, r.note))
    return seen


# ----------------------------------------------------------------------------- ranks
#: the jobs timed 1 vs 2 ranks (``--rank-job`` picks some)
RANK_JOBS = ("reconstruct", "training view", "data view")
#: what ``--rank-breakdown`` times (inclusive main-thread CPU seconds per call site, summed per run)
BREAKDOWN = [
    ("captum_explaind.epk.engine", "ExactPathKernel", "__init__"),
    ("captum_explaind.epk.engine", "ExactPathKernel", "prepare_inputs"),
    ("captum_explaind.epk.engine", "ExactPathKernel", "_forward_all"),
    ("captum_explaind.epk.engine", "ExactPathKernel", "_integrate"),
    ("captum_explaind.epk.engine", "ExactPathKernel", "theta"),
    ("captum_explaind.recording.trajectory", "Trajectory", "record"),
    ("captum_explaind.epk.updates", "UpdateModel", "vectors"),
    ("captum_explaind.epk.data_view", "DataView", "_project"),
    ("captum_explaind.epk.data_view", "DataView", "_test_side"),
    ("captum_explaind.epk.data_view", "DataView", "finish_shard"),
    ("captum_explaind.distributed", None, "all_gather_objects"),
    ("captum_explaind.distributed", None, "send_tensors"),
    ("captum_explaind.distributed", None, "recv_tensors"),
    ("captum_explaind.distributed", None, "all_reduce_sum_"),
]


def _install_timers() -> Dict[str, List[float]]:
    """Wrap :data:`BREAKDOWN` with thread-time counters; returns ``{name: [seconds, calls]}``."""
    import functools
    import importlib

    acc: Dict[str, List[float]] = {}
    for mod, cls, name in BREAKDOWN:
        owner = getattr(importlib.import_module(mod), cls) if cls else importlib.import_module(mod)
        orig = getattr(owner, name, None)
        if orig is None:  # an older version of the library (a before/after comparison)
            continue
        key = f"{cls or 'distributed'}.{name}"
        acc[key] = [0.0, 0]

        def timed(*a: Any, _orig: Any = orig, _key: str = key, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return _orig(*a, **k)
            finally:
                acc[_key][0] += time.thread_time() - t
                acc[_key][1] += 1

        setattr(owner, name, functools.wraps(orig)(timed))
    return acc


def rank_worker(args: argparse.Namespace) -> None:
    """Under torchrun with 2 ranks: each job alternately by one process (rank 0 alone,
    ``distributed=False``, while rank 1 waits) and split over both ranks, ``--rank-repeat`` times.

    Interleaving the two in one launch makes them meet the same load from other jobs on a shared
    machine; each measurement is the wall time between barriers and the main-thread CPU seconds of
    the busiest rank (the work split). Rank 0 writes the best of each and the per-pair ratios.
    """
    from captum_explaind import Trajectory, distributed

    torch.distributed.init_process_group("gloo")
    try:
        s = Setting(args.rank_P, args.rank_N, 256, 16, args.rank_n_test)
        traj = Trajectory.open(args.traj)
        torch.manual_seed(0)
        model = MLP(hidden_for(s.P)).double()
        X, Y, x, y = torch.load(os.path.join(args.traj, "..", "data.pt"), weights_only=True)
        result: Dict[str, Any] = {}
        acc = _install_timers() if args.rank_breakdown else {}
        for job in args.rank_jobs or RANK_JOBS:
            best: Dict[str, Any] = {}
            times: Dict[str, List[List[float]]] = {"one": [[], []], "two": [[], []]}
            # The first pair is the warm-up, the whole job both ways (lazy imports, and the heap grown
            # to the job's size, which a rank keeps between calls: epk/allocator.py); it is reported
            # apart, as the first call's speed-up, and left out of the best and the median.
            for rep in range(args.rank_repeat + 1):
                for mode in ("one", "two"):
                    distributed.barrier()
                    for v in acc.values():
                        v[0], v[1] = 0.0, 0
                    t0, c0 = time.perf_counter(), time.thread_time()
                    if mode == "two":
                        run_job(job, model, traj, X, Y, x, y, "cpu")
                    elif distributed.rank() == 0:
                        run_job(job, model, traj, X, Y, x, y, "cpu", distributed=False)
                    c1 = time.thread_time()
                    distributed.barrier()
                    wall = time.perf_counter() - t0
                    cpus = distributed.all_gather_objects(c1 - c0)
                    if rep == 0:
                        result[f"{job} {mode} first wall"] = wall
                        continue
                    times[mode][0].append(wall)
                    times[mode][1].append(max(cpus))
                    if acc and (mode not in best or max(cpus) < best[mode][0]):
                        parts = {k: (round(v[0], 4), int(v[1])) for k, v in acc.items() if v[1]}
                        best[mode] = (max(cpus), [round(c, 4) for c in cpus], distributed.all_gather_objects(parts))
            if best:
                result[f"{job} breakdown"] = best
            for mode in ("one", "two"):
                result[f"{job} {mode} walls"] = times[mode][0]  # every timed pair, in order
                result[f"{job} {mode} wall"] = min(times[mode][0])
                result[f"{job} {mode} cpu"] = min(times[mode][1])
            result[f"{job} pair wall ratios"] = [a / b for a, b in zip(times["one"][0], times["two"][0])]
            result[f"{job} pair cpu ratios"] = [a / b for a, b in zip(times["one"][1], times["two"][1])]
        if distributed.is_writer():
            with open(args.out, "w", encoding="utf-8") as fh:
                json.dump(result, fh)
    finally:
        distributed.shutdown()  # not destroy_process_group alone: see its docstring


def ranks_rows(workdir: str, P: int, N: int, n_test: int, repeat: int = 5, breakdown: bool = False,
               jobs: Optional[List[str]] = None) -> Dict[str, Any]:
    """Record the job's run, then one 2-rank launch measuring it both ways (see :func:`rank_worker`)."""
    import socket

    s = Setting(P, N, 256, 16, n_test)
    path = os.path.join(workdir, "ranks", "traj")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _, _, X, Y, x, y = record(s, path)
    torch.save((X, Y, x, y), os.path.join(workdir, "ranks", "data.pt"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = os.path.join(workdir, "ranks.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    load0 = foreign_load(1.0)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--rank-worker",
                    "--traj", path, "--out", out, "--rank-P", str(P), "--rank-N", str(N),
                    "--rank-n-test", str(n_test), "--rank-repeat", str(repeat)]
                   + (["--rank-breakdown"] if breakdown else [])
                   + [a for j in jobs or [] for a in ("--rank-job", j)], env=env, check=True)
    result = json.load(open(out, encoding="utf-8"))
    result["load_before"] = load0
    for job in jobs or RANK_JOBS:
        print(f"  {job}: one process {result[f'{job} one wall']:.2f} s wall / {result[f'{job} one cpu']:.2f} s CPU, "
              f"2 ranks {result[f'{job} two wall']:.2f} / {result[f'{job} two cpu']:.2f}", flush=True)
    return result


# ----------------------------------------------------------------------------- report
def plot(rows: List[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sweeps_ = [s for s in JOBS_OF if any(r.sweep == s for r in rows)]
    fig, axes = plt.subplots(2, len(sweeps_), figsize=(3.6 * len(sweeps_), 6.4), squeeze=False)
    for c, sweep in enumerate(sweeps_):
        for sw, job, note in _series(rows):
            if sw != sweep:
                continue
            rs = [r for r in rows if (r.sweep, r.job, r.note) == (sw, job, note)]
            xs = [getattr(r, sweep) for r in rs]
            label = job + (f" ({note})" if note else "")
            axes[0][c].loglog(xs, [r.seconds for r in rs], "o-", label=label)
            axes[1][c].loglog(xs, [max(mem_of(r) or 1, 1) / 2**20 for r in rs], "o-", label=label)
        axes[0][c].legend(fontsize=6)
        axes[0][c].set_title(f"vs {sweep}")
        axes[1][c].set_xlabel(sweep)
        axes[0][c].set_ylabel("time (s)") if c == 0 else None
        gpu = any(r.gpu_peak is not None for r in rows)
        axes[1][c].set_ylabel(f"peak {'GPU memory' if gpu else 'RSS increase'} (MiB)") if c == 0 else None
        values = sorted({getattr(r, sweep) for r in rows if r.sweep == sweep})
        for ax in (axes[0][c], axes[1][c]):
            ax.grid(True, which="both", alpha=0.3)
            # the swept values as the x ticks (log minor-tick labels of a short sweep overlap)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(values, [f"{v:,}" if v < 10**5 else f"{v:.0e}" for v in values], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(rows: List[Row], big: Optional[Row], ranks: Dict[str, Any], args: argparse.Namespace,
                 path: str, load_note: str) -> None:
    lines = ["# Scaling benchmark", "", f"Command: `python benchmarks/scaling.py {' '.join(sys.argv[1:])}`".rstrip(),
             "", "## Environment", ""] + [f"- {e}" for e in environment()] + [f"- {load_note}", ""]
    gpu = any(r.gpu_peak is not None for r in rows + ([big] if big else []))
    lines += ["## Time and peak memory", "",
              "Tanh MLP 32 → h → h → 10, SGD (momentum 0.9), float64, GL-4 with error control (the 'exact' preset; "
              "explicit options on every row). Base setting: "
              + ", ".join(f"{k}={v}" for k, v in BASE.items()) + " (the P sweep: N=4, n_test=2). Peak = peak RSS "
              "increase during the call. Last column: CPU other processes used meanwhile (this machine is shared; "
              "above ~10% the time is inflated)."
              + (" Peak GPU mem = `torch.cuda.max_memory_allocated()` during the call less what was allocated "
                 "before it (the model and data); the clock stops after `torch.cuda.synchronize()`; growth "
                 "exponents and the plot use it." if gpu else ""), "",
              "| sweep | job | options | P | N | n_train | batch | n_test | time (s) | peak mem | "
              + ("peak GPU mem | " if gpu else "") + "max\\|delta\\| | others' CPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        opts = ", ".join(v for v in (r.note or "defaults", r.info) if v)
        lines.append(f"| {r.sweep} | {r.job} | {opts} | {r.P:,} | {r.N} | {r.n_train} | {r.batch} | "
                     f"{r.n_test} | "
                     f"{r.seconds:.2f} | {fmt_mem(r.peak)} | " + (f"{fmt_mem(r.gpu_peak)} | " if gpu else "")
                     + f"{r.delta:.1e} | {'n/a' if r.foreign is None else f'{100 * r.foreign:.0f}%'} |")
    lines += ["", "### Fitted growth exponents (slope of log y against log x)", "",
              "| sweep | job | time exponent | memory exponent |", "|---|---|---|---|"]
    for e in exponents(rows):
        def f(v: Optional[float]) -> str:
            return "–" if v is None else f"{v:.2f}"

        lines.append(f"| {e['sweep']} | {e['job']} | {f(e['time'])} | {f(e['memory'])} |")
    lines += ["", f"![scaling]({Path(path).with_suffix('.png').name})", ""]
    if big is not None:
        lines += ["## ≥ 10M parameters: the data view under `max_memory=\"4GiB\"`", "",
                  f"P = {big.P:,}, N = {big.N}, n_train = {big.n_train}, batch = {big.batch}, n_test = {big.n_test}: "
                  f"{big.seconds:.1f} s, peak RSS increase {fmt_mem(big.peak)}"
                  + (f", peak GPU memory {fmt_mem(big.gpu_peak)}" if big.gpu_peak is not None else "")
                  + f" (budget 4096 MiB), max|delta| "
                  f"{big.delta:.1e}; {big.info}. Options: {big.note}.", ""]
    if ranks and any(f"{job} one wall" in ranks for job in RANK_JOBS):
        lines += ["## 1 vs 2 ranks (torchrun, gloo, one thread per rank, same job)", "",
                  f"P = {args.rank_P:,}, N = {args.rank_N}, n_test = {args.rank_n_test}, n_train = 256, batch 16. "
                  "One 2-rank launch alternates the job run by one process (rank 0 alone, `distributed=False`) and "
                  f"split over both ranks, {getattr(args, 'rank_repeat', 5)} times each after a first pair (the "
                  "warm-up: imports, and the heap grown to the job's size; its speed-up in the last column); best "
                  "wall time between barriers (start-up excluded) and best main-thread CPU seconds of the busiest "
                  "rank (the work split); the median of the per-pair ratios beside them.", "",
                  "| job | 1 process wall (s) | 2 ranks wall (s) | wall speed-up (best / median pair) "
                  "| 1 process CPU (s) | busiest rank CPU (s) | CPU speed-up (best / median pair) | first pair |",
                  "|---|---|---|---|---|---|---|---|"]
        for job in (j for j in RANK_JOBS if f"{j} one wall" in ranks):
            r = ranks
            w1, w2, c1, c2 = (r[f"{job} one wall"], r[f"{job} two wall"], r[f"{job} one cpu"], r[f"{job} two cpu"])
            mw, mc = statistics.median(r[f"{job} pair wall ratios"]), statistics.median(r[f"{job} pair cpu ratios"])
            first = (f"{r[f'{job} one first wall'] / r[f'{job} two first wall']:.2f}×"
                     if f"{job} two first wall" in r else "–")  # (an older run's rows: no first pair)
            lines.append(f"| {job} | {w1:.2f} | {w2:.2f} | {w1 / w2:.2f}× / {mw:.2f}× | {c1:.2f} | {c2:.2f} "
                         f"| {c1 / c2:.2f}× / {mc:.2f}× | {first} |")
        lines += ["", f"Others' CPU load right before the launch: {ranks['load_before']:.0%} of the machine.", ""]
        lines += breakdown_lines(ranks)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def breakdown_lines(ranks: Dict[str, Any]) -> List[str]:
    """``--rank-breakdown``: per job, inclusive main-thread CPU seconds (calls) of the engine's parts
    in the best run of one process and of each of the 2 ranks."""
    lines: List[str] = []
    for job in RANK_JOBS:
        b = ranks.get(f"{job} breakdown")
        if not b or "one" not in b or "two" not in b:
            continue
        one, two = b["one"][2][0], b["two"][2]
        lines += [f"Breakdown, {job} (inclusive CPU s (calls); best run: 1 process {b['one'][1][0]:.3f} s, "
                  f"ranks {' / '.join(f'{c:.3f}' for c in b['two'][1])} s):", "",
                  "| part | 1 process | rank 0 | rank 1 |", "|---|---|---|---|"]
        for key in sorted(set(one) | set(two[0]) | set(two[1])):
            cells = [d.get(key) for d in (one, two[0], two[1])]
            lines.append(f"| {key} | " + " | ".join("–" if c is None else f"{c[0]:.3f} ({c[1]})" for c in cells) + " |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["sweeps", "big", "ranks"], action="append")
    ap.add_argument("--out", default=None,
                    help="report path (default benchmarks/results/scaling.md; scaling_cuda.md with --device cuda)")
    ap.add_argument("--sweep", action="append", help="run only these sweeps (P, N, n_train, batch, n_test)")
    ap.add_argument("--merge", help="rows (and the big row) from an earlier run's JSON, e.g. to re-time the ranks")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--traj", help=argparse.SUPPRESS)
    ap.add_argument("--rank-P", type=int, default=100_000, help="P of the 1 vs 2 ranks job")
    ap.add_argument("--rank-N", type=int, default=16, help="steps of the 1 vs 2 ranks job")
    ap.add_argument("--rank-n-test", type=int, default=8, help="test inputs of the 1 vs 2 ranks job")
    ap.add_argument("--rank-repeat", type=int, default=5, help="interleaved timed pairs per job (1 process, 2 ranks)")
    ap.add_argument("--rank-job", dest="rank_jobs", action="append", choices=RANK_JOBS,
                    help="1 vs 2 ranks: time only these jobs (default: all three)")
    ap.add_argument("--rank-breakdown", action="store_true",
                    help="1 vs 2 ranks: also time the engine's parts on each rank (inclusive CPU seconds, best run)")
    args = ap.parse_args()
    if args.rank_worker:
        rank_worker(args)
        return
    if args.out is None:
        kind = torch.device(args.device).type
        name = "scaling.md" if kind == "cpu" else f"scaling_{kind}.md"
        args.out = str(ROOT / "benchmarks" / "results" / name)
    torch.set_num_threads(1)
    parts = set(args.only or ["sweeps", "big", "ranks"])
    load = foreign_load(2.0)
    load_note = f"others' CPU load at start: {'n/a' if load is None else f'{100 * load:.0f}%'} of the machine"
    print(load_note, flush=True)
    rows: List[Row] = []
    big = None
    ranks: Dict[str, Any] = {}
    if args.merge:
        with open(args.merge, encoding="utf-8") as fh:
            old = json.load(fh)
        rows = [Row(**r) for r in old["rows"]]
        big = Row(**old["big"]) if old.get("big") else None
        ranks = old.get("ranks") or {}
        ranks = ranks if isinstance(ranks, dict) else {}  # an older file's two-launch rows
        load_note += f"; sweep rows and the big row from an earlier run ({args.merge})"
    with tempfile.TemporaryDirectory() as tmp:
        if "sweeps" in parts:
            todo = [t for t in sweeps(args.quick) if not args.sweep or t[0] in args.sweep]
            rows = [r for r in rows if not any(r.sweep == t[0] for t in todo)]  # re-run ones replace merged
            for sweep, s, extra, note in todo:
                # the ≥ 10M data view is the "big" row below (under a memory budget)
                jobs = [j for j in JOBS_OF[sweep] if not (s.P >= 10_000_000 and j == "data view")]
                try:
                    rows += measure_rows(sweep, jobs, s, args.device, tmp, note, **extra)
                except MemoryError as err:  # a budget below the plan's need: say so, keep the other rows
                    print(f"  {sweep} {s} {note}: {err}", flush=True)
                _save_json(args.out, rows, None, {})
        if "big" in parts:
            s = Setting(10_000_000, 3, 64, 16, 2)
            big = measure_rows("big", ["data view"], s, args.device, tmp, max_memory="4GiB", max_evaluations=16,
                               note="max_memory='4GiB', max_evaluations=16, train_jvp left automatic")[0]
        if "ranks" in parts:
            ranks = ranks_rows(tmp, args.rank_P, args.rank_N, args.rank_n_test, args.rank_repeat,
                               args.rank_breakdown, args.rank_jobs)
    if rows:
        plot(rows, str(Path(args.out).with_suffix(".png")))
    write_report(rows, big, ranks, args, args.out, load_note)
    _save_json(args.out, rows, big, ranks)
    print(f"wrote {args.out}", flush=True)


def _save_json(out: str, rows: List[Row], big: Optional[Row], ranks: Dict[str, Any]) -> None:
    with open(Path(out).with_suffix(".json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": [asdict(r) for r in rows], "big": None if big is None else asdict(big), "ranks": ranks},
                  fh, indent=1)


if __name__ == "__main__":
    main()
