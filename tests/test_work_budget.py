"""The per-step work budget (``max_evaluations``): refinement stops, the error left is reported.

A model that computes part of its forward pass in float32 (as Llama's RMSNorm does) has an
integrand that is noisy at the float32 level, so no float64 tolerance can be met and unbounded
refinement would double its work at every level up to ``max_depth``. The budget stops it; the
parts still add up to the real output with the delta, and the unconverged pairs are counted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_explaind import EPKOptions, ExactPathKernel

from training import RunConfig, make_data, outputs_at, record_run


class Float32Inside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x).float()).to(x.dtype)  # float32 rounding inside a float64 model
        return self.fc2(h)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = Float32Inside().double()
    X, Y = make_data("vector", 16)
    cfg = RunConfig(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), steps=4)
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("f32"), cfg)
    return model, traj, X[:4]


def test_budget_bounds_refinement_and_reports_what_is_left(run):
    model, traj, x = run
    with pytest.warns(RuntimeWarning, match="max_evaluations=16"):
        parts = ExactPathKernel(model, traj, max_evaluations=16).reconstruct(x)
    assert parts.unconverged > 0
    truth = outputs_at(model, traj, x, traj.num_steps)
    torch.testing.assert_close(parts.final, truth, rtol=0, atol=1e-13)
    total = parts.initial + parts.kernel + parts.regularization + parts.buffers + parts.other + parts.delta
    torch.testing.assert_close(total, parts.final, rtol=0, atol=1e-13)
    assert 0 < parts.max_abs_delta() < 1e-5  # float32-level noise, reported, not hidden
    # A bigger budget does more work, within its own bound.
    with pytest.warns(RuntimeWarning):
        more = ExactPathKernel(model, traj, max_evaluations=64).reconstruct(x)
    assert more.evaluations > parts.evaluations


def test_budget_changes_nothing_where_refinement_converges(tmp_path):
    torch.manual_seed(0)
    from training import ReLUMLP

    model = ReLUMLP().double()
    X, Y = make_data("vector", 16)
    traj, _ = record_run(model, X, Y, tmp_path / "relu", RunConfig(lambda m: torch.optim.SGD(m.parameters(), lr=0.2),
                                                                    steps=5))
    bounded = ExactPathKernel(model, traj).reconstruct(X[:6])
    free = ExactPathKernel(model, traj, EPKOptions(max_evaluations=None)).reconstruct(X[:6])
    assert bounded.unconverged == free.unconverged == 0
    torch.testing.assert_close(bounded.kernel, free.kernel, rtol=0, atol=0)
    assert bounded.max_abs_delta() < 1e-9


class _OffsetIntegrand:
    """Row 0's integrand misses its exact change by 1e-3 per unit of t (it can never converge);
    the others integrate ``f(t) = t²`` exactly. Counts the integrand rows evaluated per input."""

    def __init__(self, m: int) -> None:
        self.rows_of = torch.zeros(m, dtype=torch.int64)

    def evaluate(self, t, rows):
        t = torch.full((len(rows),), float(t), dtype=torch.float64) if not isinstance(t, torch.Tensor) else t
        self.rows_of += torch.bincount(rows, minlength=len(self.rows_of))
        g = (2 * t + 1e-3 * (rows == 0)).unsqueeze(1)
        return g, g

    def checked(self, t, rows):
        t = torch.full((len(rows),), float(t), dtype=torch.float64) if not isinstance(t, torch.Tensor) else t
        return (t * t).unsqueeze(1)

    def accumulate(self, rows, payload):
        pass


def _row0_work(m: int, budget: int) -> int:
    from captum_explaind.epk.integrator import integrate_step

    integrand = _OffsetIntegrand(m)
    f0, f1 = torch.zeros(m, 1, dtype=torch.float64), torch.ones(m, 1, dtype=torch.float64)
    stats = integrate_step(integrand, f0, f1, rule="gauss", nodes=4, tol=torch.full((m,), 1e-10, dtype=torch.float64),
                           noise=torch.zeros(m, dtype=torch.float64), control=True, max_depth=40, max_points=budget)
    assert stats.unconverged == 1 and stats.unconverged_rows.tolist() == [0]  # only the input that cannot converge
    assert (integrand.rows_of[1:] == 4).all()  # the others: the base rule, nothing more
    return int(integrand.rows_of[0])


def test_budget_is_per_input_not_pooled():
    # An input that cannot converge stops at its own budget, whatever shares its chunk: pooled, it
    # took the budget of every input beside it (a p = 113 Grokking step: 15 minutes).
    alone, among = _row0_work(1, 64), _row0_work(8, 64)
    assert alone == among
    assert 64 <= alone <= 3 * 64  # stopped within about one level of its budget
