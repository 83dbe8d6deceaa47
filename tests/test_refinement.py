"""The machinery behind error control: kink location, shared-weight row evaluation, splitting.

These are the parts that make ReLU networks converge; each is checked against a direct
computation, and the end-to-end effect against the real model output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from captum_explaind import ExactPathKernel, TrajectoryRecorder
from captum_explaind.epk.batch import Batch
from captum_explaind.epk.functional import FunctionalModel
from captum_explaind.epk.kinks import KinkCapture, capture_preactivations, kink_roots
from captum_explaind.epk.layout import ParamLayout

from training import make_data


def test_kink_roots_recover_known_roots():
    # z_u(t) = (t - r_u)(1 + t) for several units; sample at Gauss–Legendre-like points
    xs = torch.tensor([0.0, 0.0694, 0.33, 0.67, 0.9306, 1.0], dtype=torch.float64)
    true = torch.tensor([[0.05, 0.5, 0.97], [0.2, 0.21, 0.8]], dtype=torch.float64)  # [rows, units]
    z = (xs.view(1, -1, 1) - true.unsqueeze(1)) * (1 + xs.view(1, -1, 1)) ** 2
    roots = kink_roots(xs, z)
    for r in range(2):
        torch.testing.assert_close(roots[r], true[r].sort().values, rtol=0, atol=1e-12)
    # a unit without a sign change has no root; roots at the interval ends are not kinks
    z2 = torch.stack([xs + 1.0, xs - 1.0], dim=-1).unsqueeze(0)
    assert kink_roots(xs, z2)[0].numel() == 0


def test_kink_capture_sees_every_piecewise_linear_activation():
    x = torch.linspace(-4, 8, 7).reshape(1, 7)
    with KinkCapture() as cap:
        nn.ReLU()(x)
        torch.relu(x)
        x.clamp(min=-1.0, max=2.0)
        nn.functional.hardtanh(x, -2.0, 3.0)
        nn.functional.relu6(x)
        torch.tanh(x)  # smooth: not recorded
    breakpoints = [float((x - v).mean()) for v in cap.values]  # each value is x − breakpoint
    assert breakpoints == pytest.approx([0.0, 0.0, -1.0, 2.0, -2.0, 3.0, 0.0, 6.0])
    z = capture_preactivations(lambda: torch.relu(torch.ones(3, 2, 4)), n=3)
    assert z.shape == (3, 8)


class Mixed(nn.Module):
    """Every parameter-consuming op the shared-weight path rewrites: embedding, linear, conv,
    layer norm and group norm, plus ReLU kinks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(1, 2)  # [n, 8, L]
        h = torch.relu(self.gn(self.conv(h))).transpose(1, 2)
        h = self.ln(h).mean(1)
        return self.out(torch.relu(self.lin(h))).log_softmax(-1)


class UsesParameterDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w)


@pytest.mark.parametrize("cls, kind", [(Mixed, "tokens"), (UsesParameterDirectly, "vector")])
def test_rows_on_a_segment_match_the_generic_path(cls, kind):
    torch.manual_seed(0)
    model = cls().double()
    names = [n for n, _ in model.named_parameters()]
    layout = ParamLayout(names, [p.shape for _, p in model.named_parameters()])
    fm = FunctionalModel(model, layout, {}, device=torch.device("cpu"), dtype=torch.float64)
    theta0 = layout.flatten(dict(model.named_parameters())).detach()
    delta = 0.1 * torch.randn_like(theta0)
    X, _ = make_data(kind, 5)
    X = X % 6 if kind == "tokens" else X
    t = torch.tensor([0.1, 0.35, 0.5, 0.9, 1.0], dtype=torch.float64)
    tangents = torch.randn(3, theta0.numel(), dtype=torch.float64)
    thetas = theta0 + t.unsqueeze(1) * delta
    B = Batch.from_inputs(X)
    fwd = fm.forward_on_segment(theta0, delta, t, B)
    jv = fm.jvp_on_segment(theta0, delta, t, tangents, B)
    sel = lambda out, j: out.reshape(-1).gather(0, j.reshape(1)).squeeze(0)  # noqa: E731
    j = torch.tensor([0, 1, 2, 1, 0])
    g = fm.grads_on_segment(theta0, delta, t, B, sel, j)
    assert fm.affine_ok is (cls is Mixed), fm.affine_reason
    for i in range(5):
        th = thetas[i]
        ref = fm.forward(th, B.row(i))[0]
        torch.testing.assert_close(fwd[i], ref, rtol=0, atol=1e-13)
        for k in range(3):
            _, jvk = fm.jvp(th, tangents[k : k + 1], B.row(i))
            torch.testing.assert_close(jv[i, k], jvk[0, 0], rtol=0, atol=1e-12)
        gi, _ = fm.selected_grads(th, B.row(i), sel, j[i : i + 1])
        torch.testing.assert_close(g[i], gi[0], rtol=0, atol=1e-12)
    # restricted to some columns (one whole parameter and part of another, as a layer mask makes):
    # those entries, then the whole directional derivative ∇f · Δ (the step's check)
    first, last = layout.slice(names[0]), layout.slice(names[-1])
    cols = torch.cat([torch.arange(first.start, first.stop), torch.arange(last.start, last.stop)[::2]])
    gc = fm.grads_on_segment(theta0, delta, t, B, sel, j, columns=cols)
    assert gc.shape == (5, len(cols) + 1)
    torch.testing.assert_close(gc[:, :-1], g[:, cols], rtol=0, atol=1e-12)
    torch.testing.assert_close(gc[:, -1], g @ delta, rtol=0, atol=1e-12)
    # projected on a few directions, one zero on the first parameter (as masked tangents are)
    proj = torch.randn(theta0.numel(), 3, dtype=torch.float64)
    proj[first, 1] = 0
    gp = fm.grads_on_segment(theta0, delta, t, B, sel, j, project=proj)
    torch.testing.assert_close(gp, g @ proj, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls, kind", [(Mixed, "tokens"), (UsesParameterDirectly, "vector")])
def test_a_rule_at_once_is_the_weighted_sum_of_its_nodes(cls, kind):
    """integrated_grads_on_segment: Σ_j w_ij ∇f(θ(t_ij); x_i) and each node's ∇f·Δ, per row with
    its own nodes and weights (zero weights included: no division by them), against the gradient
    at each node computed on its own; None off the shared-weight path."""
    torch.manual_seed(1)
    model = cls().double()
    names = [n for n, _ in model.named_parameters()]
    layout = ParamLayout(names, [p.shape for _, p in model.named_parameters()])
    fm = FunctionalModel(model, layout, {}, device=torch.device("cpu"), dtype=torch.float64)
    theta0 = layout.flatten(dict(model.named_parameters())).detach()
    delta = 0.1 * torch.randn_like(theta0)
    X, _ = make_data(kind, 4)
    X = X % 6 if kind == "tokens" else X
    B = Batch.from_inputs(X)
    sel = lambda out, j: out.reshape(-1).gather(0, j.reshape(1)).squeeze(0)  # noqa: E731
    j = torch.tensor([0, 1, 2, 3])
    t = torch.rand(4, 3, dtype=torch.float64)
    w = torch.rand(4, 3, dtype=torch.float64)
    w[1, 2] = 0.0
    got = fm.integrated_grads_on_segment(theta0, delta, t, w, B, sel, j)
    if cls is UsesParameterDirectly:
        assert got is None and not fm.affine_ok
        return
    assert got is not None
    payload, slopes = got
    assert payload.shape == (4, theta0.numel()) and slopes.shape == (4, 3)
    for i in range(4):
        ref = torch.zeros_like(theta0)
        for q in range(3):
            gi, _ = fm.selected_grads(theta0 + t[i, q] * delta, B.row(i), sel, j[i : i + 1])
            ref += w[i, q] * gi[0]
            torch.testing.assert_close(slopes[i, q], gi[0] @ delta, rtol=0, atol=1e-12)
        torch.testing.assert_close(payload[i], ref, rtol=0, atol=1e-12)


def test_relu_model_with_norms_converges_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = Mixed().double()
    X = torch.randint(0, 6, (30, 5))
    Y = torch.randint(0, 4, (30,))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, tmp_path / "mixed") as rec:
        for s in range(6):
            idx = torch.arange(5 * s, 5 * s + 5)
            opt.zero_grad()
            nn.functional.nll_loss(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    x = X[:6]
    fixed = ExactPathKernel(model, traj, error_control=False).reconstruct(x)
    adaptive = ExactPathKernel(model, traj).reconstruct(x)
    assert fixed.relative_delta() > 1e-7  # kinks: a fixed rule stalls
    assert adaptive.relative_delta() < 1e-9
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(adaptive.final, m(x), rtol=0, atol=1e-12)
