"""TrainingDataInfluence and PredictionSimilarity against the brute-force dense tensor.

The reference (``tests/reference/bruteforce.py``) builds Γ[s, p, q, k, j] explicitly: it
replays the optimizer from per-sample gradients with closed-form momentum weights and integrates
explicit Jacobians. The library never builds that tensor; it sweeps backwards with one
accumulator per test input. They must agree to round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import PredictionSimilarity, TrainingDataInfluence, TrajectoryRecorder
from captum_explaind.errors import MissingOptimizerStateError, UnsupportedOptimizerError

from reference import bruteforce as bf
from training import (
    OPTIMIZERS,
    SCHEDULERS,
    RunConfig,
    TanhMLP,
    TinyCNN,
    TinyTransformer,
    loss_fn_for,
    make_data,
    record_run,
)

ATOL = 1e-12

CASES = [
    ("sgd_momentum", "onecycle", "nll", 1),
    ("sgd_dampening", "cosine", "nll", 2),
    ("sgd_nesterov", "step", "ce", 3),
    ("sgd_plain", "warmup_cosine", "mse", 1),
    ("adam_l2", "onecycle", "nll", 2),
    ("adam_l2_amsgrad", "warmup_cosine", "ce", 2),
    ("adamw_groups", "step", "nll", 3),
]


def _cross_entropy_mse(out, y):
    # MSE against one-hot labels, written without one_hot() so it also runs under vmap
    target = torch.zeros_like(out).scatter(1, y.view(-1, 1), 1.0)
    return ((out - target) ** 2).sum(-1)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(str, c)))
def case(request, tmp_path_factory):
    opt, sched, loss, micro = request.param
    torch.manual_seed(0)
    model = TanhMLP(log_softmax=loss == "nll").double()
    X, Y = make_data("vector", 24)
    # varying batch sizes and composition, one duplicated sample (step 2), clipping, a schedule,
    # gradient accumulation over unequal micro-batches
    cfg = RunConfig(OPTIMIZERS[opt], steps=7, micro=micro, clip=0.6, sizes=(5, 3, 4, 6),
                    scheduler=SCHEDULERS[sched], loss=loss)
    traj, batches = record_run(model, X, Y, tmp_path_factory.mktemp("data") / "run", cfg)
    assert len(set(batches[1][0])) < len(batches[1][0])  # the duplicate is really there
    x = X[:4]
    dense = bf.dense_influence(model, traj, X, Y, x, loss, nodes=16)
    lf = _cross_entropy_mse if loss == "mse" else loss_fn_for(loss)
    return model, traj, X, Y, x, dense, lf


def test_scores_equal_bruteforce_and_are_complete(case):
    model, traj, X, Y, x, dense, lf = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf)
    target = torch.tensor([0, 2, 1, 1])
    res = tdi.decompose(x, target=target)
    q = torch.arange(4)
    ref = bf.per_train_sample_totals(dense)[q, :, target]  # [Q, M]
    assert res.scores.shape == (4, len(X))
    torch.testing.assert_close(res.scores, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(res.regularization, bf.reg_total(dense)[q, target], rtol=0, atol=ATOL)
    torch.testing.assert_close(res.residual, bf.residual_total(dense)[q, target], rtol=0, atol=ATOL)
    change = (dense["fN"] - dense["f0"])[q, target]
    torch.testing.assert_close(res.change, change, rtol=0, atol=1e-14)
    total = res.scores.sum(1) + res.regularization + res.residual
    torch.testing.assert_close(total + res.delta, change, rtol=0, atol=1e-14)
    assert float(res.delta.abs().max()) < 1e-9 * float(change.abs().max())
    assert float(res.residual.abs().max()) < 1e-12  # float64, deterministic, supported optimizer
    # the measured gradient scale includes clipping: some steps were clipped
    assert min(res.grad_scale.values()) < 0.999 * max(res.grad_scale.values())
    scores, delta = tdi.attribute(x, target=target, return_convergence_delta=True)
    torch.testing.assert_close(scores, res.scores, rtol=0, atol=0)
    torch.testing.assert_close(delta, res.delta, rtol=0, atol=0)


def test_windows_in_both_indexings_equal_their_definitions(case):
    model, traj, X, Y, x, dense, lf = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf)
    windows = [range(1, 3), range(3, 6), range(6, 8)]
    q = torch.arange(4)
    target = torch.tensor([1, 1, 0, 2])
    app = tdi.attribute(x, target=target, steps=windows)
    grad = tdi.attribute(x, target=target, steps=windows, indexing="gradient")
    by_grad = bf.gradient_step_influence(dense)  # [N, P, Q, M, O], credit at the gradient step
    assert app.shape == (4, len(X), 3)
    for w, r in enumerate(windows):
        a, b = r.start, r.stop - 1
        ref_app = bf.window_per_sample(dense, a, b)[q, :, target]
        ref_grad = by_grad[a - 1 : b].sum((0, 1))[q, :, target]
        torch.testing.assert_close(app[:, :, w], ref_app, rtol=0, atol=ATOL)
        torch.testing.assert_close(grad[:, :, w], ref_grad, rtol=0, atol=ATOL)
    torch.testing.assert_close(app.sum(2), grad.sum(2), rtol=0, atol=ATOL)
    # a single window not at the start still credits earlier gradients through momentum
    late = tdi.attribute(x, target=target, steps=range(5, 8))
    torch.testing.assert_close(late, bf.window_per_sample(dense, 5, 7)[q, :, target], rtol=0, atol=ATOL)


def test_overlapping_windows_share_one_sweep(case):
    # application indexing: a step in two windows credits both; each window of the list decomposes
    # its own change exactly as a call for that window alone (and as the brute-force reference)
    model, traj, X, Y, x, dense, lf = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf)
    windows = [range(2, 5), range(4, 8), range(1, 8), range(6, 7)]
    q = torch.arange(4)
    target = torch.tensor([2, 0, 1, 1])
    both = tdi.explain(x, target=target, steps=windows, layers=["fc1"])
    assert both.per_window is not None and both.scores.shape == (4, len(X), 4, 1)
    change = (dense["fN"] - dense["f0"])[q, target]
    for w, r in enumerate(windows):
        one = tdi.explain(x, target=target, steps=r, layers=["fc1"])
        part = both.window(w)
        assert part.windows == [r] and part.scores.shape == one.scores.shape
        for name in ("scores", "other", "regularization", "residual", "change", "delta", "buffers"):
            torch.testing.assert_close(getattr(part, name), getattr(one, name), rtol=0, atol=ATOL, msg=name)
        full = tdi.attribute(x, target=target, steps=r)
        ref = bf.window_per_sample(dense, r.start, r.stop - 1)[q, :, target]
        torch.testing.assert_close(full, ref, rtol=0, atol=ATOL)
        total = part.scores.sum((1, 2)) + part.other + part.regularization + part.residual + part.buffers
        torch.testing.assert_close(total + part.delta, part.change, rtol=0, atol=1e-13)
    # the whole run's window reaches the true change; totals are the sums over the windows
    torch.testing.assert_close(both.window(2).change, change, rtol=0, atol=1e-13)
    torch.testing.assert_close(both.change, both.per_window["change"].sum(1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="per-window"):
        tdi.explain(x, target=target, steps=range(1, 8)).window(0)
    with pytest.raises(IndexError, match="out of range"):
        both.window(4)


def test_layers_split_the_scores(case):
    model, traj, X, Y, x, dense, lf = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf)
    per_layer = tdi.attribute(x, target=2, layers=["fc1", "fc2"])
    whole = tdi.attribute(x, target=2)
    assert per_layer.shape == (4, len(X), 2)
    torch.testing.assert_close(per_layer.sum(-1), whole, rtol=0, atol=ATOL)
    sl = bf.param_slices(traj)
    G = dense["Gamma"].sum(0)  # [P, Q, M, O]
    ref_fc1 = G[sl["fc1.weight"]].sum(0) + G[sl["fc1.bias"]].sum(0)
    torch.testing.assert_close(per_layer[..., 0], ref_fc1[..., 2], rtol=0, atol=ATOL)


def test_influence_api_and_topk(case):
    model, traj, X, Y, x, dense, lf = case
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf)
    y = Y[:4]
    full = tdi.influence((x, y))
    torch.testing.assert_close(full, tdi.attribute(x, target=y), rtol=0, atol=0)
    for proponents in (True, False):
        top = tdi.influence((x, y), k=5, proponents=proponents)
        order = torch.sort(full, dim=1, descending=proponents)
        torch.testing.assert_close(top.influence_scores, order.values[:, :5], rtol=0, atol=0)
        torch.testing.assert_close(full.gather(1, top.indices), top.influence_scores, rtol=0, atol=0)


def test_similarity_equals_bruteforce_cosine(case):
    model, traj, X, Y, x, dense, lf = case
    ps = PredictionSimilarity(model, traj, TensorDataset(X, Y), loss_fn=lf)
    S = ps.attribute(x)
    ref = torch.tensor([[bf.cosine_similarity(dense, i, j) for j in range(4)] for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)
    sl = bf.param_slices(traj)
    P = bf.num_params(traj)
    params = torch.cat([torch.arange(P)[sl["fc1.weight"]], torch.arange(P)[sl["fc1.bias"]]])
    S2 = ps.attribute(x[:2], others=x[2:], target=[1, 0], other_target=[2, 2], layers="fc1",
                      steps=range(2, 6), train_subset=range(6, 20))
    ref2 = torch.zeros(2, 2, dtype=torch.float64)
    for i, ti in enumerate([1, 0]):
        for j, tj in enumerate([2, 2]):
            a = dense["Gamma"][1:5][:, params][:, :, i][:, :, 6:20][..., ti]
            b = dense["Gamma"][1:5][:, params][:, :, 2 + j][:, :, 6:20][..., tj]
            ref2[i, j] = (a * b).sum() / (a.norm() * b.norm())
    torch.testing.assert_close(S2, ref2, rtol=0, atol=1e-12)
    # data-perspective similarity: cosine of per-training-sample score vectors
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf)
    scores = tdi.attribute(x, target=1)
    cos = tdi.data_similarity(x, target=1)
    ref3 = torch.nn.functional.cosine_similarity(scores.unsqueeze(1), scores.unsqueeze(0), dim=-1)
    torch.testing.assert_close(cos, ref3, rtol=0, atol=1e-12)


def test_left_endpoint_rule_matches_captum_tracincp(tmp_path):
    """Plain full-batch SGD with the left-endpoint rule is TracIn over every step's checkpoint.

    Γ(x, k) = −Σ_i η_i a_{i,k} ⟨∇L_k(θ_{i−1}), ∇f_y(θ_{i−1}; x)⟩ with a = 1/M, while TracInCP sums
    lr_c ⟨∇f_y, ∇L_k⟩ over checkpoints θ_c: so ours = −TracInCP / M.
    """
    from captum.influence import TracInCP

    torch.manual_seed(0)
    model = TanhMLP(log_softmax=False).double()
    X, Y = make_data("vector", 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    with TrajectoryRecorder(model, opt, tmp_path / "sgd") as rec:
        for _ in range(5):  # full-batch gradient descent: every sample once per step
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), Y).backward()
            rec.log_batch(torch.arange(len(X)))
            opt.step()
            sched.step()
    traj = rec.trajectory
    ckpts = []
    for s in range(traj.num_steps):
        path = tmp_path / f"ckpt_{s}.pt"
        torch.save({**traj.params(s), "learning_rate": traj.record(s + 1).lr[0]}, path)
        ckpts.append(str(path))

    def load(m, path):
        state = torch.load(path)
        lr = state.pop("learning_rate")
        m.load_state_dict(state)
        return lr

    x, y = X[:3], Y[:3]
    tracin = TracInCP(copy.deepcopy(model), TensorDataset(X, Y), ckpts, checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=16,
                      test_loss_fn=lambda out, t: out.gather(1, t.view(-1, 1)).squeeze(1),
                      sample_wise_grads_per_batch=False)
    ref = tracin.influence((x, y))
    ours = TrainingDataInfluence(model, traj, TensorDataset(X, Y), quadrature="left", nodes=1).influence((x, y))
    torch.testing.assert_close(ours, -ref / len(X), rtol=1e-10, atol=1e-12)
    # ... and the exact path integral differs from that first-order approximation
    exact = TrainingDataInfluence(model, traj, TensorDataset(X, Y)).influence((x, y))
    assert float((exact - ours).abs().max()) > 1e-6


def test_attention_and_cnn_models(tmp_path):
    for cls, kind, opt in ((TinyTransformer, "tokens", "adamw"), (TinyCNN, "image", "sgd_nesterov")):
        torch.manual_seed(0)
        model = cls().double()
        X, Y = make_data(kind, 20)
        traj, _ = record_run(model, X, Y, tmp_path / kind, RunConfig(OPTIMIZERS[opt], steps=5, micro=2, clip=1.0))
        tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=nn.NLLLoss(reduction="none"))
        res = tdi.decompose(X[:3], target=Y[:3])
        change = res.scores.sum(1) + res.regularization + res.residual + res.delta
        torch.testing.assert_close(change, res.change, rtol=0, atol=1e-13)
        # the attention key bias has an identically-zero gradient; Adam amplifies its round-off
        assert float(res.residual.abs().max()) < 1e-10
        assert float(res.delta.abs().max()) < 1e-8 * float(res.change.abs().max())


def test_vmap_and_loop_paths_agree(case, monkeypatch):
    """vmap: the training side from each parameter's weighted per-sample gradients (no [m, P]
    concatenation); loop: the flat per-sample gradients, weighted after. Same scores, per layer too."""
    from captum_explaind.epk import train_grads

    model, traj, X, Y, x, dense, lf = case
    used = {"weighted_param_grads": 0, "per_sample_loss_grads": 0}
    def spying(name, orig):
        def spy(*a, **k):
            used[name] += 1
            return orig(*a, **k)
        return spy

    for name in used:
        monkeypatch.setattr(train_grads, name, spying(name, getattr(train_grads, name)))
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf, train_batch_size=3, per_sample="vmap")
    a, a_layers = tdi.attribute(x, target=1), tdi.attribute(x, target=1, layers=["fc1", "fc2"])
    assert used["weighted_param_grads"] > 0 and used["per_sample_loss_grads"] == 0, used
    loop = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf, train_batch_size=3, per_sample="loop")
    b, b_layers = loop.attribute(x, target=1), loop.attribute(x, target=1, layers=["fc1", "fc2"])
    assert used["per_sample_loss_grads"] > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    torch.testing.assert_close(a_layers, b_layers, rtol=0, atol=1e-13)


def test_default_chunking_bounds_per_sample_gradients(case, monkeypatch):
    """By default a step's per-sample gradients come in memory-bounded chunks; same scores."""
    from captum_explaind.epk import training_set as _train_data

    assert _train_data.sample_chunk(None, 10_000, 1_000_000, torch.float64) == _train_data.GRAD_CALL_BYTES // 8_000_000
    assert _train_data.sample_chunk(None, 5, 100, torch.float32) == 5
    assert _train_data.sample_chunk(7, 5, 100, torch.float32) == 7
    model, traj, X, Y, x, dense, lf = case
    whole = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf).attribute(x, target=1)
    calls = []
    real = _train_data.sample_chunk
    monkeypatch.setattr(_train_data, "GRAD_CALL_BYTES", 1)  # one sample per per-sample-gradient call

    def spy(*a):
        calls.append(real(*a))
        return calls[-1]

    import captum_explaind.epk.train_grads as tg  # the per-sample gradient computers chunk the samples
    monkeypatch.setattr(tg, "sample_chunk", spy)
    chunked = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf).attribute(x, target=1)
    assert calls and set(calls) == {1}
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)


def test_decayed_window_stops_the_sweep(tmp_path, monkeypatch):
    """A window late in a run with little momentum: its accumulator decays below round-off a few
    steps before the window (β = 0.1 per step), so the sweep drops it and stops there. The scores
    equal the brute-force reference, and a sweep that never drops (tolerance 0) visits the early
    steps with no change to them."""
    from captum_explaind.epk.data_view import DataView

    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 24)
    cfg = RunConfig(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.1), steps=30)
    traj, _ = record_run(model, X, Y, tmp_path / "run", cfg)
    x, target = X[:3], torch.tensor([0, 2, 1])
    seen = []
    real = DataView._test_side

    def spy(self, seg, *a, **k):
        seen.append(seg.step)
        return real(self, seg, *a, **k)

    monkeypatch.setattr(DataView, "_test_side", spy)
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    dropped = tdi.attribute(x, target=target, steps=range(26, 29))
    visited, seen[:] = sorted(seen), []
    assert visited[0] > 1 and visited[-1] == 28  # stopped before step 1 ...
    assert min(visited) < 26  # ... after crediting earlier gradients through momentum
    monkeypatch.setattr(DataView, "__init__", _no_drop(DataView.__init__))
    kept = tdi.attribute(x, target=target, steps=range(26, 29))
    assert sorted(seen) == list(range(1, 29))
    torch.testing.assert_close(dropped, kept, rtol=0, atol=1e-15)
    dense = bf.dense_influence(model, traj, X, Y, x, "nll", nodes=16)
    torch.testing.assert_close(dropped, bf.window_per_sample(dense, 26, 28)[torch.arange(3), :, target],
                               rtol=0, atol=ATOL)


def _no_drop(init):
    def wrapped(self, *a, **k):
        init(self, *a, **k)
        self._tiny = 0.0  # drop a window only where its accumulator is exactly zero

    return wrapped


def test_float32_trajectory_reports_its_residual(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP()
    X, Y = make_data("vector", 24, dtype=torch.float32)
    traj, _ = record_run(model, X, Y, tmp_path / "f32", RunConfig(OPTIMIZERS["adamw"], steps=6, clip=0.5))
    res = TrainingDataInfluence(model, traj, TensorDataset(X, Y), dtype=torch.float64).decompose(X[:3], target=Y[:3])
    # float32 training: the replay cannot close the update exactly; the rest is reported, not hidden
    assert 0 < float(res.residual.abs().max()) < 1e-4
    total = res.scores.sum(1) + res.regularization + res.residual + res.delta
    torch.testing.assert_close(total, res.change, rtol=0, atol=1e-12)


def test_bad_input(case, tmp_path):
    model, traj, X, Y, x, dense, lf = case
    with pytest.raises(ValueError, match="train_dataset has 10 samples but step"):
        TrainingDataInfluence(model, traj, TensorDataset(X[:10], Y[:10]), loss_fn=lf)
    # What TracInCP users pass (a reduced loss module) is used per sample, with a note; other
    # reductions are refused by name.
    per = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=nn.NLLLoss(reduction="none"))
    with pytest.warns(UserWarning, match="used per sample"):
        summed = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=nn.NLLLoss(reduction="sum"))
    torch.testing.assert_close(summed.attribute(x, target=1), per.attribute(x, target=1), rtol=0, atol=0)
    odd = nn.KLDivLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="reduction='none'"):
        TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=odd)
    with pytest.raises(ValueError, match="one loss per sample"):
        TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lambda o, y: lf(o, y).mean())
    with pytest.raises(TypeError, match="map-style"):
        TrainingDataInfluence(model, traj, [(X[i], Y[i]) for i in range(3)].__iter__(), loss_fn=lf)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="train_batch_size must be a positive int"):
            TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf, train_batch_size=bad)
        with pytest.raises(ValueError, match="train_batch_size must be a positive int"):
            PredictionSimilarity(model, traj, TensorDataset(X, Y), loss_fn=lf, train_batch_size=bad)
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=lf)
    with pytest.raises(ValueError, match="partition"):
        tdi.attribute(x, target=0, steps=[range(2, 4)], indexing="gradient")
    with pytest.raises(IndexError, match="out of range"):
        tdi.attribute(x, target=7)
    with pytest.raises(TypeError, match="tuple"):
        tdi.influence(x)


def test_unsupported_optimizer_and_missing_state(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 16)
    rms, _ = record_run(model, X, Y, tmp_path / "rms",
                        RunConfig(lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01), steps=3))
    with pytest.raises(UnsupportedOptimizerError, match="RMSprop"):
        TrainingDataInfluence(model, rms, TensorDataset(X, Y))
    with pytest.raises(UnsupportedOptimizerError, match="RMSprop"):
        PredictionSimilarity(model, rms, TensorDataset(X, Y))
    model2 = TanhMLP().double()
    opt = torch.optim.Adam(model2.parameters(), lr=0.01)
    with TrajectoryRecorder(model2, opt, tmp_path / "nostate", record_optimizer_state=False) as rec:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.nll_loss(model2(X[:4]), Y[:4]).backward()
            rec.log_batch(torch.arange(4))
            opt.step()
    with pytest.raises(MissingOptimizerStateError, match="exp_avg_sq"):
        TrainingDataInfluence(model2, rec.trajectory, TensorDataset(X, Y))


def test_captum_dropin():
    from captum.attr import Attribution
    from captum.influence import DataInfluence

    assert issubclass(TrainingDataInfluence, DataInfluence)
    assert issubclass(TrainingDataInfluence, Attribution)
