"""Validation of the brute-force reference itself (tests/reference/bruteforce.py), not the library.

(a) the replay reproduces every recorded θ_s of real torch runs; (b) the dense tensor is complete;
(c) the update split leaves no residual in float64; (d) the wrong formulas of MATH.md §11 break
completeness, so these checks can fail; (e) gradient-step indexing has the same totals.
"""

from __future__ import annotations

import os

import pytest
import torch

from reference import bruteforce as bf
from training import OPTIMIZERS, SCHEDULERS, RunConfig, TanhMLP, TinyCNN, TinyTransformer, make_data, record_run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny float64 ops: intra-op threading only adds overhead (a lot of it on a loaded 2-core box).
    before = torch.get_num_threads()
    pass
    yield
    torch.set_num_threads(before)


def _record(tmp_path, name: str, optimizer: str, *, scheduler: str = "warmup_cosine", micro: int = 1,
            clip=None, steps: int = 8, model=None, data: str = "vector", n_train: int = 16,
            loss: str = "nll"):
    torch.manual_seed(0)
    model = (model if model is not None else TanhMLP(5, 6, 3)).double()
    X, Y = make_data(data, n_train)
    cfg = RunConfig(optimizer=OPTIMIZERS[optimizer], steps=steps, micro=micro, clip=clip,
                    scheduler=SCHEDULERS[scheduler] if scheduler else None, loss=loss)
    traj, _ = record_run(model, X, Y, os.path.join(tmp_path, name), cfg)
    assert bf.num_params(traj) <= 300
    return model, traj, X, Y


def _check_replay(rep, traj, residual_tol: float = 1e-12) -> None:
    theta = rep["theta"]
    # teacher-forced: θ_{s−1} + replayed update == θ_s, every step
    assert (theta[:-1] + rep["delta_replayed"] - theta[1:]).abs().max() <= 1e-10
    # free-running: θ_0 + Σ replayed updates == θ_N
    assert (theta[0] + rep["delta_replayed"].sum(0) - theta[-1]).abs().max() <= 1e-10
    # closed-form double sum == torch mimic, and nothing left unexplained
    split = rep["per_sample"].sum(1) + rep["reg"]
    assert (split - rep["delta_replayed"]).abs().max() <= 1e-12
    assert rep["residual"].abs().max() <= residual_tol
    if traj.family in ("adam", "adamw"):
        for s in range(1, traj.num_steps + 1):
            recorded = traj.state(s, "exp_avg_sq", dtype=torch.float64)
            for name, sl in bf.param_slices(traj).items():
                assert (rep["v"][s - 1, sl] - recorded[name].reshape(-1)).abs().max() <= 1e-15
            assert rep["records"][s - 1].state_step == {n: s for n in traj.trainable}


# ----------------------------------------------------------------------------- (a) replay
@pytest.mark.parametrize("scheduler", ["warmup_cosine", "onecycle"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_replay_matches_recorded_parameters(tmp_path, optimizer, scheduler):
    micro = 2 if sorted(OPTIMIZERS).index(optimizer) % 2 == 0 else 3
    model, traj, X, Y = _record(tmp_path, "run", optimizer, scheduler=scheduler, micro=micro, clip=0.6)
    rep = bf.replay(model, traj, X, Y, "nll")
    _check_replay(rep, traj)
    # the run really has unequal micro-batches and clipping active on some steps but not all
    assert all(len(set(sizes)) > 1 for sizes in rep["micro_sizes"])
    clip_coef = rep["c"] * micro  # c_s = clip coefficient × 1/n_micro
    assert (clip_coef < 1 - 1e-9).any() and (clip_coef > 1 - 1e-9).any()
    assert (clip_coef < 1 + 1e-12).all()


# The attention key bias has an identically zero true gradient (softmax is shift-invariant), so its
# gradient is ~1e-18 round-off noise, which Adam's first steps amplify by η/ε = 1e6 (u/(|u|+ε)):
# ~1e-12 in the update. The residual tolerance there is 1e-10; everywhere else 1e-12.
@pytest.mark.parametrize(
    "optimizer,model_fn,data,loss,micro,residual_tol",
    [
        ("adamw", lambda: TinyTransformer(vocab=7, d=4, heads=2, mlp=8, d_out=7), "tokens", "nll", 3, 1e-10),
        ("sgd_momentum", lambda: TinyTransformer(vocab=7, d=4, heads=2, mlp=8, d_out=7), "tokens", "nll", 2, 1e-12),
        ("sgd_nesterov", lambda: TinyCNN(), "image", "nll", 2, 1e-12),
        ("adam_l2_amsgrad", lambda: TanhMLP(5, 6, 3, log_softmax=False), "vector", "ce", 1, 1e-12),
        ("sgd_dampening", lambda: TanhMLP(5, 6, 3, log_softmax=False), "vector", "mse", 2, 1e-12),
    ],
)
def test_replay_other_models_and_losses(tmp_path, optimizer, model_fn, data, loss, micro, residual_tol):
    model, traj, X, Y = _record(tmp_path, "run", optimizer, model=model_fn(), data=data, loss=loss,
                                micro=micro, clip=0.6, scheduler="step")
    _check_replay(bf.replay(model, traj, X, Y, loss), traj, residual_tol)


# ----------------------------------------------------------------------------- (b), (c) completeness
COMPLETE_CASES = [
    ("adamw", "nll", 1),
    ("sgd_dampening", "nll", 2),
    ("sgd_nesterov", "ce", 1),
    ("adam_l2_amsgrad", "mse", 3),
]


@pytest.mark.parametrize("optimizer,loss,micro", COMPLETE_CASES)
def test_dense_completeness(tmp_path, optimizer, loss, micro):
    model = TanhMLP(5, 6, 3, log_softmax=(loss == "nll"))
    model, traj, X, Y = _record(tmp_path, "run", optimizer, model=model, loss=loss, micro=micro, clip=0.7)
    x_test, _ = make_data("vector", 4, seed=7)
    dense = bf.dense_influence(model, traj, X, Y, x_test, loss, nodes=8)
    N, P, Q, M, O = dense["Gamma"].shape
    assert (N, Q, M, O) == (8, 4, 16, 3)

    # (c) the split explains the recorded update exactly in float64
    assert dense["residual"].abs().max() <= 1e-12
    # (b) completeness, with and without the (≈0) residual term
    assert bf.completeness_error(dense, include_residual=True) <= 1e-9
    assert bf.completeness_error(dense, include_residual=False) <= 1e-9
    # FTC per step: Σ_p φ_s Δ_s == f_s − f_{s−1}
    per_step = bf.per_step_totals(dense, "all")
    assert (per_step - (dense["f"][1:] - dense["f"][:-1])).abs().max() <= 1e-10
    # composite rule agrees with the single-panel one
    phi2 = bf.phi(model, traj, x_test, 3, nodes=4, panels=3)
    assert (phi2 - dense["phi"][2]).abs().max() <= 1e-9

    # reducers are consistent partitions of the same total
    total = bf.kernel_total(dense)
    by_tensor = bf.per_param_tensor_totals(dense, traj, "kernel")
    assert (sum(by_tensor.values()) - total).abs().max() <= 1e-13
    assert (bf.per_train_sample_totals(dense).sum(1) - total).abs().max() <= 1e-13
    assert (bf.per_step_totals(dense).sum(0) - total).abs().max() <= 1e-13
    windows = bf.window_per_sample(dense, 1, 3) + bf.window_per_sample(dense, 4, 8)
    assert (windows - bf.per_train_sample_totals(dense)).abs().max() <= 1e-13
    assert (bf.window_totals(dense, 1, 5, "all") + bf.window_totals(dense, 6, 8, "all")
            - (dense["fN"] - dense["f0"])).abs().max() <= 1e-9


def test_similarity_bruteforce_matches_factorized(tmp_path):
    model, traj, X, Y = _record(tmp_path, "run", "adamw", micro=2, clip=0.7)
    x_test, _ = make_data("vector", 3, seed=7)
    dense = bf.dense_influence(model, traj, X, Y, x_test, "nll", nodes=6)
    assert abs(bf.cosine_similarity(dense, 1, 1) - 1.0) <= 1e-14
    for kw in [{}, {"steps": [0, 2, 5], "params": range(10, 40), "samples": [0, 3, 5, 9], "outputs": [1]},
               {"samples": slice(0, 8), "outputs": [0, 2]}]:
        brute = bf.cosine_similarity(dense, 0, 2, **kw)
        fact = bf.cosine_similarity_factorized(dense, 0, 2, **kw)
        assert abs(brute - fact) <= 1e-13
    D = bf.train_stat_D(dense["replay"])
    assert D.shape == dense["replay"]["reg"].shape and (D >= 0).all()


# ----------------------------------------------------------------------------- (d) negative controls
NEGATIVE = [
    # (optimizer, micro, loss, log-softmax outputs, variants that must break completeness)
    ("sgd_dampening", 1, "nll", True,
     ["lr_next", "no_clip", "damp_first", "indicator_at_application", "batch_size_of_application"]),
    ("adamw", 3, "nll", True, ["lr_next", "indicator_at_application", "uniform_batch"]),
    ("sgd_momentum", 1, "ce", False, ["loss_grad_outside", "no_clip"]),
]


@pytest.mark.parametrize("optimizer,micro,loss,log_softmax,broken", NEGATIVE)
def test_negative_controls_break_completeness(tmp_path, optimizer, micro, loss, log_softmax, broken):
    model = TanhMLP(5, 6, 3, log_softmax=log_softmax)
    model, traj, X, Y = _record(tmp_path, "run", optimizer, model=model, loss=loss, micro=micro, clip=0.7)
    x_test, _ = make_data("vector", 3, seed=7)
    dense = bf.dense_influence(model, traj, X, Y, x_test, loss, nodes=8)
    assert bf.completeness_error(dense, include_residual=False) <= 1e-9
    for variant in broken:
        wrong = bf.dense_influence(model, traj, X, Y, x_test, loss, nodes=8, rep=dense["replay"], variant=variant)
        err = bf.completeness_error(wrong, include_residual=False)
        assert err > 1e-4, f"{variant} should break completeness, got {err:.2e}"
        assert wrong["residual"].abs().max() > 1e-6
        # with the residual scores included the identity is a tautology of the FTC: it still closes
        assert bf.completeness_error(wrong, include_residual=True) <= 1e-9


def test_loss_grad_outside_is_exact_for_nll(tmp_path):
    """MATH §12 P5: factoring dL/df out of the momentum sum is exact for NLL on log-probs."""
    model, traj, X, Y = _record(tmp_path, "run", "sgd_momentum", clip=0.7)
    rep = bf.replay(model, traj, X, Y, "nll")
    per_sample, reg = bf.split_update(rep, "loss_grad_outside")
    assert (per_sample - rep["per_sample"]).abs().max() <= 1e-14


# ----------------------------------------------------------------------------- (e) indexing
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_nesterov", "sgd_plain"])
def test_gradient_step_indexing_same_totals(tmp_path, optimizer):
    model, traj, X, Y = _record(tmp_path, "run", optimizer, micro=2, clip=0.7)
    x_test, _ = make_data("vector", 3, seed=7)
    dense = bf.dense_influence(model, traj, X, Y, x_test, "nll", nodes=6)
    by_grad = bf.gradient_step_influence(dense)
    by_app = dense["Gamma"]
    assert by_grad.shape == by_app.shape
    assert (by_grad.sum(0) - by_app.sum(0)).abs().max() <= 1e-14
    per_step_grad, per_step_app = by_grad.sum(dim=(1, 3)), by_app.sum(dim=(1, 3))
    rel = float((per_step_grad - per_step_app).abs().max() / per_step_app.abs().max())
    if optimizer == "sgd_plain":
        assert rel <= 1e-12  # no momentum: the two indexings coincide
    else:
        assert rel > 0.05  # momentum: per-step slices differ by O(1)


# ----------------------------------------------------------------------------- inactive parameters
@pytest.mark.parametrize("optimizer", ["adamw", "adam_l2", "sgd_dampening"])
def test_replay_frozen_then_unfrozen_parameter(tmp_path, optimizer):
    """A parameter whose ``.grad`` is None on steps 1–3 is skipped by torch (no decay, no moment
    update, no Adam step count); the per-parameter bias corrections and SGD's undamped first
    buffer step must follow its own active steps (MATH §13)."""
    from captum_explaind import TrajectoryRecorder

    torch.manual_seed(0)
    model = TanhMLP(5, 6, 3).double()
    X, Y = make_data("vector", 16)
    opt = OPTIMIZERS[optimizer](model)
    sched = SCHEDULERS["step"](opt)
    rec = TrajectoryRecorder(model, opt, os.path.join(tmp_path, "run"), scheduler=sched)
    with rec:
        for s in range(8):
            model.fc1.weight.requires_grad_(s >= 3)
            opt.zero_grad(set_to_none=True)
            idx = torch.tensor([(3 * s + j) % 16 for j in range(4 + s % 3)])
            bf.per_sample_loss(model(X[idx]), Y[idx], "nll").mean().backward()
            rec.log_batch(idx)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.7)
            opt.step()
            sched.step()
    traj = rec.trajectory
    assert traj.record(1).inactive == ["fc1.weight"] and traj.record(4).inactive == []
    rep = bf.replay(model, traj, X, Y, "nll")
    sl = bf.param_slices(traj)["fc1.weight"]
    assert (rep["delta_actual"][:3, sl] == 0).all()
    theta = rep["theta"]
    assert (theta[:-1] + rep["delta_replayed"] - theta[1:]).abs().max() <= 1e-10
    assert rep["residual"].abs().max() <= 1e-12
    if traj.family != "sgd":
        assert traj.record(8).state_step["fc1.weight"] == 5 and traj.record(8).state_step["fc1.bias"] == 8
