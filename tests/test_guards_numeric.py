"""Numerical guards: non-finite numbers are named before any refinement, refinement that runs out
of budget names what it left, and the data view warns when its residual says the replay is wrong.

Before these guards one NaN in a test input sent refinement to its work budget on every step and
came back with NaN parts and ``unconverged == 0``; with error control off it came back silently.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import (
    ExactPathKernel,
    ParameterInfluence,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
    TrajectoryRecorder,
)
from captum_explaind.errors import ConvergenceWarning, NonFiniteError, ResidualWarning

from guard_utils import small_run, time_limit
from training import RunConfig, TanhMLP, loss_fn_for, make_data, record_run

NLL = loss_fn_for("nll")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("numeric") / "run", optimizer="adam", steps=4)


def _poisoned(X, value):
    x = X[:3].clone()
    x[1, 2] = value
    return x


ENTRY_POINTS = {
    "reconstruct": lambda m, t, X, Y, o, x: ExactPathKernel(m, t, o).reconstruct(x),
    "parameters": lambda m, t, X, Y, o, x: ParameterInfluence(m, t, o).attribute(x, target=0),
    "layers": lambda m, t, X, Y, o, x: ParameterInfluence(m, t, o).attribute(x, target=0, layers=["fc1", "fc2"]),
    "steps": lambda m, t, X, Y, o, x: StepInfluence(m, t, o).attribute(x, target=1),
    "data": lambda m, t, X, Y, o, x: TrainingDataInfluence(m, t, TensorDataset(X, Y), NLL, options=o).attribute(
        x, target=0),
    "similarity": lambda m, t, X, Y, o, x: PredictionSimilarity(m, t, TensorDataset(X, Y), NLL, options=o).attribute(
        X[:2], x, target=0),
}


@pytest.mark.parametrize("preset", ["exact", "fast"])  # "fast": no error control (NaN came back silently)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_non_finite_test_input_is_named_before_any_work(run, entry, value, preset):
    model, traj, X, Y = run
    with time_limit(20), pytest.raises(NonFiniteError, match=r"example\(s\) \[1\]"):
        ENTRY_POINTS[entry](model, traj, X, Y, preset, _poisoned(X, value))


class ByKey(TanhMLP):
    """The same parameters as TanhMLP, called by keyword (as a Mapping input is passed)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(features)


def test_non_finite_input_in_a_mapping_is_named_by_key(run):
    model, traj, X, _ = run
    keyed = ByKey().double()
    keyed.load_state_dict(model.state_dict())
    epk = ExactPathKernel(keyed, traj)
    torch.testing.assert_close(epk.reconstruct({"features": X[:2]}).final, model(X[:2]), rtol=0, atol=1e-12)
    with pytest.raises(NonFiniteError, match=r"inputs\['features'\] holds NaN in example\(s\) \[1\]"):
        epk.reconstruct({"features": _poisoned(X, float("nan"))})


# ----------------------------------------------------------------------------- non-finite along the path
class Singular(nn.Module):
    """``fc(x) / p``: finite wherever the scalar parameter ``p`` is not 0."""

    def __init__(self, p0: float) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.p = nn.Parameter(torch.tensor(p0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / self.p


def _singular_run(path, p0: float, push: float):
    """One SGD step on ``p`` only: ``p_1 = p0 + 0.5 · push`` exactly (loss ``−push · p``)."""
    torch.manual_seed(0)
    model = Singular(p0).double()
    opt = torch.optim.SGD([model.p], lr=0.5)
    with TrajectoryRecorder(model, opt, path) as rec:
        opt.zero_grad()
        (-push * model.p).backward()
        rec.log_batch(torch.arange(2))
        opt.step()
    return model, rec.trajectory


@pytest.mark.parametrize("opts", [dict(nodes=3), dict(quadrature="midpoint", nodes=1, error_control=False)],
                         ids=["gauss3-refined", "midpoint-no-control"])
def test_integrand_blowing_up_mid_step_is_named(tmp_path, opts):
    # p goes from −0.5 to +0.5: both ends are finite, the centre node t = 0.5 sits on p = 0 exactly
    model, traj = _singular_run(tmp_path / "mid", -0.5, 2.0)
    X, _ = make_data("vector", 4)
    epk = ExactPathKernel(model, traj, **opts)
    with time_limit(20), pytest.raises(NonFiniteError, match=r"step 1: the path integrand .* input\(s\) \[0, 1, 2\]"):
        epk.reconstruct(X[:3])


def test_output_non_finite_at_the_last_step_is_named_before_integration(tmp_path):
    model, traj = _singular_run(tmp_path / "end", -0.5, 1.0)  # p_1 = 0: f(θ_1) = ±inf
    X, _ = make_data("vector", 4)
    assert float(traj.params(1)["p"]) == 0.0
    with time_limit(20), pytest.raises(NonFiniteError, match=r"θ_1.*example\(s\) \[0, 1\]"):
        ExactPathKernel(model, traj).reconstruct(X[:2])


def test_non_finite_training_sample_is_named(run):
    model, traj, X, Y = run
    # a sample of step 2's batch that the constructor's loss probe (samples 0 and 1) does not read
    used = next(int(i) for i in traj.record(2).batches[0].indices if int(i) > 1)
    Xbad = X.clone()
    Xbad[used, 0] = float("nan")
    tdi = TrainingDataInfluence(model, traj, TensorDataset(Xbad, Y), NLL)
    with time_limit(20), pytest.raises(NonFiniteError, match=rf"step \d+: the loss gradients of its training samples"
                                                             rf" \[.*\b{used}\b"):
        tdi.attribute(X[:2], target=0)


# ----------------------------------------------------------------------------- the work budget
class Float32Inside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x).float()).to(x.dtype))  # float32 noise: never converges


def test_budget_warning_names_the_steps_and_inputs_it_left(tmp_path):
    torch.manual_seed(0)
    model = Float32Inside().double()
    X, Y = make_data("vector", 16)
    traj, _ = record_run(model, X, Y, tmp_path / "f32",
                         RunConfig(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), steps=3))
    with time_limit(30), pytest.warns(ConvergenceWarning, match=r"step \d+: input\(s\) \[[0-9, ]+\] \(error up to"):
        parts = ExactPathKernel(model, traj, max_evaluations=16).reconstruct(X[:4])
    assert parts.unconverged > 0
    assert issubclass(ConvergenceWarning, RuntimeWarning)  # still caught by RuntimeWarning filters


# ----------------------------------------------------------------------------- the data view's residual
def _residual_warnings(model, traj, data, loss_fn, x, y):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = TrainingDataInfluence(model, traj, data, loss_fn).explain(x, target=y)
    return res, [w for w in caught if issubclass(w.category, ResidualWarning)]


def test_residual_warning_names_a_mismatched_training_set(tmp_path):
    model, traj, X, Y = small_run(tmp_path / "perm", optimizer="sgd_momentum", steps=5, clip=0.5)
    res, caught = _residual_warnings(model, traj, TensorDataset(X, Y), NLL, X[:4], Y[:4])
    assert not caught and float(res.residual.abs().max()) < 1e-10  # the faithful replay: silent
    perm = Y[torch.randperm(len(Y), generator=torch.Generator().manual_seed(3))]
    res, caught = _residual_warnings(model, traj, TensorDataset(X, perm), NLL, X[:4], Y[:4])
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the user's call
    msg = str(caught[0].message)
    assert "residual" in msg and "train_dataset is not the data" in msg and "permuted" in msg
    worst = int(res.residual.abs().argmax())
    assert f"input {worst}: residual {float(res.residual[worst]):.3g}" in msg  # with the numbers
    # layer groups keep the check, also a subset of layers (the other layers' share is reported in
    # `other`, not in the residual)
    tdi = TrainingDataInfluence(model, traj, TensorDataset(X, perm), NLL)
    with pytest.warns(ResidualWarning):
        tdi.explain(X[:4], target=Y[:4], layers=["fc1", "fc2"])
    with pytest.warns(ResidualWarning):
        tdi.explain(X[:4], target=Y[:4], layers=["fc1"])
    faithful = TrainingDataInfluence(model, traj, TensorDataset(X, Y), NLL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResidualWarning)
        part = faithful.explain(X[:4], target=Y[:4], layers=["fc1"])
    assert float(part.residual.abs().max()) < 1e-10  # the faithful replay, fc2's share in `other`
    assert float(part.other.abs().max()) > 1e-3


def test_residual_warning_names_nll_on_logits(tmp_path):
    # trained with cross-entropy on logits; explained with nll_loss on those logits
    model, traj, X, Y = small_run(tmp_path / "ce", optimizer="adam", steps=5, loss="ce")
    res, caught = _residual_warnings(model, traj, TensorDataset(X, Y), loss_fn_for("ce"), X[:4], Y[:4])
    assert not caught
    res, caught = _residual_warnings(model, traj, TensorDataset(X, Y), NLL, X[:4], Y[:4])
    assert len(caught) == 1
    assert "negative losses" in str(caught[0].message) and "nll_loss on" in str(caught[0].message)
    assert caught[0].filename == __file__
