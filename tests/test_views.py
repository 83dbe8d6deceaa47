"""ParameterInfluence and StepInfluence: completeness, consistency between views, targets, errors.

Agreement with an independent brute-force dense influence tensor is in
``test_views_bruteforce.py``; here the views are checked against the real model output and
against each other.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from captum_explaind import ExactPathKernel, ParameterInfluence, StepInfluence
from captum_explaind.errors import TrajectoryError, TrajectoryMismatchError

from training import (
    OPTIMIZERS,
    SCHEDULERS,
    ReLUMLP,
    RunConfig,
    TanhMLP,
    TinyTransformer,
    make_data,
    outputs_at,
    record_run,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 40)
    cfg = RunConfig(OPTIMIZERS["adamw_groups"], steps=9, micro=2, clip=0.5, scheduler=SCHEDULERS["onecycle"])
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("views") / "t", cfg)
    return model, traj, X[:5], Y[:5]


def _true_change(model, traj, x, a=0, b=None):
    b = traj.num_steps if b is None else b
    return outputs_at(model, traj, x, b) - outputs_at(model, traj, x, a)


TARGETS = [None, 2, (1,), torch.tensor(0), [0, 1, 2, 0, 1], torch.tensor([2, 2, 1, 0, 0])]


def _select(change, target):
    n = change.shape[0]
    if target is None:
        return change.sum(1)
    if isinstance(target, tuple):
        return change[:, target[0]]
    if isinstance(target, torch.Tensor) and target.numel() == 1:
        return change[:, int(target)]
    if isinstance(target, int):
        return change[:, target]
    idx = torch.as_tensor(target)
    return change[torch.arange(n), idx]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: repr(t).replace(" ", ""))
def test_parameter_influence_complete_for_every_target_form(run, target):
    model, traj, x, _ = run
    scores, delta = ParameterInfluence(model, traj).attribute(x, target=target, return_convergence_delta=True)
    assert set(scores) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert scores[name].shape == (5, *p.shape)
    total = sum(v.reshape(5, -1).sum(1) for v in scores.values())
    change = _select(_true_change(model, traj, x), target)
    torch.testing.assert_close(total + delta, change, rtol=0, atol=1e-13)
    assert float(delta.abs().max()) < 1e-9 * float(change.abs().max())


def test_views_agree_with_each_other_and_reconstruct(run):
    model, traj, x, _ = run
    parts = ExactPathKernel(model, traj).reconstruct(x)
    pi = ParameterInfluence(model, traj)
    si = StepInfluence(model, traj)
    for comp, ref in (("kernel", parts.kernel), ("regularization", parts.regularization)):
        per_param = pi.attribute(x, target=1, component=comp)
        per_step = si.attribute(x, target=1, component=comp)
        sum_params = sum(v.reshape(5, -1).sum(1) for v in per_param.values())
        torch.testing.assert_close(sum_params, ref[:, 1], rtol=0, atol=1e-14)
        torch.testing.assert_close(per_step.sum(1), ref[:, 1], rtol=0, atol=1e-14)
    assert float(parts.regularization.abs().max()) > 1e-4


def test_module_scores_equal_sum_of_their_parameters(run):
    model, traj, x, _ = run
    pi = ParameterInfluence(model, traj)
    per_param = pi.attribute(x, target=[0, 1, 2, 0, 1])
    for method in ("vjp", "jvp"):
        by_module = pi.attribute(x, target=[0, 1, 2, 0, 1], layers=[model.fc1, "fc2"], method=method)
        assert by_module.shape == (5, 2)
        for g, mod in enumerate(("fc1", "fc2")):
            ref = per_param[f"{mod}.weight"].reshape(5, -1).sum(1) + per_param[f"{mod}.bias"].reshape(5, -1).sum(1)
            torch.testing.assert_close(by_module[:, g], ref, rtol=0, atol=1e-14)
    by_glob = pi.attribute(x, target=0, layers={"weights": "*.weight", "biases": "*bias"})
    w = pi.attribute(x, target=0)
    torch.testing.assert_close(
        by_glob["weights"], w["fc1.weight"].sum((1, 2)) + w["fc2.weight"].sum((1, 2)), rtol=0, atol=1e-14
    )


def test_windows_partition_the_run(run):
    model, traj, x, _ = run
    si = StepInfluence(model, traj)
    per_step, delta = si.attribute(x, target=2, return_convergence_delta=True)
    assert per_step.shape == (5, traj.num_steps)
    change = _true_change(model, traj, x)[:, 2]
    torch.testing.assert_close(per_step.sum(1) + delta, change, rtol=0, atol=1e-13)
    for k in (2, 4, 9):
        windows = si.attribute(x, target=2, window=k)
        assert windows.shape == (5, -(-traj.num_steps // k))
        torch.testing.assert_close(windows.sum(1), per_step.sum(1), rtol=0, atol=1e-14)
        used = si.explain(x, target=2, window=k).windows
        assert [len(r) for r in used][:-1] == [k] * (len(used) - 1)
    # explicit windows: each equals the sum of its steps, and matches the exact change over it
    w = si.attribute(x, target=2, window=[range(1, 4), range(4, 10)])
    torch.testing.assert_close(w[:, 0], per_step[:, :3].sum(1), rtol=0, atol=1e-14)
    torch.testing.assert_close(w[:, 1], per_step[:, 3:].sum(1), rtol=0, atol=1e-14)
    pi = ParameterInfluence(model, traj)
    scores, d = pi.attribute(x, target=2, steps=[range(1, 4), slice(4, None)], return_convergence_delta=True)
    assert scores["fc1.weight"].shape == (5, 2, 8, 5) and d.shape == (5, 2)
    tot = sum(v.reshape(5, 2, -1).sum(-1) for v in scores.values())
    torch.testing.assert_close(tot, w, rtol=0, atol=1e-14)
    first = _true_change(model, traj, x, 0, 3)[:, 2]
    torch.testing.assert_close(tot[:, 0] + d[:, 0], first, rtol=0, atol=1e-13)


def test_layers_per_window_and_balance(run):
    model, traj, x, _ = run
    si = StepInfluence(model, traj)
    both = si.attribute(x, target=1, window=3, component=["kernel", "regularization", "total"])
    torch.testing.assert_close(both["kernel"] + both["regularization"], both["total"], rtol=0, atol=1e-14)
    lay = si.attribute(x, target=1, window=3, layers=["fc1", "fc2"], component="total")
    assert lay.shape == (5, 3, 2)
    torch.testing.assert_close(lay.sum(-1), both["total"], rtol=0, atol=1e-14)
    lay_vjp = si.attribute(x, target=1, window=3, layers=["fc1", "fc2"], method="vjp")
    torch.testing.assert_close(lay, lay_vjp, rtol=0, atol=1e-14)
    imp = si.attribute(x, target=1, window=3, layers=["fc1", "fc2"], aggregate="abs_sum")
    torch.testing.assert_close(imp, lay.abs().sum(0), rtol=0, atol=0)


def test_per_layer_reverse_mode_through_refinement_equals_per_element_sums_and_forward_mode(tmp_path):
    # A ReLU network with large steps: steps are split at kinks, so rows are evaluated at their
    # own points (the shared-weight path) and the per-layer reverse mode projects each row's
    # gradient there. It must equal the per-element scores summed over each layer, forward mode,
    # and the true change.
    torch.manual_seed(3)
    model = ReLUMLP().double()
    X, Y = make_data("vector", 24)
    big_steps = lambda m: torch.optim.AdamW(m.parameters(), lr=0.2, weight_decay=0.1)  # noqa: E731
    cfg = RunConfig(big_steps, steps=6, micro=2)
    traj, _ = record_run(model, X, Y, tmp_path / "t", cfg)
    x = X[:6]
    layers = {"fc1": ["fc1.*"], "fc2": ["fc2.*"], "fc3": ["fc3.*"]}
    si = StepInfluence(model, traj)
    comps = ["kernel", "regularization"]
    rev = si.explain(x, target=1, window=2, layers=layers, component=comps, method="vjp")
    fwd = si.explain(x, target=1, window=2, layers=layers, component=comps, method="jvp")
    assert rev.stats.max_depth > 0  # refinement ran: rows at their own points
    truth = (outputs_at(model, traj, x, traj.num_steps) - outputs_at(model, traj, x, 0))[:, 1]
    scale = float(truth.abs().max())
    total = sum(rev.scores[c].sum((1, 2)) for c in comps)
    assert (total - truth).abs().max() < 1e-8 * scale
    for c in comps:
        torch.testing.assert_close(rev.scores[c], fwd.scores[c], rtol=0, atol=1e-8 * scale)
    per_el = ParameterInfluence(model, traj).attribute(x, target=1, component="total")
    for g, name in enumerate(layers):
        summed = sum(v.flatten(1).sum(1) for k, v in per_el.items() if k.startswith(name + "."))
        layer_total = sum(rev.scores[c][:, :, g].sum(1) for c in comps)
        torch.testing.assert_close(layer_total, summed, rtol=0, atol=1e-8 * scale)


def test_aggregates_and_regularization_influence(run):
    model, traj, x, _ = run
    pi = ParameterInfluence(model, traj)
    kern = pi.attribute(x, target=0, component="kernel")
    reg = pi.attribute(x, target=0, component="regularization")
    both = pi.attribute(x, target=0, component=["kernel", "regularization"])
    torch.testing.assert_close(both["kernel"]["fc1.weight"], kern["fc1.weight"], rtol=0, atol=0)
    summed = pi.attribute(x, target=0, aggregate="sum")
    imp = pi.attribute(x, target=0, aggregate="abs_sum")
    tot = pi.attribute(x, target=0)
    for name in tot:
        torch.testing.assert_close(summed[name], tot[name].sum(0), rtol=0, atol=1e-15)
        torch.testing.assert_close(imp[name], tot[name].abs().sum(0), rtol=0, atol=1e-15)
    D = pi.regularization_influence(x, target=0, layers=["fc1", "fc2"])
    ref = torch.stack([
        sum((kern[f"{m}.{p}"].abs() - reg[f"{m}.{p}"].abs()).sum() for p in ("weight", "bias")) for m in ("fc1", "fc2")
    ])
    torch.testing.assert_close(D, ref, rtol=0, atol=1e-14)


def test_pruning_by_importance(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP(hidden=16).double()
    X, Y = make_data("vector", 40)
    traj, _ = record_run(model, X, Y, tmp_path / "prune",
                         RunConfig(OPTIMIZERS["adamw"], steps=30, sizes=(40,)))
    pi = ParameterInfluence(model, traj)
    scores = pi.pruning_scores(X, target=Y.tolist(), parameters=["fc1.weight", "fc2.weight"])
    assert set(k[1] for k in scores) == {"weight"}
    assert all(v.shape == getattr(m, a).shape for (m, a), v in scores.items())

    def pruned_change(importance):
        m = copy.deepcopy(model)
        lookup = {id(mod): name for name, mod in model.named_modules()}
        params = [(m.get_submodule(lookup[id(mod)]), a) for (mod, a) in scores]
        imp = {(m.get_submodule(lookup[id(mod)]), a): v for (mod, a), v in importance.items()}
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, importance_scores=imp, amount=0.5)
        with torch.no_grad():
            return m, (m(X) - model(X)).abs().mean().item()

    pruned, change_low = pruned_change(scores)
    # exactly the half with the lowest importance was zeroed
    flat = torch.cat([v.reshape(-1) for v in scores.values()])
    masks = torch.cat([getattr(mod, a + "_mask").reshape(-1) for mod, a in
                       [(pruned.get_submodule(n), "weight") for n in ("fc1", "fc2")]])
    kept, removed = flat[masks.bool()], flat[~masks.bool()]
    assert removed.numel() == flat.numel() // 2 and float(removed.max()) <= float(kept.min())
    # L1Unstructured ranks |importance|, so reverse the order with max − v rather than −v
    top = float(flat.max())
    _, change_high = pruned_change({k: top - v for k, v in scores.items()})
    assert change_low < change_high  # pruning unimportant weights changes predictions less


def test_relu_transformer_views_complete(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().double()
    X, Y = make_data("tokens", 40)
    traj, _ = record_run(model, X, Y, tmp_path / "tf", RunConfig(OPTIMIZERS["sgd_nesterov"], steps=6, micro=2))
    x = X[:4]
    scores, delta = ParameterInfluence(model, traj).attribute(x, target=Y[:4], return_convergence_delta=True)
    change = _true_change(model, traj, x)[torch.arange(4), Y[:4]]
    total = sum(v.reshape(4, -1).sum(1) for v in scores.values())
    torch.testing.assert_close(total + delta, change, rtol=0, atol=1e-12)
    assert float(delta.abs().max()) < 1e-8 * float(change.abs().max())
    steps, d2 = StepInfluence(model, traj).attribute(x, target=Y[:4], layers=["emb", "qkv", "proj", "mlp_*", "head"],
                                                     return_convergence_delta=True)
    assert float(d2.abs().max()) < 1e-8


def test_bad_input(run, tmp_path):
    model, traj, x, _ = run
    pi = ParameterInfluence(model, traj)
    si = StepInfluence(model, traj)
    with pytest.raises(KeyError, match="'decoder' is neither"):
        pi.attribute(x, layers=["decoder"])
    with pytest.raises(KeyError, match="matches no parameter"):
        si.attribute(x, layers=["*.attn.*"])
    with pytest.raises(KeyError, match="not a submodule"):
        pi.attribute(x, layers=[nn.Linear(2, 2)])
    with pytest.raises(IndexError, match="out of range"):
        pi.attribute(x, target=3)
    with pytest.raises(IndexError, match="out of range"):
        si.attribute(x, target=[0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="one entry per example"):
        si.attribute(x, target=[0, 1])
    with pytest.raises(TrajectoryError, match="outside the trajectory"):
        pi.attribute(x, steps=range(5, 12))
    with pytest.raises(TrajectoryError, match="outside the trajectory"):
        si.attribute(x, steps=range(0, 3))
    with pytest.raises(ValueError, match="component"):
        si.attribute(x, component="momentum")
    with pytest.raises(ValueError, match="aggregate"):
        pi.attribute(x, aggregate="mean")
    with pytest.raises(TrajectoryMismatchError, match="fc1.weight"):
        ParameterInfluence(TanhMLP(hidden=4).double(), traj)
    with pytest.raises(TrajectoryMismatchError):
        StepInfluence(ReLUMLP().double(), traj)


def test_captum_conventions(run):
    from captum.attr import Attribution

    model, traj, x, _ = run
    for cls in (ParameterInfluence, StepInfluence):
        obj = cls(model, traj)
        assert isinstance(obj, Attribution)
        assert obj.has_convergence_delta()
        assert obj.forward_func is model
