"""Search for a small configuration of the paper's Grokking Transformer that groks on a 2-core CPU.

Every candidate is the App. C.2 model family (:class:`captum_explaind.grokking.ModAddTransformer`:
one layer, attention heads with query = key = value, ReLU MLP with residual, no positional
encoding) on the pairs ``a > b`` of ``Z_p``, trained with full-batch AdamW exactly as
:func:`captum_explaind.grokking.train` does (same data split, initialization and update), but
without recording, one thread per run, at most two runs at a time. A run stops at 100 % test
accuracy, at its step cap or at its time cap. For each it prints the first step of 100 %
training accuracy (memorization), of 99 % and 100 % test accuracy (generalization), and the
seconds spent.

Run::

    python benchmarks/grokking_search.py                 # the default grid, 2 processes
    python benchmarks/grokking_search.py --only 3 --seeds 0 1 2   # candidate 3 for three seeds
    python benchmarks/grokking_search.py --out benchmarks/results/grokking_search.md

Results: ``benchmarks/results/grokking_search.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any, Dict, List

CANDIDATES: List[Dict[str, Any]] = [
    # p, train fraction of the a > b pairs, width, heads, MLP, lr, weight decay
    dict(p=31, frac=0.8, d_model=32, n_heads=4, d_mlp=128, lr=3e-3, weight_decay=1.0),   # 0
    dict(p=31, frac=0.8, d_model=32, n_heads=4, d_mlp=128, lr=1e-2, weight_decay=1.0),   # 1
    dict(p=31, frac=0.8, d_model=32, n_heads=2, d_mlp=128, lr=3e-3, weight_decay=3.0),   # 2
    dict(p=31, frac=0.8, d_model=32, n_heads=2, d_mlp=128, lr=1e-2, weight_decay=2.0),   # 3
    dict(p=31, frac=0.9, d_model=32, n_heads=2, d_mlp=128, lr=1e-2, weight_decay=1.0),   # 4
    dict(p=31, frac=0.8, d_model=32, n_heads=2, d_mlp=128, lr=5e-3, weight_decay=2.0),   # 5
    dict(p=31, frac=0.8, d_model=32, n_heads=2, d_mlp=128, lr=3e-3, weight_decay=2.5),   # 6
    dict(p=31, frac=0.9, d_model=32, n_heads=2, d_mlp=128, lr=3e-3, weight_decay=3.0),   # 7
    dict(p=31, frac=0.85, d_model=32, n_heads=2, d_mlp=128, lr=1e-2, weight_decay=1.5),  # 8
    dict(p=37, frac=0.85, d_model=32, n_heads=2, d_mlp=128, lr=1e-2, weight_decay=1.0),  # 9
    dict(p=31, frac=0.9, d_model=32, n_heads=2, d_mlp=128, lr=1e-2, weight_decay=1.5),   # 10
]


def _config(c: Dict[str, Any], seed: int, max_steps: int) -> Any:
    from captum_explaind.grokking import GrokConfig

    n_pairs = c["p"] * (c["p"] - 1) // 2
    n_train = int(round(c["frac"] * n_pairs))
    keys = ("d_model", "n_heads", "d_mlp", "lr", "weight_decay")
    return GrokConfig(p=c["p"], n_train=n_train, n_test=n_pairs - n_train, max_steps=max_steps,
                      data_seed=seed, init_seed=seed, **{k: c[k] for k in keys})


def run_one(args: tuple) -> Dict[str, Any]:
    """Train one candidate (same loop as ``grokking.train``, no recording); first steps of each level."""
    index, cand, seed, max_steps, max_seconds = args
    import torch
    import torch.nn.functional as F

    from captum_explaind.grokking import build_model, make_data

    torch.set_num_threads(1)
    config = _config(cand, seed, max_steps)
    data = make_data(config.p, config.n_train, config.n_test, seed=config.data_seed)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    x, y, xt, yt = data.train_x, data.train_y, data.test_x, data.test_y
    firsts: Dict[str, Any] = {"train100": None, "test99": None, "test100": None}
    start, step, test_acc = time.perf_counter(), 0, 0.0
    for step in range(1, max_steps + 1):
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            pred = model(torch.cat([x, xt])).argmax(-1)
        train_acc = float((pred[: len(y)] == y).double().mean())
        test_acc = float((pred[len(y):] == yt).double().mean())
        for key, ok in (("train100", train_acc >= 1.0), ("test99", test_acc >= 0.99), ("test100", test_acc >= 1.0)):
            if ok and firsts[key] is None:
                firsts[key] = step
        if test_acc >= 1.0 or time.perf_counter() - start > max_seconds:
            break
    seconds = time.perf_counter() - start
    out = dict(index=index, seed=seed, n_train=config.n_train, n_test=config.n_test, steps=step,
               final_test=test_acc, seconds=seconds, **cand, **firsts)
    print(_row(out), flush=True)
    return out


def _row(r: Dict[str, Any]) -> str:
    f = lambda v: "–" if v is None else f"{v:,}"  # noqa: E731
    return (f"| {r['index']} | {r['seed']} | {r['p']} | {r['n_train']} / {r['n_test']} | "
            f"{r['d_model']}, {r['n_heads']}, {r['d_mlp']} | {r['lr']:g}, {r['weight_decay']:g} | "
            f"{f(r['train100'])} | {f(r['test99'])} | "
            f"{f(r['test100'])} | {r['steps']:,} | {100 * r['final_test']:.1f} % | {r['seconds']:.0f} |")


HEADER = ("| # | seed | p | train / test | d, heads, MLP | lr, wd | train 100 % | test 99 % | test 100 % | steps run "
          "| final test | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=int, nargs="*", default=None, help="candidate indices (default: all)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="data and init seeds. Default: 0")
    ap.add_argument("--max-steps", type=int, default=10000, help="step cap per run. Default: 10000")
    ap.add_argument("--max-seconds", type=float, default=150.0, help="time cap per run. Default: 150")
    ap.add_argument("--procs", type=int, default=2, help="parallel runs (one thread each). Default: 2")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    idx = args.only if args.only else range(len(CANDIDATES))
    jobs = [(i, CANDIDATES[i], s, args.max_steps, args.max_seconds) for i in idx for s in args.seeds]
    print(HEADER, flush=True)
    with mp.get_context("spawn").Pool(args.procs) as pool:
        rows = pool.map(run_one, jobs, chunksize=1)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(f"\n`{' '.join(os.sys.argv)}` (caps: {args.max_steps} steps, {args.max_seconds:.0f} s)\n\n")
            fh.write(HEADER + "\n" + "\n".join(_row(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
