"""keep_every=k: every k-th checkpoint stored; the model and training views stay exact along the
polyline through the kept checkpoints; the data and similarity views refuse."""

from __future__ import annotations

import math
import warnings

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


# ----------------------------------------------------------------------------- the polyline data view
def _train_sgd(path, keep_every, X, Y, steps=8):
    """Plain SGD (no momentum, no decay): at keep_every=1 the kernel update is exactly −η Σ w_k ∇ℓ_k."""
    torch.manual_seed(0)
    model = TanhMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(2)
    with TrajectoryRecorder(model, opt, path, keep_every=keep_every) as rec:
        for _ in range(steps):
            idx = torch.randperm(len(X), generator=g)[:6]
            opt.zero_grad()
            nll(model(X[idx]), Y[idx]).mean().backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory


def _complete(d, atol=1e-12):
    total = d.scores.sum(dim=tuple(range(1, d.scores.dim()))) + d.regularization + d.residual + d.buffers + d.delta
    torch.testing.assert_close(total, d.change, rtol=0, atol=atol)


def test_polyline_data_view_by_option_is_complete_and_reports_its_approximation(runs):
    from captum_explaind.errors import ResidualWarning

    model, full, kept, X, Y = runs
    x, y = X[:3], Y[:3]
    with pytest.raises(TrajectoryError, match="polyline=True"):  # the refusal names the option
        TrainingDataInfluence(model, kept, TensorDataset(X, Y), nll).explain(x, target=y)
    with pytest.warns(ResidualWarning, match="keep_every=3.*polyline"):
        d = TrainingDataInfluence(model, kept, TensorDataset(X, Y), nll, polyline=True).explain(x, target=y)
    _complete(d)
    # the change is the true change of the recorded model, and the regularization the exact
    # polyline part (the recorded decay sums, as in the reconstruction)
    change = (outputs_at(model, kept, x, kept.num_steps) - outputs_at(model, kept, x, 0)).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(d.change, change, rtol=0, atol=1e-13)
    parts = ExactPathKernel(model, kept).reconstruct(x)
    reg = parts.regularization.gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(d.regularization, reg, rtol=0, atol=1e-9 * float(change.abs().max()))
    assert float(d.residual.abs().max()) > 1e-4 * float(change.abs().max())  # the approximation is not hidden
    # windows of macro-steps and parameter groups add up to the same scores
    with pytest.warns(ResidualWarning):
        dw = TrainingDataInfluence(model, kept, TensorDataset(X, Y), nll, polyline=True).explain(
            x, target=y, steps=[range(1, 3), range(3, kept.num_steps + 1)], layers=["fc1", "fc2"])
    torch.testing.assert_close(dw.scores.sum(dim=(2, 3)), d.scores, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dw.residual, d.residual, rtol=1e-10, atol=1e-14)
    # a group leaving fc1 out: fc1's share of the fit in `other`, the residual unchanged
    with pytest.warns(ResidualWarning):
        dp = TrainingDataInfluence(model, kept, TensorDataset(X, Y), nll, polyline=True).explain(
            x, target=y, steps=[range(1, 3), range(3, kept.num_steps + 1)], layers=["fc2"])
    torch.testing.assert_close(dp.scores[..., 0], dw.scores[..., 1], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dp.other, dw.scores[..., 0].sum(1), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dp.residual, d.residual, rtol=1e-10, atol=1e-14)


def test_polyline_scores_equal_a_brute_force_and_shrink_to_the_exact_view_as_k_goes_to_1(tmp_path):
    from reference.bruteforce import per_sample_grads, sample_weights

    X, Y = make_data("vector", 30)
    x, y = X[:2], Y[:2]
    residual = {}
    for k in (4, 2, 1):
        model, traj = _train_sgd(tmp_path / f"k{k}", k, X, Y)
        tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll, polyline=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ResidualWarning of the approximation (k > 1)
            d = tdi.explain(x, target=y)
        _complete(d)
        residual[k] = float(d.residual.abs().max())
        if k == 1:  # every step recorded: the option changes nothing, the exact view runs
            exact = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll).explain(x, target=y)
            torch.testing.assert_close(d.scores, exact.scores, rtol=0, atol=0)
            continue
        # brute force: per macro-step j, Φ_j from explicit Jacobians, per-sample gradients at θ_{j−1}
        # by autograd, the least-squares scale per parameter tensor, the scores and what they miss
        slices = [slice(0, 0)]
        for n in traj.trainable:
            start = slices[-1].stop
            slices.append(slice(start, start + math.prod(traj.spec[n].shape)))
        want = torch.zeros(2, len(X), dtype=torch.float64)
        for j in range(1, traj.num_steps + 1):
            P = phi(model, traj, x, j, nodes=16, panels=2)[torch.arange(2), y]  # [2, P] at the targets
            th0 = flat_params(traj, j - 1)
            G = sample_weights(traj.record(j), len(X))[:, None] * per_sample_grads(model, traj, th0, X, Y, "nll")
            K, g = flat_params(traj, j) - th0, G.sum(0)
            for sl in slices[1:]:
                a = -(K[sl] @ g[sl]) / (g[sl] @ g[sl])
                want -= a * P[:, sl] @ G[:, sl].T
        torch.testing.assert_close(d.scores, want, rtol=1e-8, atol=1e-12)
    assert residual[1] < 1e-12 * residual[4]  # SGD replayed exactly at k = 1
    assert residual[4] > residual[2] > residual[1], residual
