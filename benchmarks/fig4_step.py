"""Benchmark: one visited step of Fig. 4 (the Grokking study's training-sample influence), per-sample
gradients of all parameters ("before": ``layers={"decoder": ..., "rest": all others}``) against
those of the decoder only with the others' share from the replayed batch gradient ("after":
``layers={"decoder": ...}``, ``DataDecomposition.other``), on the same recording and predictions.

Prints CPU and wall time of each, their ratio, and that both give the same numbers (decoder scores,
the rest's share summed over the training samples, residual).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/fig4_step.py --trajectory /tmp/grokfull/traj \
        --history /tmp/g11/history.json --presets fast balanced --inputs 128 --step 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from captum_explaind.attr import TrainingDataInfluence  # noqa: E402
from captum_explaind.grokking import LAYERS, GrokConfig, load_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trajectory", required=True, help="a recording of the paper's configuration")
    p.add_argument("--history", default=None, help="the cached curves (load_run's history_file)")
    p.add_argument("--presets", nargs="+", default=["fast"], choices=["fast", "balanced", "exact"])
    p.add_argument("--inputs", type=int, default=128, help="predictions: half test, half training pairs")
    p.add_argument("--step", type=int, default=1, help="the one step explained (visited and integrated)")
    p.add_argument("--skip-before", action="store_true", help="time only the restricted path")
    args = p.parse_args()
    print(f"load {os.getloadavg()[0]:.1f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    run = load_run(args.trajectory, GrokConfig.paper(), history_file=args.history)
    d, n = run.data, args.inputs
    x = torch.cat([d.test_x[: n - n // 2], d.train_x[: n // 2]])
    y = torch.cat([d.test_y[: n - n // 2], d.train_y[: n // 2]])
    rest = [s for name, sels in LAYERS.items() if name != "decoder" for s in sels]
    steps = range(args.step, args.step + 1)
    for preset in args.presets:
        tdi = TrainingDataInfluence(run.model, run.recorded, d.train_set, loss_fn=nn.NLLLoss(reduction="none"),
                                    options=preset)
        layouts = {"after": {"decoder": LAYERS["decoder"]}}
        if not args.skip_before:
            layouts["before"] = {"decoder": LAYERS["decoder"], "rest": rest}
        res, cost = {}, {}
        for name, layers in layouts.items():
            t, c = time.perf_counter(), time.process_time()
            res[name] = tdi.explain(x, target=y, layers=layers, steps=steps)
            cost[name] = (time.process_time() - c, time.perf_counter() - t)
            print(f"{preset} {name}: {n} inputs, step {args.step}: {cost[name][0]:.1f} s CPU, "
                  f"{cost[name][1]:.1f} s wall (load {os.getloadavg()[0]:.1f}), "
                  f"max |delta| {float(res[name].delta.abs().max()):.1e}", flush=True)
        if "before" in res:
            a, b = res["after"], res["before"]
            scale = float(b.scores.abs().max())
            dec = float((a.scores[..., 0] - b.scores[..., 0]).abs().max()) / scale
            rest_b = b.scores[..., 1].sum(1)
            oth = float((a.other - rest_b).abs().max()) / max(float(rest_b.abs().max()), 1e-300)
            print(f"{preset}: before/after {cost['before'][0] / cost['after'][0]:.1f}x CPU; decoder scores differ by "
                  f"{dec:.1e}, the rest's share by {oth:.1e} (relative), residual "
                  f"{float((a.residual - b.residual).abs().max()):.1e}", flush=True)


if __name__ == "__main__":
    main()
