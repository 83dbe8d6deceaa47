"""Benchmark: the paper's whole Grokking study (Sec. 5), trained, recorded and analysed.

The paper's configuration by default (:meth:`captum_explaind.grokking.GrokConfig.paper`: p = 113,
4,000 training / 2,000 test pairs of a > b, the App. C.2 Transformer, full-batch AdamW lr 1e-3,
weight decay 4.0, betas (0.9, 0.98), until 100 % test accuracy), then every figure's analysis
(:func:`captum_explaind.grokking.study.run_study`): Fig. 3a left and right, Fig. 4 (test and
training predictions), Fig. 5, Table 2, Fig. 3b and Fig. 7. Each part is timed as a multiple of
the training time, each decomposition's delta printed, the paper's findings stated next to the
numbers, and a markdown report written (``--results``).

The paper's authors report about 20 H200-hours per full analysis.

Usage::

    python benchmarks/grokking.py                               # the paper's configuration, CPU
    python benchmarks/grokking.py --device cuda                 # on a GPU
    python benchmarks/grokking.py --config small --preset exact # the demo's configuration, exact
    python benchmarks/grokking.py --p 59 --n-train 1300 --n-test 411 --max-steps 3000   # reduced
    python benchmarks/grokking.py --trajectory runs/grok113 --train-seconds 946   # analyse a recording
    python benchmarks/grokking.py --trajectory runs/grok113 --train-seconds 946 --profile 2  # cost per part
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captum_explaind.grokking import GrokConfig, GrokRun, load_run  # noqa: E402
from captum_explaind.grokking.analysis import find_stages  # noqa: E402
from captum_explaind.grokking.findings import format_findings  # noqa: E402
from captum_explaind.grokking.study import PARTS, Study, StudySettings, run_study  # noqa: E402

CONFIGS = {"paper": GrokConfig.paper, "small": GrokConfig.small, "tiny": GrokConfig.tiny}


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="paper", help="base configuration. Default: paper")
    p.add_argument("--p", type=int, default=None, help="override the modulus")
    p.add_argument("--n-train", type=int, default=None, help="override the number of training pairs")
    p.add_argument("--n-test", type=int, default=None, help="override the number of test pairs")
    p.add_argument("--max-steps", type=int, default=None, help="override the step budget")
    p.add_argument("--betas", type=float, nargs=2, default=None, help="override AdamW's betas, e.g. 0.98 0.99")
    p.add_argument("--preset", default="exact", choices=["fast", "balanced", "exact"],
                   help="how the decompositions are integrated. Default: exact")
    p.add_argument("--inputs", type=int, default=64, help="test predictions in Fig. 3a and Fig. 4. Default: 64")
    p.add_argument("--d-inputs", type=int, default=16, help="of those, predictions in D_s (Fig. 3a right)")
    p.add_argument("--similarity-inputs", type=int, default=226, help="test predictions in Fig. 5 / Table 2")
    p.add_argument("--window", type=int, default=50, help="steps per window of Fig. 3a. Default: 50")
    p.add_argument("--stage-width", type=int, default=50, help="steps per stage of Fig. 4 / 5. Default: 50")
    p.add_argument("--no-retrain", action="store_true", help="skip the retraining experiment (Fig. 7)")
    p.add_argument("--similarity-horizon", type=int, default=None, metavar="K",
                   help="start Fig. 5's sweeps K steps before their stages (the dropped momentum is bounded and "
                        "printed: β1^K, 0.9^409 ≈ 2e-19); default: from step 1")
    p.add_argument("--stages", nargs="*", default=None, metavar="NAME",
                   help="only these of Fig. 4 / 5's stages (start, memorization, transition, grokked)")
    p.add_argument("--skip", nargs="*", default=[], choices=list(PARTS), metavar="PART",
                   help=f"parts not to run, by name: {', '.join(repr(x) for x in PARTS)}")
    p.add_argument("--device", default="cpu", help="torch device (cuda for a GPU). Default: cpu")
    p.add_argument("--out", default=None, help="folder for the trajectory and figures (default: a temporary one)")
    p.add_argument("--results", default=None, help="write the markdown report here")
    p.add_argument("--trajectory", default=None,
                   help="analyse this existing recording of --config (made by captum_explaind.grokking.train) "
                        "instead of training; the accuracy curves are recomputed from its θ_s")
    p.add_argument("--train-seconds", type=float, default=float("nan"),
                   help="with --trajectory: the training time measured when it was recorded (reported as such)")
    p.add_argument("--profile", type=int, default=None, metavar="K",
                   help="time each view on K steps and extrapolate to the whole run, instead of running it")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> GrokConfig:
    over = {k: v for k, v in {"p": args.p, "n_train": args.n_train, "n_test": args.n_test,
                              "max_steps": args.max_steps}.items() if v is not None}
    if args.betas is not None:
        over["betas"] = tuple(args.betas)
    return CONFIGS[args.config](**over)


def environment(device: str) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "-"
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"threads {torch.get_num_threads()}, device {device} ({gpu}), load average at the end "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


def report(study: Study, args: argparse.Namespace, wall: float) -> str:
    run, cfg = study.run, study.run.config
    train_s = study.seconds["training"]
    lines = [
        "# Grokking study benchmark (`benchmarks/grokking.py`)", "",
        f"Command: `python benchmarks/grokking.py {' '.join(sys.argv[1:])}`", "",
        f"Configuration: p = {cfg.p}, {run.data.n_train} training / {run.data.n_test} test pairs (a > b), "
        f"d = {cfg.d_model}, {cfg.n_heads} heads, MLP {cfg.d_mlp}, full-batch AdamW lr {cfg.lr}, weight decay "
        f"{cfg.weight_decay}, betas {cfg.betas}; stop at test accuracy {cfg.target_test_acc:.0%} or "
        f"{cfg.max_steps} steps. Options preset: `{args.preset}`.", "",
        (f"Training: not run here; the recording `{args.trajectory}` was analysed, and the training time below "
         f"is the {train_s:.0f} s measured when it was recorded." if args.trajectory else "Training: run here."), "",
        f"Run: {run.steps} steps; train 100 % at step {run.history.first_step('train_acc', 1.0)}, test 100 % at "
        f"step {run.history.first_step('test_acc', 1.0)} (final test accuracy {run.history.test_acc[-1]:.1%}).", "",
        f"Environment: {environment(args.device)}.", "",
        "| part | what | time (s) | CPU time (s) | × training |", "|---|---|---|---|---|",
    ]
    what = {
        "training": f"{run.steps} full-batch steps, recorded",
        "Fig. 3a": f"left and right in one sweep (+ D_s's): {study.settings.n_inputs} test predictions, windows "
                   f"of {study.settings.window}; D_s on {study.settings.d_inputs}",
        "Fig. 3a left": f"Ψ vs Ψ^reg, {study.settings.n_inputs} test predictions, windows of {study.settings.window}",
        "Fig. 3a right": f"6 layers' Ψ_s, D_s on {study.settings.d_inputs} predictions",
        "Fig. 4": f"decoder-layer sample influence, {study.settings.n_influence} test and "
                  f"{study.settings.n_influence} training predictions, {len(study.stages)} stages (one sweep for all)",
        "Fig. 5": f"decoder-layer similarity of {study.settings.n_similarity} test predictions, "
                  f"{len(study.stages)} stage(s)",
        "Table 2": "Lasso on the grokked stage's similarity",
        "Fig. 3b swap": "6 layers × 20 checkpoints",
        "Fig. 7 retrain": "from scratch, + grokked attention, + grokked attention and linear 1",
    }
    analysis = 0.0
    for name, sec in study.seconds.items():
        if name != "training":
            analysis += sec
        cpu = study.cpu_seconds.get(name, float("nan"))
        lines.append(f"| {name} | {what.get(name, '')} | {sec:.1f} | {cpu:.1f} | {sec / train_s:.1f}× |")
    lines += [f"| **all analyses** | | **{analysis:.1f}** | | **{analysis / train_s:.1f}×** |",
              f"| wall time of the whole benchmark | | {wall:.1f} | | |", "",
              "Deltas (largest |change − Σ parts| of each decomposition):", ""]
    rel = study.relative_deltas()
    lines += [f"* {name}: {v:.2e}" + (f" ({rel[name]:.1%} of the largest change it decomposes)" if name in rel else "")
              for name, v in study.deltas().items()]
    lines += ["", "Findings:", "", format_findings(study.findings()), ""]
    if study.lasso is not None:
        lines += ["Table 2 (largest Lasso coefficients of the grokked stage's similarity):", "",
                  study.lasso.table(10), ""]
    return "\n".join(lines)


def profile(run: GrokRun, settings: StudySettings, args: argparse.Namespace) -> str:
    from grokking_profile import format_profile, profile_parts

    stages = find_stages(run, settings.stage_width)
    rows = profile_parts(run, stages, settings, k=args.profile)
    cfg, h = run.config, run.history
    text = "\n".join([
        "# Grokking study benchmark: cost per part, measured on a few steps and extrapolated", "",
        f"Command: `python benchmarks/grokking.py {' '.join(sys.argv[1:])}`", "",
        f"Run: p = {cfg.p}, {run.data.n_train} / {run.data.n_test} pairs, {run.steps} steps (train 100 % at step "
        f"{h.first_step('train_acc', 1.0)}, test 100 % at step {h.first_step('test_acc', 1.0)}); training "
        f"{run.train_seconds:.0f} s as measured when it was recorded. Preset `{args.preset}`; stages: "
        + "; ".join(str(s) for s in stages) + ".", "",
        f"Environment: {environment(args.device)}.", "",
        format_profile(rows, run.train_seconds), ""])
    print(text)
    if args.results:
        Path(args.results).write_text(text)
    return text


def main(argv: Optional[List[str]] = None) -> Optional[Study]:
    args = parse(argv)
    torch.manual_seed(0)
    config = config_from(args)
    out = Path(args.out) if args.out else Path(__import__("tempfile").mkdtemp(prefix="grokking_bench_"))
    settings = StudySettings(window=args.window, stage_width=args.stage_width, n_inputs=args.inputs,
                             d_inputs=args.d_inputs, n_influence=args.inputs, n_similarity=args.similarity_inputs,
                             options=args.preset, retrain=not args.no_retrain, skip=tuple(args.skip),
                             similarity_horizon=args.similarity_horizon, stages=args.stages)
    start = time.perf_counter()
    run = None
    if args.trajectory is not None:
        out.mkdir(parents=True, exist_ok=True)
        run = load_run(args.trajectory, config, train_seconds=args.train_seconds,
                       history_file=out / "history.json", show_progress=True)
        if args.profile is not None:
            profile(run, settings, args)
            return None
    study = run_study(out / "trajectory", config, settings, device=args.device, run=run)
    study.save_figures(out / "figures")
    text = report(study, args, time.perf_counter() - start)
    print(text)
    if args.results:
        Path(args.results).write_text(text)
    return study


if __name__ == "__main__":
    main()
