"""Every number the Grokking figures show is complete: the parts add up to the prediction changes.

A tiny recorded run; each analysis is checked against prediction changes computed here from plain
float64 forward passes at the recorded parameters (not by the library), within the delta the
analysis reports, and two views are cross-checked against each other.
"""

from __future__ import annotations

import pytest
import torch

from captum_explaind import EPKOptions, PredictionSimilarity
from captum_explaind.grokking import LAYERS, GrokConfig, load_run, train
from captum_explaind.grokking.analysis import (
    Stage,
    balances,
    find_stages,
    layer_balance,
    sample_influence,
    sample_influences,
    similarity_stages,
    training_balance,
)

OPTS = EPKOptions.preset("balanced")  # error control to 1e-6 of each step's change, float64
TOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("grok") / "run", GrokConfig.tiny(max_steps=6, lr=1e-3))


def forward_change(run, x, y, start, stop):
    """f_y(θ_stop; x) − f_y(θ_start; x) by functional calls in float64 (independent of the library)."""
    model = run.model.double()

    def f(step):
        params = {k: v.double() for k, v in run.trajectory.params(step).items()}
        with torch.no_grad():
            return torch.func.functional_call(model, params, (x,)).gather(1, y.view(-1, 1)).squeeze(1)

    out = f(stop) - f(start)
    run.model.float()
    return out


def test_fig3a_left_kernel_plus_regularization_is_the_change(run):
    x, y = run.data.test_x[:4], run.data.test_y[:4]
    res = training_balance(run, x, y, window=2, options=OPTS)
    assert len(res.windows) == 3 and res.kernel.shape == (4, 3)
    truth = forward_change(run, x, y, 0, 6)
    assert torch.allclose(res.change, truth, atol=1e-12)
    total = (res.kernel + res.regularization).sum(1)
    assert (truth - total).abs().max() < TOL * truth.abs().max()
    assert torch.allclose(res.importance, res.kernel.abs().sum(0))
    assert (res.regularization != 0).any()  # weight decay 1.0 contributes


def test_fig3a_right_layers_add_up_and_agree_with_the_window_view(run):
    x, y = run.data.test_x[:4], run.data.test_y[:4]
    lb = layer_balance(run, x, y, window=3, d_inputs=2, options=OPTS)
    assert lb.layers == list(LAYERS) and lb.scores.shape == (4, 2, 6)
    truth = forward_change(run, x, y, 0, 6)
    assert (truth - lb.scores.sum((1, 2))).abs().max() < TOL * truth.abs().max()
    tb = training_balance(run, x, y, window=3, options=OPTS)
    assert torch.allclose(lb.scores.sum(-1), tb.kernel + tb.regularization, atol=TOL * float(truth.abs().max()))
    assert lb.reg_influence is not None and lb.reg_influence.shape == (2, 6)
    # D = Σ_p |Ψ_p| − |Ψ^reg_p| ≤ Σ_p |Ψ_p|, and Σ_p |Ψ_p| ≥ |Σ_p Ψ_p| (kernel part only; bounded by the scores)
    assert torch.isfinite(lb.reg_influence).all()
    assert lb.leader(0) in LAYERS and torch.allclose(lb.shares().sum(1), torch.ones(2, dtype=lb.shares().dtype))


def test_fig3a_left_and_right_from_one_sweep_equal_the_two_calls(run):
    x, y = run.data.test_x[:3], run.data.test_y[:3]
    bal, lay = balances(run, x, y, window=3, d_inputs=2, options=OPTS)
    tb = training_balance(run, x, y, window=3, options=OPTS)
    lb = layer_balance(run, x, y, window=3, d_inputs=2, options=OPTS)
    scale = float(tb.change.abs().max())
    # The same sweep as layer_balance (reverse mode, six groups): equal to round-off.
    for a, b in ((lay.scores, lb.scores), (lay.delta, lb.delta)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * scale)
    # training_balance's one group is integrated in forward mode: both are within the preset's
    # error control (1e-6 of each step's change), so they agree to that, not to round-off.
    for a, b in ((bal.kernel, tb.kernel), (bal.regularization, tb.regularization), (bal.delta, tb.delta)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(lay.reg_influence, lb.reg_influence, rtol=0, atol=0)
    truth = forward_change(run, x, y, 0, 6)
    assert (truth - (bal.kernel + bal.regularization).sum(1)).abs().max() < TOL * truth.abs().max()


def test_fig4_sample_scores_add_up_per_stage_and_order(run):
    x, y = run.data.test_x[:3], run.data.test_y[:3]
    stages = [Stage("a", range(1, 3)), Stage("b", range(4, 7))]
    si = sample_influence(run, x, y, stages, options=OPTS)
    assert si.scores.shape == (2, 3, run.data.n_train)
    for k, st in enumerate(stages):
        truth = forward_change(run, x, y, st.steps.start - 1, st.steps.stop - 1)
        parts = si.scores[k].sum(1) + si.other[k] + si.regularization[k] + si.residual[k]
        assert torch.allclose(si.change[k], truth, atol=1e-12)
        assert torch.allclose(parts + si.delta[k], truth, atol=1e-10)
        assert si.delta[k].abs().max() < TOL * truth.abs().max()
        assert si.residual[k].abs().max() < 1e-3 * truth.abs().max()  # float32 rounding of the updates only
    rows, cols = si.order("mod")
    assert (torch.diff(si.input_sums[rows] % run.data.p) >= 0).all()
    assert (torch.diff(si.train_sums[cols] % run.data.p) >= 0).all()
    assert torch.equal(si.ordered(1, "sum"), si.scores[1][si.order("sum")[0]][:, si.order("sum")[1]])
    assert 0.0 <= si.same_label_share(1) <= 1.0


def test_fig5_similarity_per_stage(run):
    x, y = run.data.test_x[:5], run.data.test_y[:5]
    stages = find_stages(run, width=2)
    assert [s.name for s in stages] == ["start", "memorization", "transition", "grokked"]
    assert all(len(s.steps) == 2 and 1 <= s.steps.start and s.steps.stop <= 7 for s in stages)
    sim = similarity_stages(run, x, y, stages[:2], options="fast")
    assert sim.similarity.shape == (2, 5, 5)
    assert torch.allclose(sim.similarity.diagonal(dim1=1, dim2=2), torch.ones(2, 5, dtype=sim.similarity.dtype))
    assert torch.allclose(sim.similarity, sim.similarity.transpose(1, 2))
    assert (sim.similarity.abs() <= 1 + 1e-6).all()  # float32 ("fast")


def test_fig4_sets_share_a_sweep_and_equal_their_own_calls(run):
    stages = [Stage("a", range(2, 4)), Stage("b", range(5, 7))]
    sets = {"test": (run.data.test_x[:2], run.data.test_y[:2]), "train": (run.data.train_x[:3], run.data.train_y[:3])}
    both = sample_influences(run, sets, stages, options=OPTS)
    for name, (x, y) in sets.items():
        alone = sample_influence(run, x, y, stages, options=OPTS)
        for field in ("scores", "other", "regularization", "residual", "change", "delta"):
            torch.testing.assert_close(getattr(both[name], field), getattr(alone, field), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(both[name].input_sums, alone.input_sums, rtol=0, atol=0)


def test_fig5_stages_in_one_sweep_equal_one_call_per_stage(run):
    from torch import nn

    x, y = run.data.test_x[:3], run.data.test_y[:3]
    stages = [Stage("a", range(1, 3)), Stage("b", range(2, 5)), Stage("c", range(5, 7))]
    sim = similarity_stages(run, x, y, stages, options=OPTS)
    ps = PredictionSimilarity(run.model, run.recorded, run.data.train_set, loss_fn=nn.NLLLoss(reduction="none"),
                              options=OPTS)
    for k, st in enumerate(stages):
        alone = ps.explain(x, target=y, layers=LAYERS["decoder"], steps=st.steps)
        torch.testing.assert_close(sim.similarity[k], alone.similarity, rtol=0, atol=1e-12)
        truth = forward_change(run, x, y, st.steps.start - 1, st.steps.stop - 1)
        torch.testing.assert_close(alone.change[:, 0], truth, rtol=0, atol=1e-12)


def test_load_run_recomputes_the_curves(run, tmp_path):
    cache = tmp_path / "history.json"
    loaded = load_run(run.trajectory.path, run.config, train_seconds=1.5, history_file=cache)
    assert loaded.history.train_acc == pytest.approx(run.history.train_acc)
    assert loaded.history.test_acc == pytest.approx(run.history.test_acc)
    assert loaded.history.loss == pytest.approx(run.history.loss, rel=1e-5)
    assert loaded.train_seconds == 1.5 and cache.exists()
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, run.model.state_dict()[k], rtol=0, atol=0)
    assert load_run(run.trajectory.path, run.config, history_file=cache).history.test_acc == loaded.history.test_acc
    with pytest.raises(ValueError, match="not recorded from a model built with"):
        load_run(run.trajectory.path, GrokConfig.tiny(d_model=8, n_heads=2))


def test_unknown_layer_is_named(run):
    with pytest.raises(ValueError, match="layer must be one of"):
        sample_influence(run, run.data.test_x[:1], run.data.test_y[:1], [Stage("a", range(1, 2))], layer="mlp")


def test_fig5_with_a_horizon_splits_the_sweeps_and_reports_the_bound(run):
    x, y = run.data.test_x[:3], run.data.test_y[:3]
    stages = [Stage("a", range(1, 3)), Stage("b", range(5, 7))]
    full = similarity_stages(run, x, y, stages, options=OPTS)
    late = similarity_stages(run, x, y, stages, options=OPTS, horizon=1)  # stage b: a sweep from step 4
    assert full.truncation == [0.0, 0.0]
    assert late.truncation[0] == 0.0 and late.truncation[1] == pytest.approx(run.config.betas[0] ** 2, rel=1e-12)
    torch.testing.assert_close(late.similarity[0], full.similarity[0], rtol=0, atol=1e-12)
    assert (late.similarity[1] - full.similarity[1]).abs().max() < 1  # a truncated, not an unrelated, matrix
