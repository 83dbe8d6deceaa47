"""Profile: where a recorded ``Trainer`` step spends its time, by thread (the benchmark job of
:mod:`benchmarks.huggingface`: BERT classifier, 2.2M parameters, AdamW, clipping, accumulation).

Wraps the recorder's and the callback's pieces with per-thread CPU clocks (``time.thread_time``)
and wall clocks, runs the plain and the recorded ``trainer.train()`` alternately, and prints
milliseconds per optimizer step for each piece, split into the training thread and the
background writer thread. CPU time, unlike wall time, is barely moved by other jobs on a shared
machine, so this is the measurement to develop against; the wall-time ratio comes from
``benchmarks/huggingface.py`` on a quiet machine.

Usage::

    python benchmarks/recording_profile.py [--steps 20] [--reps 2] [--store-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import huggingface as hb  # noqa: E402

_TIMES: Dict[str, List[float]] = {}

# (module path, attribute, label); pieces that do not exist in a version are skipped
_PIECES = [
    ("captum_explaind.recording.recorder", "TrajectoryRecorder._pre_step", "recorder pre-step hook (total)"),
    ("captum_explaind.recording.recorder", "TrajectoryRecorder._post_step", "recorder post-step hook (total)"),
    ("captum_explaind.recording.recorder", "TrajectoryRecorder._collect_step", "  collect the step's tensors"),
    ("captum_explaind.recording.writer", "Snapshot.copy", "  copy into the snapshot buffers"),
    ("captum_explaind.recording.recorder", "_norms64", "gradient float64 norms"),
    ("captum_explaind.recording.recorder", "_first_nonfinite", "finite check"),
    ("captum_explaind.recording.format", "write_safetensors", "write_safetensors (total)"),
    ("captum_explaind.recording.format", "_checksum", "  CRC-32 checksums"),
    ("captum_explaind.recording.format", "tensor_checksum", "  CRC-32 checksums"),  # versions without _checksum
    ("captum_explaind.recording.format", "atomic_write_bytes", "  write + fsync + rename"),
    ("os", "fsync", "    fsync"),
    ("captum_explaind.adapters.huggingface.callback", "TrajectoryCallback._before_forward", "callback forward hooks"),
    ("captum_explaind.adapters.huggingface.callback", "TrajectoryCallback._after_forward", "callback forward hooks"),
    ("captum_explaind.adapters.huggingface.callback", "TrajectoryCallback.on_pre_optimizer_step",
     "callback on_pre_optimizer_step"),
    ("captum_explaind.adapters.huggingface.callback", "TrajectoryCallback.on_train_begin",
     "callback on_train_begin (θ_0)"),
    ("captum_explaind.adapters.huggingface.callback", "TrajectoryCallback.on_train_end",
     "callback on_train_end (flush, close)"),
]


def _wrap(owner: Any, attr: str, label: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            where = "training" if threading.current_thread() is threading.main_thread() else "writer"
            acc = _TIMES.setdefault(f"{where}|{label}", [0.0, 0.0])
            acc[0] += time.perf_counter() - t0
            acc[1] += time.thread_time() - c0

    setattr(owner, attr, timed)


def _install() -> None:
    import importlib

    done = set()
    for module, path, label in _PIECES:
        owner: Any = importlib.import_module(module)
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is not None and hasattr(owner, attr) and (label not in done or label.startswith("callback")):
            _wrap(owner, attr, label)
            done.add(label)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--store-dtype", default=None, choices=[None, "bfloat16", "float16"])
    args = p.parse_args()
    cfg = argparse.Namespace(steps=args.steps, batch=16, accum=2, hidden=192, layers=4, vocab=2000)
    tok = hb.make_tokenizer(cfg.vocab)
    ds, collator = hb.make_dataset(cfg, tok, "bert")
    _install()
    kind = "ours" if args.store_dtype is None else "ours-bf16"
    plain_cpu, rec_cpu = [], []
    with tempfile.TemporaryDirectory() as d:
        hb.run_training(cfg, ds, collator, "plain", Path(d))  # warm-up
        for rep in range(args.reps):
            for k in (["plain", kind] if rep % 2 == 0 else [kind, "plain"]):
                if k != "plain":
                    _TIMES.clear()
                row = hb.run_training(cfg, ds, collator, k, Path(d))
                (plain_cpu if k == "plain" else rec_cpu).append(row["cpu"])
                if k != "plain":
                    snapshot = {key: list(v) for key, v in _TIMES.items()}
    n = args.steps
    print(f"# {torch.__version__}, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}, "
          f"{args.steps} steps, storage {args.store_dtype or 'float32'}")
    print(f"training-thread CPU of trainer.train(): plain {min(plain_cpu) / n * 1e3:.1f} ms/step, "
          f"recorded {min(rec_cpu) / n * 1e3:.1f} ms/step (fastest of {args.reps})")
    print("| thread | piece | CPU ms/step | wall ms/step |")
    print("|---|---|---|---|")
    for key in sorted(snapshot, key=lambda k: (k.split("|")[0], [x[2] for x in _PIECES].index(k.split("|")[1]))):
        where, label = key.split("|")
        wall, cpu = snapshot[key]
        print(f"| {where} | {label} | {cpu / n * 1e3:.1f} | {wall / n * 1e3:.1f} |")


if __name__ == "__main__":
    main()
