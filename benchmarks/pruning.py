"""Benchmark: pruning by ExPLAIND importance vs. magnitude, random and Li et al. (paper Sec. 4.2, Fig. 2).

The paper prunes a ResNet9 trained on CIFAR-2 (SGD, momentum 0.9, weight decay 5e-3, one-cycle
schedule peaking at epoch 5 of 12, batch 256) by the importance Ψ(θ) = Σ_x Σ_j |Ψ_j(θ, x)| (eq. 6)
over held-out inputs and reports accuracy, agreement with the unpruned model and KL to it against
sparsity, next to magnitude pruning, random pruning and Li et al. (2017) filter pruning with
retraining. This script repeats that, scaled to a CPU (the reductions are printed and written to
the results):

* data: two digits of scikit-learn's ``digits`` (offline; 8×8 upsampled bilinearly to 16×16, one
  channel), split into train / held-out (for Ψ) / test with a fixed seed;
* model: :class:`captum_explaind.adapters.torchvision.ResNet9` (BatchNorm, ReLU, max-pools),
  ``--width`` channels in the first block (the paper's is 64);
* training: the paper's recipe (SGD momentum 0.9, weight decay 5e-3, one-cycle peaking at 5/12 of
  ``--epochs``), batch ``--batch`` (the paper's 256 is larger than this training set), recorded with
  :class:`captum_explaind.TrajectoryRecorder` in float32;
* Ψ: :class:`captum_explaind.ParameterInfluence` over the held-out set, every output, preset
  ``--options`` (the delta of the decomposition is reported), then
  :func:`captum_explaind.pruning.prune_global` (``global_unstructured`` with ``importance_scores``);
* baselines: ``|w|`` and uniform random scores through the same global pruning; Li et al.: the
  smallest-L1 filters of every convolution (and their BatchNorm channels), then ``--retrain``
  epochs of fine-tuning with the masks attached;
* the output layer is never pruned; sparsity is over all convolution weights;
* metrics on the test set against the unpruned model; mean ± std over ``--seeds`` seeds (the
  seed sets the initialization, the batch order and the random scores; the split is fixed).

Usage::

    nice python benchmarks/pruning.py            # full run (5 seeds)
    python benchmarks/pruning.py --quick         # smoke run (1 seed, tiny)

Writes ``benchmarks/results/pruning.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from captum_explaind import ExactPathKernel, ParameterInfluence, TrajectoryRecorder  # noqa: E402
from captum_explaind.adapters.torchvision import ResNet9  # noqa: E402
from captum_explaind.pruning import (  # noqa: E402
    compare_outputs,
    magnitude_importance,
    model_at,
    prunable_weights,
    prune_filters_l1,
    prune_global,
    psi_importance,
    random_importance,
    sparsity,
)

LEVELS = (0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
METHODS = ("explaind", "magnitude", "random", "li_retrained")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def two_digits(a: int = 3, b: int = 8, size: int = 16, seed: int = 0) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Digits ``a`` and ``b`` of sklearn's digits (label 0 / 1), upsampled, standardized, split 55/15/30 %."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = (d.target == a) | (d.target == b)
    X = torch.tensor(d.images[keep], dtype=torch.float32).unsqueeze(1) / 16.0
    Y = torch.tensor((d.target[keep] == b).astype("int64"))
    X = nn.functional.interpolate(X, size=(size, size), mode="bilinear", align_corners=False)
    X = (X - X.mean()) / X.std()
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_test, n_held = int(0.30 * len(X)), int(0.15 * len(X))
    test, held, train = perm[:n_test], perm[n_test:n_test + n_held], perm[n_test + n_held:]
    return {"train": (X[train], Y[train]), "held": (X[held], Y[held]), "test": (X[test], Y[test])}


def train(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, epochs: int, batch: int, lr: float, seed: int,
          path: str = "") -> Any:
    """The paper's recipe (recorded to ``path`` when given). Returns the trajectory or None."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-3)
    per_epoch = math.ceil(len(X) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=5 / 12,
                                                anneal_strategy="linear")
    rec = TrajectoryRecorder(model, opt, path, scheduler=sched) if path else None
    model.train()
    with rec if rec is not None else contextlib.nullcontext():
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=g)
            for i in range(per_epoch):
                idx = perm[i * batch:(i + 1) * batch]
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
                if rec is not None:
                    rec.log_batch(idx)
                opt.step()
                sched.step()
    model.eval()
    return rec.trajectory if rec is not None else None


def fine_tune(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, epochs: int, batch: int, lr: float,
              seed: int) -> None:
    """Li et al.'s retraining: SGD (momentum 0.9, weight decay 5e-3, constant lr) with the masks attached."""
    g = torch.Generator().manual_seed(seed + 1000)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(math.ceil(len(X) / batch)):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    model.eval()


def copy_with(model: nn.Module) -> Tuple[nn.Module, list]:
    import copy

    m = copy.deepcopy(model)
    return m, prunable_weights(m, exclude=["fc"])


def run_seed(seed: int, data: Dict[str, Tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace,
             workdir: str) -> Dict[str, Any]:
    torch.manual_seed(seed)
    Xtr, Ytr = data["train"]
    model = ResNet9(num_classes=2, width=args.width, in_channels=1)
    t0 = time.time()
    traj = train(model, Xtr, Ytr, args.epochs, args.batch, args.lr, seed, os.path.join(workdir, f"run{seed}"))
    t_train = time.time() - t0
    final = model_at(model, traj)
    Xte, Yte = data["test"]
    with torch.no_grad():
        ref = final(Xte)
    out: Dict[str, Any] = {"seed": seed, "steps": traj.num_steps, "train_time_s": t_train,
                           "unpruned_accuracy": compare_outputs(ref, ref, Yte)["accuracy"]}
    # --- Ψ over the held-out set, every output (eq. 6)
    t0 = time.time()
    pi = ParameterInfluence(model, traj, options=args.options, show_progress=args.progress)
    Xh, _ = data["held"]
    base, keys = copy_with(final)
    names = {id(m): n for n, m in base.named_modules()}
    psi = {names[id(m)]: v for (m, _), v in psi_importance(pi, Xh, range(2), base, parameters=keys).items()}
    out["psi_time_s"] = time.time() - t0
    # completeness of the decomposition behind Ψ (same options), reported next to the results
    parts = ExactPathKernel(model, traj, options=args.options).reconstruct(Xh)
    out["psi_check"] = {"max_abs_delta": float(parts.delta.abs().max()),
                        "max_abs_change": float((parts.final - parts.initial).abs().max()),
                        "max_abs_buffers": float(parts.buffers.abs().max())}
    # --- every method at every level
    rows: Dict[str, Dict[str, List[float]]] = {m: {"accuracy": [], "agreement": [], "kl": [], "sparsity": []}
                                               for m in METHODS}
    g = torch.Generator().manual_seed(seed + 7)
    for level in LEVELS:
        for method in METHODS:
            m, params = copy_with(final)
            if method == "explaind":
                prune_global({(mod, a): psi[n] for n, mod, a in
                              ((n, m.get_submodule(n), "weight") for n in psi)}, level)
            elif method == "magnitude":
                prune_global(magnitude_importance(params), level)
            elif method == "random":
                prune_global(random_importance(params, g), level)
            else:
                prune_filters_l1(m, level, exclude=["fc"])
                fine_tune(m, Xtr, Ytr, args.retrain, args.batch, args.lr / 10, seed)
            with torch.no_grad():
                metr = compare_outputs(ref, m(Xte), Yte)
            metr["sparsity"] = sparsity(params)
            for k, v in metr.items():
                rows[method][k].append(v)
    out["methods"] = rows
    return out


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, List[float]]]]:
    summary: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for method in METHODS:
        summary[method] = {}
        for metric in ("accuracy", "agreement", "kl", "sparsity"):
            vals = torch.tensor([r["methods"][method][metric] for r in runs], dtype=torch.float64)  # [seeds, L]
            std = vals.std(0, unbiased=True) if len(runs) > 1 else torch.zeros(vals.shape[1], dtype=torch.float64)
            summary[method][metric] = [vals.mean(0).tolist(), std.tolist()]
    return summary


def markdown(summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = [
        "# Pruning by ExPLAIND importance (paper Fig. 2, scaled to a CPU)",
        "",
        f"Generated by `benchmarks/pruning.py` on {meta['date']} ({meta['machine']}); {meta['seeds']} seeds, "
        f"mean ± std. Setup: {meta['setup']}",
        "",
        "| sparsity | metric | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for li, level in enumerate(LEVELS):
        for metric in ("accuracy", "agreement", "kl"):
            cells = []
            for method in METHODS:
                mean, std = summary[method][metric][0][li], summary[method][metric][1][li]
                cells.append(f"{mean:.3f} ± {std:.3f}" if metric != "kl" else f"{mean:.3g} ± {std:.2g}")
            lines.append(f"| {100 * level:g} % | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Any = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--retrain", type=int, default=3)
    p.add_argument("--options", default="fast")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.width, args.epochs, args.retrain = 1, 4, 2, 1
    data = two_digits()
    setup = (f"digits 3 vs 8 (16×16; train {len(data['train'][0])}, held-out {len(data['held'][0])}, test "
             f"{len(data['test'][0])}), ResNet9 width {args.width} (paper: 64), {args.epochs} epochs of batch "
             f"{args.batch} (paper: 256), peak lr {args.lr}, Ψ with options={args.options!r}, Li et al. retrained "
             f"{args.retrain} epochs at lr {args.lr / 10:g}.")
    print(setup)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(range(args.seeds), desc="seeds"):
            runs.append(run_seed(seed, data, args, tmp))
            r = runs[-1]
            print(f"seed {seed}: {r['steps']} steps, unpruned acc {r['unpruned_accuracy']:.3f}, train "
                  f"{r['train_time_s']:.0f}s, Ψ {r['psi_time_s']:.0f}s, check {r['psi_check']}", flush=True)
    summary = summarize(runs)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads", "seeds": args.seeds, "setup": setup, "args": vars(args)}
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "pruning.json"), "w") as fh:
            json.dump({"meta": meta, "levels": LEVELS, "summary": summary, "runs": runs}, fh, indent=1)
        with open(os.path.join(args.out, "pruning.md"), "w") as fh:
            fh.write(markdown(summary, meta))
        from captum_explaind.visualization import plot_pruning

        fig = plot_pruning(LEVELS, summary)
        fig.savefig(os.path.join(args.out, "pruning.png"), dpi=120, bbox_inches="tight")
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
