"""``max_memory=``: batch sizes chosen under a budget; every view's result equals the unbatched one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import EPKOptions, ExactPathKernel, ParameterInfluence, PredictionSimilarity, TrainingDataInfluence
from captum_explaind.epk.memory import parse_bytes, plan

from training import OPTIMIZERS, ReLUMLP, RunConfig, make_data, record_run


def nll(out, y):
    return nn.functional.nll_loss(out, y, reduction="none")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = ReLUMLP().double()  # kinks: refinement is what the budget has to bound
    X, Y = make_data("vector", 30)
    traj, _ = record_run(model, X, Y, tmp_path_factory.mktemp("mem") / "t",
                         RunConfig(OPTIMIZERS["adamw"], steps=6, micro=2))
    return model, traj, X, Y


@pytest.fixture
def chunk_sizes(monkeypatch):
    """The input-chunk sizes every integrated step used."""
    sizes = []
    original = ExactPathKernel._integrate

    def spy(self, seg, chunks, *args):
        sizes.extend(ch.n for ch in chunks)
        return original(self, seg, chunks, *args)

    monkeypatch.setattr(ExactPathKernel, "_integrate", spy)
    return sizes


def _close(got, want, rel=1e-12):
    scale = max(float(want.abs().max()), 1e-300)
    assert float((got - want).abs().max()) <= rel * scale


BUDGET = "8MB"  # a few inputs per chunk on this model (P = 147; ~1.7 MB per refined input)


def test_every_view_under_a_budget_equals_unbatched(run, chunk_sizes):
    model, traj, X, Y = run
    x, y = X[:6], Y[:6]
    train = TensorDataset(X, Y)
    results = {}
    for budget in (None, BUDGET):
        r, sizes = {}, {}

        def note(key, value, r=r, sizes=sizes):
            r[key] = value
            sizes[key.split(".")[0]] = max(chunk_sizes)
            del chunk_sizes[:]

        note("reconstruct", ExactPathKernel(model, traj, max_memory=budget).reconstruct(x).kernel)
        pi = ParameterInfluence(model, traj, max_memory=budget).attribute(x, target=y)
        for k, v in pi.items():
            r[f"model.{k}"] = v
        note("model.fc1.weight", pi["fc1.weight"])
        d = TrainingDataInfluence(model, traj, train, nll, max_memory=budget).explain(x, target=y)
        r["residual"] = d.residual
        note("data", d.scores)
        note("similarity", PredictionSimilarity(model, traj, train, nll, max_memory=budget).explain(x, target=y).gram)
        results[budget] = (r, sizes)
    (want, whole), (got, chunked) = results[None], results[BUDGET]
    assert set(whole.values()) == {6}
    # the budget really cut the inputs of the gradient-based views (forward mode needs little)
    assert chunked["model"] < 6 and chunked["data"] < 6 and chunked["similarity"] < 6, chunked
    for key in want:
        if key != "residual":
            _close(got[key], want[key])
    # the residual is round-off: equal relative to the scores it is the remainder of
    assert float((got["residual"] - want["residual"]).abs().max()) <= 1e-12 * float(want["data"].abs().max())


def test_plan_stays_within_the_budget_model():
    p = plan(4 * 2**30, n=50, n_params=77_504, dtype=torch.float64, activations=200_000, view_fixed=10**6,
             per_input_vectors=5, gradient_payload=True, max_evaluations=4096, refine=True)
    held = p.fixed + p.train_bytes + p.refine_rows * (2 * 77_504 * 8 + 200_000) + p.batch_size * p.per_input
    assert held <= 4 * 2**30 and p.batch_size >= 1 and p.train_batch_size >= 1
    # more inputs or a smaller budget never gives bigger chunks
    q = plan(2 * 2**30, n=50, n_params=77_504, dtype=torch.float64, activations=200_000, view_fixed=10**6,
             per_input_vectors=5, gradient_payload=True, max_evaluations=4096, refine=True)
    assert q.batch_size <= p.batch_size


def test_sizes_parse_and_bad_budgets_are_named(run):
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("500 MB") == 500 * 10**6 and parse_bytes(4096) == 4096
    assert EPKOptions(max_memory="1KiB").max_memory == 1024
    for bad in ("two gigs", "-1GB", 0, True, [1]):
        with pytest.raises(ValueError, match="max_memory"):
            EPKOptions(max_memory=bad)
    with pytest.raises(ValueError, match="max_evaluations"):
        EPKOptions(max_memory="1GB", max_evaluations=None)
    model, traj, X, Y = run
    with pytest.raises(MemoryError, match="max_memory"):
        TrainingDataInfluence(model, traj, TensorDataset(X, Y), nll, max_memory="20KB").explain(X[:6], target=Y[:6])
