"""keep_every=k: every k-th checkpoint stored; the model and training views stay exact along the
polyline through the kept checkpoints; the data and similarity views refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import (
    ExactPathKernel,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
    TrajectoryRecorder,
)
from captum_explaind.errors import TrajectoryError

from reference.bruteforce import flat_params, phi
from training import TanhMLP, make_data, outputs_at

STEPS, K = 10, 3  # macro-steps 1-3, 4-6, 7-9 and the trailing 10 (kept at close)


def nll(out, y):
    return nn.functional.nll_loss(out, y, reduction="none")


def _train(path, keep_every, X, Y):
    torch.manual_seed(0)
    model = TanhMLP().double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    with TrajectoryRecorder(model, opt, path, keep_every=keep_every) as rec:
        for _ in range(STEPS):
            idx = torch.randperm(len(X), generator=g)[:6]
            opt.zero_grad()
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
            sched.step()
    return model, rec.trajectory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    X, Y = make_data("vector", 30)
    d = tmp_path_factory.mktemp("keep")
    model, full = _train(d / "full", 1, X, Y)
    _, kept = _train(d / "kept", K, X, Y)
    return model, full, kept, X, Y


MACRO = [range(1, 4), range(4, 7), range(7, 10), range(10, 11)]


def test_kept_checkpoints_batches_and_summed_regularization(runs):
    model, full, kept, X, Y = runs
    assert kept.num_steps == len(MACRO) and kept.keep_every == K and full.keep_every == 1
    for j, steps in enumerate(MACRO, start=1):
        assert torch.equal(flat_params(kept, j), flat_params(full, steps[-1]))
        want = [mb.indices.tolist() for s in steps for mb in full.record(s).batches]
        assert [mb.indices.tolist() for mb in kept.record(j).batches] == want
        # Σ_s −η_s λ θ_{s−1} over the macro-step, from the full recording (AdamW: decoupled decay)
        reg = sum(-full.record(s).lr[0] * 0.3 * flat_params(full, s - 1) for s in steps)
        got = torch.cat([kept.regularization(j)[n].reshape(-1) for n in kept.trainable])
        torch.testing.assert_close(got, reg, rtol=1e-14, atol=1e-16)
    assert full.regularization(1) is None


def test_reconstruction_is_exact_along_the_polyline(runs):
    model, full, kept, X, Y = runs
    x = X[:4]
    parts = ExactPathKernel(model, kept).reconstruct(x)
    change = outputs_at(model, kept, x, kept.num_steps) - outputs_at(model, kept, x, 0)
    torch.testing.assert_close(parts.kernel + parts.regularization + parts.delta, change, rtol=0, atol=1e-13)
    assert float(parts.delta.abs().max()) < 1e-10 * float(change.abs().max())
    # brute force: Σ_j Φ_j(x) · R_j with Φ_j from explicit Jacobians along each kept segment
    reg = 0.0
    for j in range(1, kept.num_steps + 1):
        R = torch.cat([kept.regularization(j)[n].reshape(-1) for n in kept.trainable])
        reg = reg + phi(model, kept, x, j, nodes=16, panels=2) @ R  # long segments: composite rule
    # the parts share the error control of their sum (rtol 1e-10 of each step's change)
    torch.testing.assert_close(parts.regularization, reg, rtol=0, atol=1e-9 * float(change.abs().max()))
    assert float(parts.regularization.abs().max()) > 1e-4  # the decay really is in this part
    # the training view per macro-step adds up to the same parts
    steps = StepInfluence(model, kept).explain(x, target=1, window=1, component=["kernel", "regularization"])
    torch.testing.assert_close(steps.scores["regularization"].reshape(4, -1).sum(1), parts.regularization[:, 1],
                               rtol=0, atol=1e-9 * float(change.abs().max()))
    assert steps.scores["regularization"].shape[1] == kept.num_steps  # one window per kept macro-step


def test_data_and_similarity_views_refuse(runs):
    model, _, kept, X, Y = runs
    tdi = TrainingDataInfluence(model, kept, TensorDataset(X, Y), nll)
    with pytest.raises(TrajectoryError, match="keep_every=3.*data view"):
        tdi.explain(X[:2], target=Y[:2])
    with pytest.raises(TrajectoryError, match="keep_every=3.*similarity view"):
        PredictionSimilarity(model, kept, TensorDataset(X, Y), nll).explain(X[:2], target=Y[:2])


@pytest.mark.parametrize("opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                                 lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)])
def test_decay_riding_momentum_is_refused(tmp_path, opt):
    model = TanhMLP().double()
    with pytest.raises(ValueError, match="keep_every=2.*momentum"):
        TrajectoryRecorder(model, opt(model.parameters()), tmp_path / "t", keep_every=2)
    with pytest.raises(ValueError, match="keep_every"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "u", keep_every=0)
