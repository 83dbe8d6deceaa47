"""Benchmark: the model and training views on the paper's modular-addition Transformer.

One recorded run (:mod:`benchmarks.modadd`: p=23, 200 full-batch AdamW steps, 77,504 parameters)
and a test batch of 50 held-out pairs, target = each pair's true label.

1. **Per-layer StepInfluence over the whole run** — every step its own window, parameters grouped
   into embedding / attention / MLP / unembedding — timed as a multiple of the run's own training
   time (the issue's target: ≤ 3×), with the convergence delta it reaches.
2. **Per-parameter ParameterInfluence vs the authors' parameter-wise kernel** — explaind 0.1.0's
   ``ExactPathKernelModel.predict(keep_param_wise_kernel=True, param_wise_kernel_keep_out_dims=True)``
   (per parameter, output and test input, summed over steps) on the same weights: time, peak
   memory, and agreement of the kernel part per parameter element (correlation, relative L2
   difference, overlap of the 1 % most important elements).

Usage::

    python benchmarks/views.py             # full run
    python benchmarks/views.py --quick     # smoke run
    python benchmarks/views.py --skip-peer
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captum_explaind import ParameterInfluence, StepInfluence  # noqa: E402
from captum_explaind.epk import EPKOptions  # noqa: E402

from benchmarks.modadd import ModAddConfig, make_data, train  # noqa: E402
from benchmarks.peers.explaind_peer import ExplaindPeer, measure, wait_for_quiet  # noqa: E402
from benchmarks.reconstruct import environment, fmt_mem  # noqa: E402

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated.*")

LAYERS = {
    "embedding": "input_emb",
    "attention": "head*",
    "mlp": ["linear1", "linear2"],
    "unembedding": "decoder",
}


def row_options(dtype: torch.dtype, nodes: int, error_control: bool, rtol: float = 1e-10) -> EPKOptions:
    """Every option of a row spelled out, so no row depends on a library default (presets, the default
    dtype, the work budget may change). ``max_evaluations=None``: unbounded refinement, the semantics
    the recorded results were measured with."""
    return EPKOptions(quadrature="gauss", nodes=nodes, error_control=error_control, rtol=rtol, atol=0.0,
                      max_depth=40, max_evaluations=None, dtype=dtype, device=None, batch_size=None,
                      per_sample="auto", show_progress=False)


def step_influence_rows(run, x, y, settings, quiet_wait: float) -> List[Dict]:
    rows = []
    for name, opts in settings:
        si = StepInfluence(run.model, run.trajectory, options=opts)
        si.attribute(x[:2], target=y[:2], window=1, steps=range(1, 3), layers=LAYERS)  # warm-up
        wait_for_quiet(max_wait=quiet_wait)
        with measure() as use:
            scores, delta = si.attribute(x, target=y, window=1, layers=LAYERS, return_convergence_delta=True)
        change = float(delta.abs().max())
        rows.append({
            "setting": name,
            "seconds": use.seconds,
            "ratio": use.seconds / run.train_seconds,
            "mem": use.peak_rss_bytes,
            "delta": change,
            "foreign": use.foreign_cpu,
            "shape": tuple(next(iter(scores.values())).shape),
        })
        print(f"  {name}: {use.seconds:.1f} s = {use.seconds / run.train_seconds:.1f}× training, max|delta| {change:.2e}")
    return rows


def peer_param_kernel(peer: ExplaindPeer, x: torch.Tensor, points: int) -> Dict:
    """explaind's parameter-wise kernel, summed over steps: name → [n, n_outputs, 1, numel]."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        epk = peer.epk_model(points, keep_param_wise_kernel=True, param_wise_kernel_keep_out_dims=True)
        with measure() as use:
            *_, prev_eval = epk.predict(x, y_test=None, is_train=False, keep_kernel_matrices=False)
    return {"kernel": prev_eval["param_kernel"], "seconds": use.seconds, "mem": use.peak_rss_bytes, "foreign": use.foreign_cpu}


def agreement(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor], y: torch.Tensor) -> Dict[str, float]:
    """Compare per-element kernel scores of the label output, over all parameters and inputs."""
    a, b = [], []
    n = y.shape[0]
    for name, v in ours.items():
        if name not in theirs:
            continue
        t = theirs[name][torch.arange(n), y, 0].double()  # [n, numel]
        a.append(v.reshape(n, -1).double())
        b.append(t.reshape(n, -1))
    a, b = torch.cat(a, 1), torch.cat(b, 1)
    corr = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()
    rel = float((a - b).norm() / a.norm())
    k = max(1, a.shape[1] // 100)
    overlap = []
    for i in range(n):
        top_a = set(torch.topk(a[i].abs(), k).indices.tolist())
        top_b = set(torch.topk(b[i].abs(), k).indices.tolist())
        overlap.append(len(top_a & top_b) / k)
    return {"corr": corr, "rel_l2": rel, "top1pct": sum(overlap) / n}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-points", type=int, default=10, help="explaind midpoints per step (default 10)")
    parser.add_argument("--peer-inputs", type=int, default=10, help="test inputs for the explaind run (default 10)")
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    steps = args.steps or (8 if quick else 200)
    n_test = args.n_test or (8 if quick else 50)
    p = 11 if quick else 23
    config = ModAddConfig(p=p, n_test=n_test)
    lines = ["## environment", *environment(), ""]
    print("\n".join(lines))

    with tempfile.TemporaryDirectory(prefix="views_") as tmp:
        data = make_data(p, n_test, seed=config.data_seed)
        run = train(os.path.join(tmp, "run"), steps=steps, config=config, data=data)
        # time training once more on a fresh directory: the first run pays one-time warm-up
        run = train(os.path.join(tmp, "run2"), steps=steps, config=config, data=data)
        x, y = data.test_x[:n_test], data.test_y[:n_test]
        head = (f"run: p={p}, {data.n_train} training pairs (full batch), {n_test} test inputs, {steps} AdamW steps, "
                f"77,504 parameters; training + recording: {run.train_seconds:.2f} s")
        print(head)

        print("[1] per-layer StepInfluence, window = 1 step, 4 layer groups")
        settings = [
            ("float32, GL-1 (step midpoint), no error control", row_options(torch.float32, 1, False)),
            ("float32, GL-2, no error control", row_options(torch.float32, 2, False)),
            ("float32, GL-4, no error control", row_options(torch.float32, 4, False)),
            ("float32, GL-4, error control rtol 1e-3", row_options(torch.float32, 4, True, rtol=1e-3)),
            ("float64, GL-4, error control rtol 1e-4", row_options(torch.float64, 4, True, rtol=1e-4)),
        ]
        if quick:
            settings = settings[:2] + settings[-1:]
        si_rows = step_influence_rows(run, x, y, settings, args.quiet_wait)

        print("[2] per-parameter ParameterInfluence (kernel part) vs explaind's parameter-wise kernel")
        k = min(args.peer_inputs, n_test)
        pi = ParameterInfluence(run.model, run.trajectory, options=row_options(torch.float64, 4, True, rtol=1e-4))
        wait_for_quiet(max_wait=args.quiet_wait)
        with measure() as use:
            ours = pi.attribute(x, target=y, component="kernel")
        print(f"  ours, all {n_test} inputs: {use.seconds:.1f} s, peak {fmt_mem(use.peak_rss_bytes)}")
        pi_rows = [{"method": "captum_explaind ParameterInfluence (float64, GL-4, rtol 1e-4)", "inputs": n_test,
                    "seconds": use.seconds, "mem": use.peak_rss_bytes, "agree": None}]
        if not args.skip_peer:
            peer = ExplaindPeer(run.trajectory, data, config)
            wait_for_quiet(max_wait=args.quiet_wait)
            res = peer_param_kernel(peer, x[:k], args.peer_points)
            agree = agreement({n: v[:k] for n, v in ours.items()}, res["kernel"], y[:k])
            print(f"  explaind {args.peer_points} points, {k} inputs: {res['seconds']:.1f} s, peak {fmt_mem(res['mem'])}, "
                  f"agreement {agree}")
            pi_rows.append({"method": f"explaind 0.1.0 parameter-wise kernel ({args.peer_points}-point midpoint)",
                            "inputs": k, "seconds": res["seconds"], "mem": res["mem"], "agree": agree})

    out = [head, "", "### Per-layer StepInfluence over the whole run (every step a window, 4 layer groups)", "",
           "| setting | time (s) | × training time | peak mem (RSS increase) | max\\|delta\\| (label output) |",
           "|---|---|---|---|---|"]
    for r in si_rows:
        out.append(f"| {r['setting']} | {r['seconds']:.1f} | {r['ratio']:.1f}× | {fmt_mem(r['mem'])} | {r['delta']:.2e} |")
    out += ["", "### Per-parameter scores: ParameterInfluence vs explaind's parameter-wise kernel", "",
            "| method | test inputs | time (s) | time per input (s) | peak mem (RSS increase) | agreement with ours (corr / rel. L2 / top-1% overlap) |",
            "|---|---|---|---|---|---|"]
    base = pi_rows[0]["seconds"] / pi_rows[0]["inputs"]
    for r in pi_rows:
        ag = "–" if r["agree"] is None else f"{r['agree']['corr']:.4f} / {r['agree']['rel_l2']:.2e} / {100 * r['agree']['top1pct']:.0f}%"
        per = r["seconds"] / r["inputs"]
        ratio = "" if r["agree"] is None else f" ({per / base:.0f}× ours)"
        out.append(f"| {r['method']} | {r['inputs']} | {r['seconds']:.1f} | {per:.2f}{ratio} | {fmt_mem(r['mem'])} | {ag} |")
    text = "\n".join(out)
    print("\n" + text)
    if not quick:
        dest = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "views.md"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("\n".join(lines) + "\n" + text + "\n", encoding="utf-8")
        print(f"\nwritten to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
