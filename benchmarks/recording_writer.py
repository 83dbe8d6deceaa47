"""Benchmark: training wall time with no recorder, a synchronous recorder and the background writer.

A 4.2M-parameter MLP trained with AdamW on random data (batch 64), recorded with every
``store_dtype``/``background`` combination; one run each, in one process, after a warm-up.
The background writer overlaps serialization and fsync with the next steps' compute.

Usage::

    python benchmarks/recording_writer.py [--steps 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from captum_explaind import Trajectory, TrajectoryRecorder  # noqa: E402


def _run(steps: int, path, **rec_kwargs) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    X, Y = torch.randn(64, 1024), torch.randint(0, 10, (64,))
    rec = None if path is None else TrajectoryRecorder(model, opt, path, **rec_kwargs)
    t0 = time.perf_counter()
    for s in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        if rec is not None:
            rec.log_batch(torch.arange(64))
        opt.step()
    if rec is not None:
        rec.close()  # waits for pending writes: included in the time
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    _run(3, None)
    base = _run(args.steps, None)
    print(f"| recording | wall time ({args.steps} steps) | × no recorder | MB/step |")
    print("|---|---|---|---|")
    print(f"| none | {base:.2f} s | 1.00 | — |")
    for store in (None, torch.bfloat16):
        for background in (False, True):
            with tempfile.TemporaryDirectory() as d:
                t = _run(args.steps, Path(d) / "run", store_dtype=store, background=background)
                size = Trajectory.open(Path(d) / "run").bytes_per_step / 1e6
            label = f"{'float32' if store is None else 'bfloat16'}, {'background' if background else 'synchronous'}"
            print(f"| {label} | {t:.2f} s | {t / base:.2f} | {size:.1f} |")


if __name__ == "__main__":
    main()
