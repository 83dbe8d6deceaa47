"""Pruning by ExPLAIND importance: the helpers against ``torch.nn.utils.prune`` and a brute force."""

from __future__ import annotations

import pytest
import torch
from test_batchnorm_data_view import BNNet, brute_phi, f_at, flat, record
from torch import nn
from torch.nn.utils import prune

from captum_explaind import ExactPathKernel, ParameterInfluence
from captum_explaind.pruning import (
    compare_outputs,
    magnitude_importance,
    model_at,
    prunable_weights,
    prune_filters_l1,
    prune_global,
    psi_importance,
    random_importance,
    remove_reparametrization,
    sparsity,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(3)
    model = BNNet().double()
    X = torch.randn(16, 1, 5, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (16,))
    traj = record(model, X, Y, tmp_path_factory.mktemp("prune") / "run")
    return model, traj, X, Y


def test_model_at_holds_the_recorded_parameters_and_buffers(run):
    model, traj, X, _ = run
    final = model_at(model, traj)
    assert not final.training
    with torch.no_grad():
        torch.testing.assert_close(final(X), f_at(model, traj, X, traj.num_steps), rtol=0, atol=0)
        torch.testing.assert_close(model_at(model, traj, 0)(X), f_at(model, traj, X, 0), rtol=0, atol=0)


def test_psi_importance_is_eq6_against_brute_force(run):
    """Σ_x Σ_j |Σ_s Φ_s(x)_{j,p} Δ_{s,p}| with Φ from explicit Jacobians; keyed for global_unstructured."""
    model, traj, X, _ = run
    x = X[:4]
    final = model_at(model, traj)
    keys = prunable_weights(final, exclude=["fc2"])
    assert [final.conv, final.fc1] == [m for m, _ in keys]
    imp = psi_importance(ParameterInfluence(model, traj), x, range(3), final, parameters=keys)
    assert list(imp) == keys
    N = traj.num_steps
    psi = sum(brute_phi(model, traj, x, s) * (flat(traj, s) - flat(traj, s - 1)) for s in range(1, N + 1))  # [Q, O, P]
    ref = psi.abs().sum((0, 1))
    start, pos = {}, 0
    for n in traj.trainable:
        start[n] = pos
        pos += int(torch.Size(traj.spec[n].shape).numel())
    for (m, a), v in imp.items():
        name = {id(mod): nm for nm, mod in final.named_modules()}[id(m)] + "." + a
        sl = slice(start[name], start[name] + v.numel())
        torch.testing.assert_close(v.reshape(-1), ref[sl], rtol=1e-9, atol=1e-12)


def test_prune_global_removes_exactly_the_least_important(run):
    model, traj, X, _ = run
    final = model_at(model, traj)
    keys = prunable_weights(final, exclude=[final.fc2])
    imp = psi_importance(ParameterInfluence(model, traj), X[:4], [0], final, parameters=keys)
    prune_global(imp, 0.6)
    scores = torch.cat([v.reshape(-1) for v in imp.values()])
    masks = torch.cat([m.get_buffer("weight_mask").reshape(-1) for m, _ in keys])
    k = round(0.6 * scores.numel())
    assert int((masks == 0).sum()) == k
    assert float(scores[masks == 0].max()) <= float(scores[masks == 1].min())
    assert sparsity(keys) == pytest.approx(k / scores.numel())
    assert not hasattr(final.fc2, "weight_mask")  # the output layer is kept
    # the same masks as torch's own global pruning on a fresh copy
    other = model_at(model, traj)
    other_keys = prunable_weights(other, exclude=["fc2"])
    prune.global_unstructured(other_keys, pruning_method=prune.L1Unstructured,
                              importance_scores={k2: v for k2, v in zip(other_keys, imp.values())}, amount=0.6)
    for (m1, _), (m2, _) in zip(keys, other_keys):
        assert torch.equal(m1.get_buffer("weight_mask"), m2.get_buffer("weight_mask"))
    remove_reparametrization(keys)
    assert not hasattr(final.conv, "weight_orig") and sparsity(keys) == pytest.approx(k / scores.numel())
    with pytest.raises(ValueError, match="amount"):
        prune_global(imp, 1.5)


def test_pruning_unimportant_weights_changes_predictions_less(run):
    model, traj, X, _ = run
    final = model_at(model, traj)
    names = {id(m): n for n, m in final.named_modules()}
    imp = {names[id(m)]: v for (m, _), v in psi_importance(ParameterInfluence(model, traj), X[:8], range(3), final,
                                                           parameters=prunable_weights(final, exclude=["fc2"])).items()}
    top = max(float(v.max()) for v in imp.values())

    def kl_after(scores):
        m = model_at(model, traj)
        prune_global({(m.get_submodule(n), "weight"): v for n, v in scores.items()}, 0.5)
        with torch.no_grad():
            return compare_outputs(final(X), m(X), X.new_zeros(len(X)).long())["kl"]

    assert kl_after(imp) < kl_after({n: top - v for n, v in imp.items()})


def test_baseline_scores_and_filter_pruning(run):
    model, traj, _, _ = run
    m = model_at(model, traj)
    keys = prunable_weights(m, exclude=["fc2"])
    mag = magnitude_importance(keys)
    assert all(torch.equal(v, k[0].weight.detach().abs()) for k, v in mag.items())
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    r1, r2 = random_importance(keys, g1), random_importance(keys, g2)
    assert all(torch.equal(r1[k], r2[k]) for k in keys)
    l1 = m.conv.weight.detach().abs().flatten(1).sum(1)
    prune_filters_l1(m, 2 / 3, exclude=["fc1"])
    mask = m.conv.get_buffer("weight_mask")
    kept = mask.flatten(1).amax(1)
    assert int(kept.sum()) == 1 and int(kept.argmax()) == int(l1.argmax())  # the largest-L1 filter survives
    assert torch.equal(mask, kept.view(-1, 1, 1, 1).expand_as(mask))
    assert torch.equal(m.bn.get_buffer("weight_mask"), kept) and torch.equal(m.bn.get_buffer("bias_mask"), kept)
    assert not hasattr(m.fc1, "weight_mask") and not hasattr(m.bn1, "weight_mask")


def test_compare_outputs():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    same = compare_outputs(ref, ref, torch.tensor([0, 1, 1]))
    assert same == {"accuracy": pytest.approx(2 / 3), "agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-7)}
    flipped = compare_outputs(ref, ref.flip(1), torch.tensor([0, 1, 1]))
    assert flipped["agreement"] == 0.0 and flipped["kl"] > 0


def test_pruning_scores_keyed_by_another_model(run):
    """pruning_scores(model=...) keys the scores by a copy's modules (e.g. the trained one)."""
    model, traj, X, _ = run
    final = model_at(model, traj)
    scores = ParameterInfluence(model, traj).pruning_scores(X[:2], target=0, parameters=["conv.weight"], model=final)
    assert list(scores) == [(final.conv, "weight")]
    parts = ExactPathKernel(model, traj).reconstruct(X[:2])
    assert float(parts.buffers.abs().max()) > 0  # a BatchNorm run: Ψ still covers the parameters only
    with pytest.raises(KeyError, match="nothing_here"):
        ParameterInfluence(model, traj).pruning_scores(X[:2], target=0, parameters=["nothing_here"])


def test_prunable_weights_skips_norms_and_excluded():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    assert [m for m, _ in prunable_weights(net)] == [net[0], net[3]]
    assert [m for m, _ in prunable_weights(net, exclude=["3"])] == [net[0]]


def test_plot_pruning_draws_each_metric():
    import matplotlib

    matplotlib.use("Agg")
    from captum_explaind.visualization import plot_pruning

    levels = (0.7, 0.9, 0.99)
    summary = {m: {k: [[0.9, 0.6, 0.5], [0.05, 0.1, 0.0]] for k in ("accuracy", "agreement", "kl")}
               for m in ("explaind", "magnitude")}
    fig = plot_pruning(levels, summary)
    assert len(fig.axes) == 3 and all(len(ax.lines) == 2 for ax in fig.axes)
    assert fig.axes[2].get_yscale() == "log"
