"""TrainingDataInfluence as a drop-in for Captum's TracInCP: what TracInCP accepts, it accepts.

DataLoader inputs, ``aggregate``, ``self_influence``, top-k results, reduced losses, Mapping
batches, the argument order, and the typed overloads of ``attribute`` — each checked against an
independent computation on a tiny float64 model trained here (and, for the top-k ordering,
against Captum's own ``TracInCP`` where the two methods coincide).
"""

from __future__ import annotations

import copy
import sys
import typing
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from captum_explaind import TrainingDataInfluence, TrajectoryRecorder
from captum_explaind.attr.data_influence import KMostInfluentialResults

from training import OPTIMIZERS, RunConfig, TanhMLP, make_data, record_run

N_TRAIN = 16
N_TEST = 7  # with batch_size=3: batches of 3, 3 and 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A momentum-SGD run with mini-batches of varying size (a duplicated sample in step 2)."""
    torch.manual_seed(0)
    model = TanhMLP(log_softmax=False).double()
    X, Y = make_data("vector", N_TRAIN)
    cfg = RunConfig(OPTIMIZERS["sgd_momentum"], steps=5, sizes=(5, 3, 4, 6), loss="ce")
    traj, batches = record_run(model, X, Y, tmp_path_factory.mktemp("dropin") / "run", cfg)
    used = sorted({i for step in batches for micro in step for i in micro})
    assert 0 < len(used) < N_TRAIN  # some samples never enter a batch: their scores are exactly 0
    x, y = make_data("vector", N_TEST, seed=1)
    return model, traj, X, Y, x, y, used


@pytest.fixture(scope="module")
def tdi(run):
    model, traj, X, Y, *_ = run
    return TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=nn.CrossEntropyLoss(reduction="none"))


@pytest.fixture(scope="module")
def full(run, tdi):
    """The plain scores ``[n_test, n_train]`` on the output of each test label."""
    *_, x, y, used = run
    scores = tdi.attribute(x, target=y)
    assert scores.shape == (N_TEST, N_TRAIN)
    unused = [i for i in range(N_TRAIN) if i not in used]
    assert float(scores[:, used].abs().min()) > 0
    assert not scores[:, unused].any()
    return scores


def _exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _assert_topk(top, scores, k, proponents):
    """``top`` holds, per row, the k largest (proponents) or smallest (opponents) scores, sorted."""
    assert isinstance(top, KMostInfluentialResults)
    assert top.indices.shape == top.influence_scores.shape == (scores.shape[0], k)
    assert top.indices.dtype == torch.long
    order = torch.sort(scores, dim=1, descending=proponents)
    _exact(top.influence_scores, order.values[:, :k])
    _exact(scores.gather(1, top.indices), top.influence_scores)
    # distinct training samples per row (ties, e.g. the zeros of unused samples, may come in any order)
    assert all(len(set(row.tolist())) == k for row in top.indices)


# ----------------------------------------------------------------------------- DataLoader inputs
def test_dataloader_inputs_equal_the_tuple(run, tdi, full):
    *_, x, y, _ = run
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)
    assert len(loader) == 3
    _exact(tdi.influence((x, y)), full)
    _exact(tdi.influence(loader), full)
    for proponents in (True, False):
        a = tdi.influence(loader, k=4, proponents=proponents)
        b = tdi.influence((x, y), k=4, proponents=proponents)
        _exact(a.indices, b.indices)
        _exact(a.influence_scores, b.influence_scores)
        _assert_topk(a, full, 4, proponents)
    # Captum's positional order: influence(inputs, k, proponents, show_progress, aggregate)
    pos = tdi.influence(loader, 4, False, False, False)
    _exact(pos.indices, tdi.influence((x, y), k=4, proponents=False).indices)


def test_empty_dataloader_is_refused(run, tdi):
    *_, x, y, _ = run
    with pytest.raises(ValueError, match="yields no batch"):
        tdi.influence(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=3))


# ----------------------------------------------------------------------------- aggregate
def test_aggregate_is_the_column_sum(run, tdi, full):
    *_, x, y, _ = run
    agg = tdi.influence((x, y), aggregate=True)
    assert agg.shape == (1, N_TRAIN)
    torch.testing.assert_close(agg, full.sum(0, keepdim=True), rtol=0, atol=1e-15)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    _exact(tdi.influence(loader, aggregate=True), agg)
    for proponents in (True, False):
        top = tdi.influence((x, y), k=5, proponents=proponents, aggregate=True)
        assert top.indices.shape == (1, 5)
        _assert_topk(top, agg, 5, proponents)
    # the aggregate top-k is not (in general) any single input's top-k
    per_input = tdi.influence((x, y), k=5).indices
    assert not all(torch.equal(per_input[i], top.indices[0]) for i in range(N_TEST))


# ----------------------------------------------------------------------------- self influence
def test_self_influence_equals_each_samples_own_score(run, tdi):
    _, _, X, Y, *_ = run
    ref = torch.stack([tdi.attribute(X[k : k + 1], target=int(Y[k]))[0, k] for k in range(N_TRAIN)])
    own = tdi.self_influence()
    assert own.shape == (N_TRAIN,)
    torch.testing.assert_close(own, ref, rtol=1e-10, atol=1e-14)
    # chunks of training samples (the gather must use each chunk's own indices)
    torch.testing.assert_close(tdi.self_influence(chunk=5), ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(tdi.self_influence((X, Y)), ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(tdi.self_influence(DataLoader(TensorDataset(X, Y), batch_size=6)), ref,
                               rtol=1e-10, atol=1e-14)
    # it is the diagonal of the full training-on-training scores, not some other entry
    square = tdi.attribute(X, target=Y)
    torch.testing.assert_close(own, square.diagonal(), rtol=1e-10, atol=1e-14)
    assert float((square - torch.diag(square.diagonal())).abs().max()) > 0
    # TracInCP's keyword is accepted (no effect); a bool where chunk goes is not taken for 1
    torch.testing.assert_close(tdi.self_influence(outer_loop_by_checkpoints=True), own, rtol=0, atol=0)
    for bad in (True, 0, 2.5):
        with pytest.raises(TypeError, match="chunk must be a positive int"):
            tdi.self_influence(None, False, bad)
    with pytest.raises(ValueError, match="training set has"):
        tdi.self_influence((torch.cat([X, X[:1]]), torch.cat([Y, Y[:1]])))


class _DictRows(Dataset):
    """Mapping training items (a tokenized-dataset-like row) with the label under ``label_key``."""

    def __init__(self, X, Y, label_key):
        self.X, self.Y, self.key = X, Y, label_key

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"x": self.X[i], self.key: self.Y[i]}


@pytest.mark.parametrize("label_key", ["labels", "label"])
def test_self_influence_on_a_mapping_training_set(run, tdi, label_key):
    model, traj, X, Y, *_ = run
    def loss(out, batch):
        return nn.functional.cross_entropy(out, batch[label_key], reduction="none")

    by_key = TrainingDataInfluence(model, traj, _DictRows(X, Y, label_key), loss_fn=loss)
    torch.testing.assert_close(by_key.self_influence(chunk=5), tdi.self_influence(), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- top-k
def test_topk_is_the_top_and_bottom_of_the_scores(run, tdi, full):
    *_, x, y, _ = run
    for proponents in (True, False):
        _assert_topk(tdi.influence((x, y), k=3, proponents=proponents), full, 3, proponents)
    assert KMostInfluentialResults._fields == ("indices", "influence_scores")
    for bad in (0, N_TRAIN + 1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int"):
            tdi.influence((x, y), k=bad)


@pytest.mark.filterwarnings("ignore:Since `test_loss_fn` has no:UserWarning")
def test_topk_ordering_agrees_with_captum_tracincp(tmp_path):
    """Plain full-batch SGD at a constant learning rate, left-endpoint rule with one node, no
    error control: ours = −TracInCP / M with a checkpoint per step (see
    ``test_left_endpoint_rule_matches_captum_tracincp``). The sign flips proponents and
    opponents; the factor 1/M keeps the order."""
    from captum.influence import TracInCP
    from captum.influence._utils.common import KMostInfluentialResults as CaptumResults

    torch.manual_seed(0)
    model = TanhMLP(log_softmax=False).double()
    X, Y = make_data("vector", N_TRAIN)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with TrajectoryRecorder(model, opt, tmp_path / "sgd") as rec:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), Y).backward()
            rec.log_batch(torch.arange(len(X)))
            opt.step()
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

    x, y = make_data("vector", 5, seed=1)
    tracin = TracInCP(copy.deepcopy(model), TensorDataset(X, Y), ckpts, checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=N_TRAIN,
                      test_loss_fn=lambda out, t: out.gather(1, t.view(-1, 1)).squeeze(1),
                      sample_wise_grads_per_batch=False)
    ours = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=nn.CrossEntropyLoss(reduction="none"),
                                 quadrature="left", nodes=1, error_control=False)
    assert ours.options.quadrature == "left" and not ours.options.refine
    full = ours.influence((x, y))
    torch.testing.assert_close(full, -tracin.influence((x, y)) / N_TRAIN, rtol=1e-10, atol=1e-13)
    for proponents in (True, False):
        top = ours.influence((x, y), k=3, proponents=proponents)
        ref = tracin.influence((x, y), k=3, proponents=not proponents)
        assert isinstance(ref, CaptumResults) and top._fields == ref._fields
        _assert_topk(top, full, 3, proponents)
        _exact(top.indices, ref.indices)
        torch.testing.assert_close(top.influence_scores, -ref.influence_scores / N_TRAIN, rtol=1e-10, atol=1e-13)
    # aggregate: both sum over the test examples
    agg = ours.influence((x, y), aggregate=True)
    torch.testing.assert_close(agg, -tracin.influence((x, y), aggregate=True) / N_TRAIN, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- reduced losses
def test_summed_loss_warns_once_and_is_used_per_sample(run, full):
    model, traj, X, Y, x, y, _ = run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summed = TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=nn.CrossEntropyLoss(reduction="sum"))
        scores = summed.influence((x, y))
        top = summed.influence((x, y), k=3)
    notes = [w for w in caught if issubclass(w.category, UserWarning) and "used per sample" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    assert notes[0].filename == __file__  # points at the caller's constructor call
    _exact(scores, full)
    _exact(top.indices, torch.topk(full, 3, dim=1).indices)
    # the module passed in is not changed (the library uses a per-sample copy)
    loss = nn.CrossEntropyLoss(reduction="mean")
    with pytest.warns(UserWarning, match="used per sample"):
        TrainingDataInfluence(model, traj, TensorDataset(X, Y), loss_fn=loss)
    assert loss.reduction == "mean"


# ----------------------------------------------------------------------------- argument order
def test_tracincp_argument_order_is_named(run, tdi):
    model, traj, X, Y, *_ = run
    for data in (TensorDataset(X, Y), DataLoader(TensorDataset(X, Y), batch_size=4),
                 [(X[i], Y[i]) for i in range(N_TRAIN)]):
        for trajectory in (traj, traj.path, str(traj.path)):
            with pytest.raises(TypeError, match="swap"):
                TrainingDataInfluence(model, data, trajectory)
    # the right order works with each of them
    for trajectory in (traj, traj.path, str(traj.path)):
        TrainingDataInfluence(model, trajectory, [(X[i], Y[i]) for i in range(N_TRAIN)])


# ----------------------------------------------------------------------------- Mapping batches
def _dict_collate(items):
    return {"x": torch.stack([a for a, _ in items]), "labels": torch.stack([b for _, b in items])}


def test_mapping_test_batches(run, tdi, full):
    *_, x, y, _ = run
    _exact(tdi.influence({"x": x, "labels": y}), full)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, collate_fn=_dict_collate)
    assert isinstance(next(iter(loader)), dict)
    _exact(tdi.influence(loader), full)
    top = tdi.influence(loader, k=3, proponents=False)
    _assert_topk(top, full, 3, False)
    _exact(tdi.influence(loader, aggregate=True), tdi.influence((x, y), aggregate=True))
    # dict items collated by the default collate give Mapping batches too
    rows = DataLoader(_DictRows(x, y, "labels"), batch_size=3)
    _exact(tdi.influence(rows), full)
    with pytest.raises(TypeError, match="label entry"):
        tdi.influence({"x": x})


# ----------------------------------------------------------------------------- typing
@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is Python >= 3.11")
def test_attribute_has_two_typed_overloads():
    overloads = typing.get_overloads(TrainingDataInfluence.attribute)
    assert len(overloads) == 2
    returns = {str(typing.get_type_hints(o)["return"]) for o in overloads}
    assert returns == {"<class 'torch.Tensor'>", "typing.Tuple[torch.Tensor, torch.Tensor]"}
    # return_convergence_delta selects the overload: keyword-only Literal[True] in the tuple one
    for o in overloads:
        hints = typing.get_type_hints(o)
        flag = hints["return_convergence_delta"]
        assert typing.get_origin(flag) is typing.Literal
        assert typing.get_args(flag) == ((True,) if "Tuple" in str(hints["return"]) else (False,))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is Python >= 3.11")
def test_influence_overloads_say_when_topk_results_come_back():
    overloads = typing.get_overloads(TrainingDataInfluence.influence)
    returns = [typing.get_type_hints(o)["return"] for o in overloads]
    assert returns[0] is torch.Tensor  # k=None: the score matrix
    assert all(r is KMostInfluentialResults for r in returns[1:]) and len(returns) == 3
