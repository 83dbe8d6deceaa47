"""The Lasso helper on a synthetic cosine matrix of known frequency; layer swapping and retraining."""

from __future__ import annotations

import math

import pytest
import torch

from captum_explaind.grokking import GrokConfig, train
from captum_explaind.grokking.lasso import fit_similarity, lasso, periodic_features
from captum_explaind.grokking.swap import layer_parameters, retrain_with, swap_layers


def test_lasso_finds_the_period_of_a_synthetic_cosine_matrix():
    g = torch.Generator().manual_seed(0)
    p = 23
    sums = torch.randint(0, 2 * p - 1, (80,), generator=g)
    d = (sums.view(-1, 1) - sums.view(1, -1)).double()
    sim = 0.6 * torch.cos(2 * math.pi * d / p) + 0.2 * torch.cos(2 * math.pi * d / 5)
    sim = sim + 0.02 * torch.randn(sim.shape, generator=g, dtype=torch.float64)
    fit = fit_similarity(sim, sums, p, alpha=1e-3)
    assert fit.leading_period == p
    names = [n for n, _ in fit.top(2)]
    assert names == [f"cos {p}", "cos 5"]
    assert fit.coefficients[f"cos {p}"] == pytest.approx(0.6, abs=0.02)
    assert fit.coefficients["cos 5"] == pytest.approx(0.2, abs=0.02)
    assert fit.r2 > 0.98
    assert "| cos 23 |" in fit.table(3)


def test_lasso_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(1)
    X = torch.randn(150, 8, generator=g, dtype=torch.float64)
    y = 2 * X[:, 0] - X[:, 3] + 0.1 * torch.randn(150, generator=g, dtype=torch.float64) + 0.5
    w, c, _ = lasso(X, y, alpha=0.05, tol=1e-12, max_iter=10000)
    ref = sklearn.Lasso(alpha=0.05, tol=1e-12, max_iter=100000).fit(X.numpy(), y.numpy())
    assert torch.allclose(w, torch.from_numpy(ref.coef_), atol=1e-8)
    assert c == pytest.approx(float(ref.intercept_), abs=1e-8)


def test_periodic_features_and_bad_input():
    X, names = periodic_features(torch.tensor([0, 3]), [2, 3])
    assert X.shape == (4, 4) and names == ["cos 2", "cos 3", "sin 2", "sin 3"]
    assert X[1, 1] == pytest.approx(1.0) and X[1, 0] == pytest.approx(-1.0)  # d = -3: cos(2π·(-3)/3), cos(-3π)
    with pytest.raises(ValueError, match="periods"):
        periodic_features(torch.tensor([0]), [1])
    with pytest.raises(ValueError, match="alpha"):
        lasso(X, X[:, 0], alpha=-1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("swap") / "run", GrokConfig.tiny(max_steps=8))


def test_swapping_into_the_final_checkpoint_changes_nothing_and_all_layers_give_theta_n(run):
    res = swap_layers(run, steps=[0, 4, 8])
    assert res.accuracy.shape == (3, 6) and res.steps == [0, 4, 8]
    assert torch.allclose(res.accuracy[-1], torch.full((6,), res.final, dtype=torch.float64))
    assert float(res.baseline[-1]) == pytest.approx(run.history.test_acc[-1])
    # swapping layer by layer only ever uses θ_N's values of that layer
    names = layer_parameters(run.model, "attention encoder")
    assert names == [f"head{i}_encoder.weight" for i in (1, 2)]
    with pytest.raises(ValueError, match="steps must lie"):
        swap_layers(run, steps=[9])


def test_retraining_keeps_frozen_grokked_layers(run):
    res = retrain_with(run, keep=[("decoder",)], max_steps=5, level=2.0)
    assert res.variants == ["from scratch", "grokked decoder"] and res.frozen
    assert res.steps_to_generalize == [None, None] and all(len(h.test_acc) == 5 for h in res.histories)
    final = run.model.decoder.weight
    assert torch.equal(res.models[1].decoder.weight, final)  # frozen at θ_N
    assert not torch.equal(res.models[0].decoder.weight, final)
    assert not torch.equal(res.models[1].linear1.weight, run.model.linear1.weight)  # the rest was trained afresh
    # a level reached at once is reported as step 1
    quick = retrain_with(run, keep=[], max_steps=3, level=0.0)
    assert quick.steps_to_generalize == [1]
