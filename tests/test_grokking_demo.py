"""The README's main job: ``python -m captum_explaind.demo`` writes the figures and the summary."""

from __future__ import annotations

import pytest

from captum_explaind import demo


def test_demo_options_have_help_text():
    parser = demo._parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest


@pytest.mark.slow
def test_demo_writes_figures_and_summary(tmp_path, capsys):
    study = demo.main(["--config", "tiny", "--inputs", "3", "--no-retrain", "--out", str(tmp_path)])
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert "fig3a_left_accuracy_and_balance.png" in figures and "fig4_test_by_mod.png" in figures
    assert len(figures) == 10  # every figure except the retraining (skipped)
    summary = (tmp_path / "summary.txt").read_text()
    assert "memoriz" in summary and "this run:" in summary and "delta" in summary
    assert "kernel = the change the loss gradients caused" in capsys.readouterr().out
    for name, value in study.deltas().items():
        assert value == value, name  # finite, printed


def test_case_study_plots():
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from captum_explaind import visualization as viz

    fig, axes = viz.plot_stage_grid(torch.randn(3, 4, 5), titles=["a", "b", "c"])
    assert len(axes) == 3 and axes[0].get_title() == "a"
    fig, ax = viz.plot_ordered_influence(torch.randn(2, 3), torch.tensor([1, 0]), torch.tensor([2, 0, 1]))
    assert ax.images[0].get_array().shape == (2, 3)
    with pytest.raises(ValueError, match="do not match"):
        viz.plot_ordered_influence(torch.randn(2, 3), torch.tensor([1, 0]), torch.tensor([0, 1]))
    fig, ax = viz.plot_coefficients({"cos 5": 0.1, "cos 7": -0.3, "sin 2": 0.01}, k=2)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cos 7", "cos 5"]
    with pytest.raises(ValueError, match="at least one"):
        viz.plot_stage_grid([])
    # per-stage scales at a quantile: a large stage does not wash out a small one, an outlier not its stage
    small, big = torch.linspace(-1, 1, 100).reshape(10, 10), 1000 * torch.linspace(-1, 1, 100).reshape(10, 10)
    big[0, 0] = 1e6
    fig, axes = viz.plot_stage_grid([small, big], per_stage=True, quantile=0.9)
    lims = [ax.images[0].get_clim() for ax in axes]
    assert abs(lims[0][1] - 0.9) < 0.05 and abs(lims[1][1] - 900) < 50 and lims[1][0] == -lims[1][1]
    fig, axes = viz.plot_stage_grid([small, big])
    assert axes[0].images[0].get_clim() == (-1e6, 1e6)  # the default: one scale, the largest |value|
    with pytest.raises(ValueError, match="quantile"):
        viz.plot_stage_grid([small], quantile=0.0)
