"""The data view with ``layers=`` groups that leave parameters out.

The parameters in no group get their own exact part, ``DataDecomposition.other`` (from the
replayed batch gradient), never the residual; with independent samples their per-sample
gradients are not formed at all (``IndependentGrads.project_restricted``). Checked against the
full per-sample path, the real model outputs and the brute-force dense influence tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from captum_explaind import TrainingDataInfluence
from captum_explaind.epk.train_grads import IndependentGrads

from reference import bruteforce as bf
from training import OPTIMIZERS, SCHEDULERS, RunConfig, TanhMLP, loss_fn_for, make_data, outputs_at, record_run

ATOL = 1e-12


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 24)
    # decoupled decay per group, clipping, accumulation over unequal micro-batches
    cfg = RunConfig(OPTIMIZERS["adamw_groups"], steps=7, micro=2, clip=0.6, sizes=(5, 3, 4, 6),
                    scheduler=SCHEDULERS["warmup_cosine"], loss="nll")
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("partial") / "run", cfg)
    x = X[:4]
    dense = bf.dense_influence(model, traj, X, Y, x, "nll", nodes=16)
    return model, traj, X, Y, x, dense


def _spy(monkeypatch):
    calls = []
    original = IndependentGrads.project_restricted

    def spy(self, *args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("names"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndependentGrads, "project_restricted", spy)
    return calls


def test_partial_groups_restricted_equals_full_and_bruteforce(case, monkeypatch):
    model, traj, X, Y, x, dense = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    target = torch.tensor([0, 2, 1, 1])
    full = tdi.explain(x, target=target, layers={"fc1": "fc1", "fc2": "fc2"})
    calls = _spy(monkeypatch)
    part = tdi.explain(x, target=target, layers={"dec": "fc2"})
    assert calls and list(calls[0]) == ["fc2.weight", "fc2.bias"]  # the restricted path ran
    scale = float(full.scores.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(part.scores[..., 0], full.scores[..., 1], rtol=0, atol=ATOL * scale)
    # the ungrouped parameters' share: Σ over samples of the full path's per-sample scores there
    assert part.other is not None and part.other.shape == (4,)
    torch.testing.assert_close(part.other, full.scores[..., 0].sum(1), rtol=0, atol=ATOL * scale)
    assert float(part.other.abs().max()) > 1e-3
    torch.testing.assert_close(full.other, torch.zeros(4, dtype=full.other.dtype), rtol=0, atol=0)
    # the residual is what the replay misses (round-off here), not fc1's share (the old behaviour)
    assert float(part.residual.abs().max()) < 1e-12
    torch.testing.assert_close(part.residual, full.residual, rtol=0, atol=ATOL * scale)
    torch.testing.assert_close(part.regularization, full.regularization, rtol=0, atol=ATOL * scale)
    assert part.grad_scale == pytest.approx(full.grad_scale, rel=1e-12)
    # brute force: per-sample scores of fc2, and fc1's kernel share summed over the samples
    sl = bf.param_slices(traj)
    q = torch.arange(4)
    dec = slice(sl["fc2.weight"].start, sl["fc2.bias"].stop)
    enc = slice(sl["fc1.weight"].start, sl["fc1.bias"].stop)
    ref_dec = dense["Gamma"][:, dec].sum(dim=(0, 1))[q, :, target]  # [Q, M]
    ref_enc = dense["Gamma"][:, enc].sum(dim=(0, 1, 3))[q, target]
    torch.testing.assert_close(part.scores[..., 0], ref_dec, rtol=0, atol=ATOL)
    torch.testing.assert_close(part.other, ref_enc, rtol=0, atol=ATOL)
    # complete against the real model
    change = outputs_at(model, traj, x, traj.num_steps) - outputs_at(model, traj, x, 0)
    change = change.gather(1, target[:, None])[:, 0]
    total = part.scores.sum(dim=(1, 2)) + part.other + part.regularization + part.residual + part.buffers + part.delta
    torch.testing.assert_close(total, change, rtol=0, atol=1e-12)


@pytest.mark.parametrize("indexing", ["application", "gradient"])
def test_partial_groups_per_window(case, indexing):
    model, traj, X, Y, x, _ = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    windows = [range(1, 4), range(4, traj.num_steps + 1)]
    full = tdi.explain(x, target=1, layers={"fc1": "fc1", "fc2": "fc2"}, steps=windows, indexing=indexing)
    part = tdi.explain(x, target=1, layers={"w": "fc2.weight"}, steps=windows, indexing=indexing)
    scale = float(full.scores.abs().max())
    assert part.other.shape == (4, 2)
    # fc2.bias and fc1 are outside the group: their share per window
    sl = bf.param_slices(traj)
    full_pi = tdi.explain(x, target=1, layers={"w": "fc2.weight", "b": "fc2.bias", "fc1": "fc1"}, steps=windows,
                          indexing=indexing)
    rest_full = full_pi.scores[..., 1:].sum(dim=(1, 3))
    assert sl["fc2.bias"].stop > sl["fc2.bias"].start
    torch.testing.assert_close(part.scores[..., 0], full_pi.scores[..., 0], rtol=0, atol=ATOL * scale)
    torch.testing.assert_close(part.other, rest_full, rtol=0, atol=ATOL * scale)
    torch.testing.assert_close(part.residual, full.residual, rtol=0, atol=ATOL * scale)


def test_partial_groups_forward_mode_same_other(case):
    model, traj, X, Y, x, _ = case
    args = (model, traj, TensorDataset(X, Y), loss_fn_for("nll"))
    ref = TrainingDataInfluence(*args).explain(x, target=0, layers={"dec": "fc2"})
    jvp = TrainingDataInfluence(*args, train_jvp=True).explain(x, target=0, layers={"dec": "fc2"})
    scale = float(ref.scores.abs().max())
    torch.testing.assert_close(jvp.scores, ref.scores, rtol=0, atol=ATOL * scale)
    torch.testing.assert_close(jvp.other, ref.other, rtol=0, atol=ATOL * scale)
    torch.testing.assert_close(jvp.residual, ref.residual, rtol=0, atol=ATOL * scale)


def test_overlapping_groups_are_refused(case):
    model, traj, X, Y, x, _ = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    with pytest.raises(ValueError, match="groups must be disjoint"):
        tdi.explain(x, target=0, layers={"a": "fc2", "b": ["fc1", "fc2.bias"]})


def test_other_survives_save_and_load(case, tmp_path):
    from captum_explaind.epk.results import DataDecomposition

    model, traj, X, Y, x, _ = case
    res = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll")).explain(
        x, target=0, layers={"dec": "fc2"})
    res.save(tmp_path / "res.pt")
    back = DataDecomposition.load(tmp_path / "res.pt")
    torch.testing.assert_close(back.other, res.other, rtol=0, atol=0)
