"""Plots draw what they are given (checked on the artists) and render to real PNG files."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from captum_explaind import ExactPathKernel, StepInfluence  # noqa: E402
from captum_explaind import visualization as viz  # noqa: E402

from training import OPTIMIZERS, RunConfig, TanhMLP, make_data, record_run  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, Y = make_data("vector", 24)
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("viz") / "t", RunConfig(OPTIMIZERS["adamw"], steps=8))
    return model, traj, X[:3], Y[:3]


def test_reconstruction_waterfall_ends_at_final(run, tmp_path):
    model, traj, x, _ = run
    r = ExactPathKernel(model, traj).reconstruct(x)
    fig, ax = viz.plot_reconstruction(r, index=1, output=2)
    bars = ax.patches
    # each middle bar starts where the previous ended; the last part lands on f(θ_N)
    first, last = bars[0], bars[-1]
    assert first.get_height() == pytest.approx(float(r.initial[1, 2]))
    assert last.get_height() == pytest.approx(float(r.final[1, 2]))
    top = bars[-2].get_y() + bars[-2].get_height()
    assert top == pytest.approx(float(r.final[1, 2]), abs=1e-9)
    fig.savefig(tmp_path / "recon.png")
    assert (tmp_path / "recon.png").stat().st_size > 1000


def test_step_and_layer_plots(run, tmp_path):
    model, traj, x, y = run
    si = StepInfluence(model, traj)
    both = si.attribute(x, target=y, window=2, component=["kernel", "regularization"])
    windows = si.explain(x, target=y, window=2).windows
    fig, ax = viz.plot_step_influence(both, windows=windows, cumulative=True)
    lines = ax.get_lines()
    k = [l for l in lines if l.get_label() == "kernel"][0]
    assert k.get_ydata()[-1] == pytest.approx(float(both["kernel"].sum()))
    fig.savefig(tmp_path / "steps.png")
    lay = si.attribute(x, target=y, window=2, layers={"fc1": "fc1", "fc2": "fc2"})
    fig, ax = viz.plot_layer_influence(lay, windows=windows)
    assert len(ax.collections) == 2  # one stacked band per layer
    fig.savefig(tmp_path / "layers.png")
    fig, ax = viz.plot_layer_influence(torch.randn(3, 4), names=list("abcd"))
    assert len(ax.patches) == 4


def test_training_influence_and_similarity(tmp_path):
    scores = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2])
    fig, ax = viz.plot_training_influence(scores, k=2)
    widths = [p.get_width() for p in ax.patches]
    assert widths == pytest.approx([3.0, 0.5, -2.0, -0.2])
    fig.savefig(tmp_path / "top.png")
    fig, axes = viz.plot_training_influence(scores, k=2, render=lambda i: torch.full((4, 4), float(i)).numpy())
    assert axes.shape == (2, 2)
    fig, ax = viz.plot_similarity(torch.eye(3), labels=["a", "b", "c"])
    fig.savefig(tmp_path / "sim.png")
    assert (tmp_path / "sim.png").exists()
