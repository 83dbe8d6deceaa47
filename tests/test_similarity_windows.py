"""PredictionSimilarity over several windows in one sweep, against the brute-force dense tensor.

``explain_windows`` visits every step once and keeps a Gram matrix per window; the momentum
buffers are kept on the selected parameters only. Each window's cosines must equal the dense
reference restricted to that window (and the single-window ``explain``), to round-off.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from captum_explaind import PredictionSimilarity

from reference import bruteforce as bf
from training import OPTIMIZERS, SCHEDULERS, RunConfig, TanhMLP, loss_fn_for, make_data, record_run


@pytest.fixture(scope="module", params=["adamw_groups", "sgd_nesterov"])
def case(request, tmp_path_factory):
    torch.manual_seed(0)
    model = TanhMLP(log_softmax=True).double()
    X, Y = make_data("vector", 24)
    cfg = RunConfig(OPTIMIZERS[request.param], steps=7, micro=2, clip=0.6, sizes=(5, 3, 4, 6),
                    scheduler=SCHEDULERS["step"], loss="nll")
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("sim") / "run", cfg)
    x = X[:4]
    dense = bf.dense_influence(model, traj, X, Y, x, "nll", nodes=16)
    return model, traj, X, Y, x, dense


def _ref_cos(dense, steps, params, subset, target):
    g = dense["Gamma"][steps.start - 1 : steps.stop - 1][:, params][:, :, :, subset]  # [s, p, q, k, j]
    v = torch.stack([g[:, :, q, :, target[q]].reshape(-1) for q in range(g.shape[2])])
    v = v / v.norm(dim=1, keepdim=True)
    return v @ v.T


@pytest.mark.parametrize("layers", [None, "fc1"])
def test_windows_in_one_sweep_equal_bruteforce_and_single_windows(case, layers):
    model, traj, X, Y, x, dense = case
    ps = PredictionSimilarity(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    P = bf.num_params(traj)
    if layers is None:
        params = torch.arange(P)
    else:
        sl = bf.param_slices(traj)
        params = torch.cat([torch.arange(P)[sl["fc1.weight"]], torch.arange(P)[sl["fc1.bias"]]])
    target = [1, 0, 2, 2]
    subset = list(range(3, 20))
    windows = [range(1, 3), range(2, 6), range(6, 8)]  # overlapping, and ending at the last step
    results = ps.explain_windows(x, windows, target=target, layers=layers, train_subset=subset)
    assert [r.window for r in results] == windows
    for w, res in zip(windows, results):
        torch.testing.assert_close(res.similarity, _ref_cos(dense, w, params, subset, target), rtol=0, atol=1e-12)
        single = ps.explain(x, target=target, layers=layers, steps=w, train_subset=subset)
        torch.testing.assert_close(res.gram, single.gram, rtol=1e-13, atol=0)
        torch.testing.assert_close(res.change, single.change, rtol=0, atol=0)
        # the change each window decomposes is the exact change of the outputs over it
        f, q = dense["f"], torch.arange(4)
        torch.testing.assert_close(res.change[:, 0], (f[w.stop - 1] - f[w.start - 1])[q, target], rtol=0, atol=1e-13)


def test_windows_must_be_a_list(case):
    model, traj, X, Y, x, _ = case
    ps = PredictionSimilarity(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    with pytest.raises(ValueError, match="non-empty list of windows"):
        ps.explain_windows(x, range(1, 3), target=0)
    with pytest.raises(ValueError, match="explain_windows"):
        ps.explain(x, target=0, steps=[range(1, 3), range(3, 5)])


def test_a_late_start_reports_the_momentum_it_drops(case, tmp_path):
    model, traj, X, Y, x, dense = case
    ps = PredictionSimilarity(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    full = ps.explain_windows(x, [range(5, 8)], target=0)[0]
    assert full.truncation == 0.0
    late = ps.explain_windows(x, [range(5, 8)], target=0, start=3)[0]
    # the weight left on the momentum of steps 1–2 when the window begins: β per visited step 3, 4, 5
    beta = max(g.get("momentum", (g.get("betas") or [0.0])[0]) for g in traj.manifest["optimizer"]["groups"])
    assert late.truncation == pytest.approx(beta**3, rel=1e-12)
    assert 0 < late.truncation < 1
    torch.testing.assert_close(late.change, full.change, rtol=0, atol=0)  # the outputs' change is not truncated
    with pytest.raises(ValueError, match="start must be a step"):
        ps.explain_windows(x, [range(5, 8)], target=0, start=6)


def test_a_late_start_without_momentum_is_exact(tmp_path):
    torch.manual_seed(0)
    model = TanhMLP(log_softmax=True).double()
    X, Y = make_data("vector", 24)
    cfg = RunConfig(OPTIMIZERS["sgd_plain"], steps=6, micro=1, sizes=(5, 3, 4, 6), loss="nll")
    traj, _ = record_run(model, X, Y, tmp_path / "run", cfg)
    ps = PredictionSimilarity(model, traj, TensorDataset(X, Y), loss_fn=loss_fn_for("nll"))
    full = ps.explain_windows(X[:3], [range(4, 7)], target=1)[0]
    late = ps.explain_windows(X[:3], [range(4, 7)], target=1, start=4)[0]
    assert late.truncation == 0.0
    torch.testing.assert_close(late.gram, full.gram, rtol=1e-13, atol=0)
