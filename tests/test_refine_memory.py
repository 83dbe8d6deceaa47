"""Refinement holds at most ``max_rows`` parameter-sized payload rows at once, whatever the number
of refined points (a ResNet's kinks once asked for 92 GB), with the same result."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import ExactPathKernel, TrainingDataInfluence
from captum_explaind.epk import integrands, integrator

from training import ReLUMLP, RunConfig, make_data, record_run


def nll(out, y):
    return nn.functional.nll_loss(out, y, reduction="none")


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    torch.manual_seed(3)
    model = ReLUMLP().double()
    X, Y = make_data("vector", 30)
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("relu") / "t",
                         RunConfig(lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9), steps=4))
    return model, traj, X, Y


def _data_view(model, traj, X, Y, max_rows, monkeypatch):
    """The data view (vjp integrand: one parameter-sized payload per point), refinement calls of
    ``max_rows`` rows; what each level held and what each hand-over to the integrand carried."""
    levels, handed = [], []
    sub_pass, accumulate = integrator._sub_pass, integrands.VjpIntegrand.accumulate

    def spy_sub(integrand, pairs, *args):
        out = sub_pass(integrand, pairs, *args)
        levels.append((len(pairs.rows), None if out[0] is None else out[0].shape[0]))
        return out

    def spy_acc(self, rows, payload):
        handed.append(payload.shape[0])
        return accumulate(self, rows, payload)

    monkeypatch.setattr(integrator, "_sub_pass", spy_sub)
    monkeypatch.setattr(integrands.VjpIntegrand, "accumulate", spy_acc)
    monkeypatch.setattr(ExactPathKernel, "_refine_rows", property(lambda self: max_rows))
    d = TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll, batch_size=2).explain(X[:4], target=Y[:4])
    monkeypatch.undo()
    return d, levels, handed


def test_refinement_payload_is_bounded_by_max_rows_and_the_result_is_unchanged(relu_run, monkeypatch):
    model, traj, X, Y = relu_run
    wide, wide_levels, _ = _data_view(model, traj, X, Y, 1024, monkeypatch)
    narrow, levels, handed = _data_view(model, traj, X, Y, 2, monkeypatch)
    # the run refines levels of more than 2 points (so the bound is exercised) ...
    assert max(p for p, _ in levels) > 2, levels
    assert any(held is not None and held > 2 for _, held in wide_levels)  # unbounded: held them all
    # ... yet no level held, and no hand-over carried, more than max_rows payload rows (the base
    # pass holds its chunk: batch_size=2 inputs)
    assert all(held is None or held <= 2 for _, held in levels), levels
    assert max(handed) <= 2, handed
    for name in ("scores", "regularization", "residual", "delta", "change"):
        torch.testing.assert_close(getattr(narrow, name), getattr(wide, name), rtol=1e-12, atol=1e-15)
    # and the decomposition is complete against the real model
    total = narrow.scores.sum(1) + narrow.regularization + narrow.residual + narrow.buffers + narrow.delta
    torch.testing.assert_close(total, narrow.change, rtol=0, atol=1e-12)
    assert float(narrow.delta.abs().max()) < 1e-9 * float(narrow.change.abs().max())


def test_a_rule_at_once_gives_the_node_by_node_result(relu_run, monkeypatch):
    """The integrator's rule-at-once path (one parameter-sized payload per row and rule, not per
    node) on base passes, held refinement levels and recomputed ones (max_rows=2): the same
    decomposition and the same count of node evaluations as node by node."""
    model, traj, X, Y = relu_run
    calls = []
    rule = integrands.VjpIntegrand.evaluate_rule

    def spy(self, t, w, rows):
        calls.append(t.shape)
        return rule(self, t, w, rows)

    monkeypatch.setattr(integrands.VjpIntegrand, "evaluate_rule", spy)
    fused, _, _ = _data_view(model, traj, X, Y, 2, monkeypatch)
    assert any(shape[1] == 4 for shape in calls) and any(shape[1] == 2 for shape in calls), calls  # base, levels
    monkeypatch.setattr(integrands.VjpIntegrand, "evaluate_rule", lambda self, t, w, rows: None)
    nodes, _, _ = _data_view(model, traj, X, Y, 2, monkeypatch)
    for name in ("scores", "regularization", "residual", "delta", "change"):
        torch.testing.assert_close(getattr(fused, name), getattr(nodes, name), rtol=1e-11, atol=1e-14)
    assert fused.stats.evaluations == nodes.stats.evaluations
    assert fused.stats.max_depth == nodes.stats.max_depth > 0
