"""Benchmark: what the recording's integrity checks cost on the benchmark run.

Records the modular-addition run of :mod:`benchmarks.modadd` (200 full-batch AdamW steps, the
run ``benchmarks/reconstruct.py`` analyses), then times, over every tensor the recording holds:
the CRC-32 checksums the writer computes (format version 2), and reading every tensor back with
and without verification. Prints the checksum time as a share of the training loop's wall time.

Usage::

    python benchmarks/recording_checksums.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.modadd import train  # noqa: E402
from captum_explaind import Trajectory  # noqa: E402
from captum_explaind.recording import format as fmt  # noqa: E402


def _read_all(traj: Trajectory, verify: bool) -> float:
    t0 = time.perf_counter()
    for s in range(traj.num_steps + 1):
        with traj._open(s) as fh:
            for key in list(fh.keys()):
                fh.get(key, verify=verify)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run = train(os.path.join(d, "run"), steps=args.steps)
        traj = Trajectory.open(os.path.join(d, "run"))
        tensors = []
        for s in range(traj.num_steps + 1):
            with traj._open(s) as fh:
                tensors += [fh.get(k) for k in fh.keys()]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        crc = min(_timed(lambda: [fmt.tensor_checksum(t) for t in tensors]) for _ in range(3))
        plain = min(_read_all(traj, verify=False) for _ in range(3))
        verified = min(_read_all(traj, verify=True) for _ in range(3))
        per_step = traj.bytes_per_step
    print(f"| run | {traj.num_steps} steps, {len(tensors)} tensors, {nbytes / 1e6:.1f} MB, "
          f"{per_step / 1e6:.2f} MB/step |")
    print(f"| training loop incl. recording | {run.train_seconds:.2f} s |")
    print(f"| checksums (write side) | {crc:.3f} s = {100 * crc / run.train_seconds:.2f} % of the loop "
          f"({nbytes / 1e6 / crc:.0f} MB/s) |")
    print(f"| read every tensor | {plain:.3f} s unverified, {verified:.3f} s verified (x{verified / plain:.2f}) |")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
