"""Main example: record a small training run, then rewrite predictions as sums over it.

Run with ``python -m captum_explaind.demo``. It trains a small embedding MLP on modular
addition (the task of the ExPLAIND paper's Grokking study) with AdamW, a warm-up schedule and
gradient clipping, records the run, and then

1. reconstructs four test predictions as ``initial + kernel + regularization (+ delta)``,
2. splits one prediction over layers (model view) and over windows of steps (training view),
3. ranks the training samples that pushed it up or down (data view).

Everything is exact up to the printed convergence delta.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn

from . import ExactPathKernel, ParameterInfluence, StepInfluence, TrainingDataInfluence, TrajectoryRecorder


class AddMLP(nn.Module):
    """Embeds both operands, mixes them with a ReLU MLP, outputs log-probabilities of (a+b) mod p."""

    def __init__(self, p: int, d: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(p, d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.unembed = nn.Linear(d, p, bias=False)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        z = self.embed(pairs).flatten(1)
        return self.unembed(self.mlp(z)).log_softmax(-1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=11)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=None, help="trajectory directory (default: a temporary one)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    p = args.p
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))
    labels = (pairs[:, 0] + pairs[:, 1]) % p
    perm = torch.randperm(len(pairs))
    train_idx, test_idx = perm[: int(0.7 * len(pairs))], perm[int(0.7 * len(pairs)) :]
    train_set = torch.utils.data.TensorDataset(pairs[train_idx], labels[train_idx])
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True)

    model = AddMLP(p)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    workdir = args.out or tempfile.mkdtemp(prefix="explaind_demo_")

    t0 = time.time()
    with TrajectoryRecorder(model, opt, workdir, scheduler=sched, overwrite=True) as recorder:
        step = 0
        while step < args.steps:
            for x, y in recorder.track(loader):  # dataset indices are logged for the data view
                opt.zero_grad()
                nn.functional.nll_loss(model(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()  # recorded by the recorder's optimizer hook
                sched.step()
                step += 1
                if step == args.steps:
                    break
    trajectory = recorder.trajectory
    print(f"recorded {trajectory.num_steps} AdamW steps in {time.time() - t0:.1f} s -> {workdir}")
    print(trajectory)

    x_test, y_test = pairs[test_idx[:4]], labels[test_idx[:4]]
    t0 = time.time()
    epk = ExactPathKernel(model, trajectory, dtype=torch.float64)
    parts = epk.reconstruct(x_test)
    print(f"\n1) reconstruction of 4 test predictions ({time.time() - t0:.1f} s), log-probability of the true class:")
    print(f"{'input':>9} {'initial':>10} {'kernel':>10} {'regular.':>10} {'final':>10} {'delta':>10}")
    for i in range(4):
        j = int(y_test[i])
        print(
            f"{str(tuple(x_test[i].tolist())):>9} {parts.initial[i, j]:10.5f} {parts.kernel[i, j]:10.5f} "
            f"{parts.regularization[i, j]:10.5f} {parts.final[i, j]:10.5f} {parts.delta[i, j]:10.2e}"
        )
    print(f"   max |delta| over all outputs: {parts.max_abs_delta():.2e} (relative {parts.relative_delta():.1e})")

    x0, y0 = x_test[:1], int(y_test[0])
    layers = ParameterInfluence(model, trajectory, dtype=torch.float64).attribute(
        x0, target=y0, layers={"embed": "embed", "mlp": "mlp", "unembed": "unembed"}
    )
    print("\n2) model view — which layers moved the first prediction:")
    for name, v in layers.items():
        print(f"   {name:>8}: {float(v[0]):+.4f}")
    windows = StepInfluence(model, trajectory, dtype=torch.float64).attribute(
        x0, target=y0, window=max(1, args.steps // 4), component=["kernel", "regularization"]
    )
    print("   training view — kernel / regularization per quarter of training:")
    for w in range(windows["kernel"].shape[1]):
        kernel, reg = float(windows["kernel"][0, w]), float(windows["regularization"][0, w])
        print(f"   window {w + 1}: {kernel:+.4f} / {reg:+.4f}")

    tdi = TrainingDataInfluence(model, trajectory, train_set, loss_fn=nn.NLLLoss(reduction="none"), dtype=torch.float64)
    res = tdi.decompose(x0, target=y0)
    top = torch.topk(res.scores[0], 3)
    bottom = torch.topk(-res.scores[0], 3)
    print(f"\n3) data view — training samples that moved log p({y0} | {tuple(x0[0].tolist())}):")
    for tag, ids, vals in (("proponents", top.indices, top.values), ("opponents", bottom.indices, -bottom.values)):
        items = ", ".join(
            f"{tuple(train_set[int(k)][0].tolist())}→{int(train_set[int(k)][1])}: {float(v):+.4f}"
            for k, v in zip(ids, vals)
        )
        print(f"   {tag}: {items}")
    total = float(res.scores[0].sum() + res.regularization[0] + res.residual[0])
    print(f"   sum over all {len(train_set)} samples + regularization + residual = {total:+.6f}; "
          f"true change = {float(res.change[0]):+.6f}; delta = {float(res.delta[0]):.1e}")


if __name__ == "__main__":
    main()
