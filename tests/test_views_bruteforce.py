"""Model and training views against the independent brute-force dense influence tensor.

The reference (``tests/reference/bruteforce.py``) replays the optimizer from per-sample
gradients, splits each update with explicit closed-form momentum weights, and integrates
explicit Jacobians (``torch.func.jacrev``) with 16-node Gauss–Legendre — none of the library's
recurrences, masks or adaptive quadrature. Here its dense tensor Γ[s, p, q, k, j], Reg[s, p, q, j]
and Res[s, p, q, j] is reduced and compared with ``reconstruct``, ``ParameterInfluence`` and
``StepInfluence`` on smooth models (where 16 nodes are exact to round-off).
"""

from __future__ import annotations

import pytest
import torch

from captum_explaind import ExactPathKernel, ParameterInfluence, StepInfluence

from reference import bruteforce as bf
from training import OPTIMIZERS, SCHEDULERS, RunConfig, TanhMLP, TinyCNN, make_data, record_run

ATOL = 1e-12

CASES = [
    ("tanh_mlp", "sgd_plain", "step", "nll"),
    ("tanh_mlp", "sgd_momentum", "onecycle", "nll"),  # one-cycle also cycles the momentum
    ("tanh_mlp", "sgd_dampening", "cosine", "nll"),
    ("tanh_mlp", "sgd_nesterov", "warmup_cosine", "ce"),
    ("tanh_mlp", "adam_l2", "onecycle", "nll"),  # ... and Adam's beta1
    ("tanh_mlp", "adam_l2_amsgrad", "step", "mse"),
    ("tanh_mlp", "adamw_groups", "warmup_cosine", "nll"),
    ("cnn", "adamw", "cosine", "nll"),
    ("cnn", "sgd_nesterov", "step", "nll"),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def case(request, tmp_path_factory):
    model_name, opt, sched, loss = request.param
    torch.manual_seed(0)
    if model_name == "tanh_mlp":
        model = TanhMLP(log_softmax=loss == "nll").double()
        X, Y = make_data("vector", 24)
    else:
        model = TinyCNN().double()
        X, Y = make_data("image", 24)
    cfg = RunConfig(OPTIMIZERS[opt], steps=7, micro=2, clip=0.6, sizes=(5, 3, 4, 6),
                    scheduler=SCHEDULERS[sched], loss=loss)
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("bf") / "run", cfg)
    x = X[:4]
    dense = bf.dense_influence(model, traj, X, Y, x, loss, nodes=16)
    return model, traj, x, dense


def test_reconstruct_parts_equal_bruteforce(case):
    model, traj, x, dense = case
    r = ExactPathKernel(model, traj).reconstruct(x)
    # The model view has no per-sample replay: its kernel part is Φ·(Δ − R), i.e. the
    # brute force's per-sample kernel plus its (round-off sized) residual.
    torch.testing.assert_close(r.regularization, bf.reg_total(dense), rtol=0, atol=ATOL)
    torch.testing.assert_close(r.kernel, bf.kernel_total(dense) + bf.residual_total(dense), rtol=0, atol=ATOL)
    torch.testing.assert_close(r.initial, dense["f0"], rtol=0, atol=1e-14)
    torch.testing.assert_close(r.final, dense["fN"], rtol=0, atol=1e-14)


def test_parameter_influence_equals_bruteforce(case):
    model, traj, x, dense = case
    pi = ParameterInfluence(model, traj)
    target = torch.tensor([0, 2, 1, 1])
    for comp, part in (("kernel", "kernel"), ("regularization", "reg")):
        scores = pi.attribute(x, target=target, component=comp)
        ref = bf.per_param_tensor_totals(dense, traj, part)  # name -> [Q, O] summed over elements
        per_elem = _per_element(dense, traj, part)  # name -> [Q, O, *shape]
        for name, val in scores.items():
            want = per_elem[name][torch.arange(4), target]
            torch.testing.assert_close(val, want, rtol=0, atol=ATOL)
            torch.testing.assert_close(val.reshape(4, -1).sum(1), ref[name][torch.arange(4), target], rtol=0, atol=ATOL)


def test_step_influence_equals_bruteforce(case):
    model, traj, x, dense = case
    si = StepInfluence(model, traj)
    got = si.attribute(x, target=None, component=["kernel", "regularization"])
    ref_k = bf.per_step_totals(dense, "kernel") + bf.per_step_totals(dense, "res")  # [N, Q, O]
    ref_r = bf.per_step_totals(dense, "reg")
    torch.testing.assert_close(got["kernel"], ref_k.sum(-1).T, rtol=0, atol=ATOL)
    torch.testing.assert_close(got["regularization"], ref_r.sum(-1).T, rtol=0, atol=ATOL)
    # a window and a per-layer split of it
    names = [n for n, _ in model.named_parameters()]
    first = names[:2]
    lay = si.attribute(x, target=1, window=[range(2, 6)], layers={"first": first, "rest": names[2:]}, component="total")
    slices = bf.param_slices(traj)
    reg_all = dense["Gamma"].sum(3) + dense["Reg"] + dense["Res"]  # [N, P, Q, O]
    mask = torch.zeros(reg_all.shape[1], dtype=torch.bool)
    for n in first:
        mask[slices[n]] = True
    want_first = reg_all[1:5][:, mask].sum((0, 1))[:, 1]
    want_rest = reg_all[1:5][:, ~mask].sum((0, 1))[:, 1]
    torch.testing.assert_close(lay["first"][:, 0], want_first, rtol=0, atol=ATOL)
    torch.testing.assert_close(lay["rest"][:, 0], want_rest, rtol=0, atol=ATOL)


def _per_element(dense, traj, part):
    """Brute-force per-element scores summed over steps (and training samples): name -> [Q, O, *shape]."""
    if part == "kernel":
        full = dense["Gamma"].sum(3) + dense["Res"]  # [N, P, Q, O]
    else:
        full = dense["Reg"]
    tot = full.sum(0)  # [P, Q, O]
    out = {}
    for name, sl in bf.param_slices(traj).items():
        shape = traj.spec[name].shape
        out[name] = tot[sl].permute(1, 2, 0).reshape(tot.shape[1], tot.shape[2], *shape)
    return out
