"""``Trajectory.step_data``: one opening of a step file gives what ``record``, ``params`` and
``state`` give separately, with the same errors; and ``track(loader)`` over a dataset of dicts
of varying length, batched by a padding collate function."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from captum_explaind import TrajectoryRecorder
from captum_explaind.errors import MissingOptimizerStateError, TrajectoryCorruptError, TrajectoryError
from captum_explaind.recording import StepData

from recording_utils import assert_params_equal, record_small, step_file


# ============================================================================ step_data
@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    return record_small(tmp_path_factory.mktemp("adam") / "run", steps=4, optimizer="adam")


def _assert_records_equal(a, b) -> None:
    assert (a.step, a.lr, a.groups, a.inactive, a.grad_sq, a.state_step) == (
        b.step, b.lr, b.groups, b.inactive, b.grad_sq, b.state_step
    )
    assert len(a.batches) == len(b.batches)
    for x, y in zip(a.batches, b.batches):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.weights, y.weights)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_step_data_equals_record_params_and_state(adam_run, dtype):
    traj = adam_run
    keys = ("exp_avg_sq", "max_exp_avg_sq")
    for s in range(1, traj.num_steps + 1):
        data = traj.step_data(s, dtype=dtype, device="cpu", state_keys=keys)
        assert isinstance(data, StepData) and data.step == s
        _assert_records_equal(data.record, traj.record(s))
        assert list(data.params) == traj.trainable
        assert_params_equal(data.params, traj.params(s, dtype=dtype, device="cpu"))
        assert set(data.state) == set(keys)
        for key in keys:
            assert_params_equal(data.state[key], traj.state(s, key, dtype=dtype, device="cpu"))
    assert set(data.state["exp_avg_sq"]) == set(traj.trainable)  # Adam has state for every parameter
    if dtype is not None:
        assert all(t.dtype == dtype for t in data.params.values())


def test_step_data_without_state_keys_and_frozen(tmp_path):
    traj = record_small(tmp_path / "sgd", steps=2)
    data = traj.step_data(2)
    assert data.state == {}
    assert_params_equal(data.params, traj.params(2))
    _assert_records_equal(data.record, traj.record(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.step = 3  # type: ignore[misc]


def test_step_data_rejects_what_record_and_state_reject(adam_run):
    traj = adam_run
    for bad in (0, traj.num_steps + 1):  # step 0 (θ_0) has no record
        with pytest.raises(TrajectoryError, match="outside the trajectory"):
            traj.step_data(bad)
    with pytest.raises(TypeError, match="step must be an int"):
        traj.step_data(True)
    with pytest.raises(MissingOptimizerStateError) as caught:
        traj.step_data(1, state_keys=("momentum_buffer",))
    with pytest.raises(MissingOptimizerStateError) as expected:
        traj.state(1, "momentum_buffer")
    assert str(caught.value) == str(expected.value)
    with pytest.raises(TypeError, match="sequence of state names"):
        traj.step_data(1, state_keys="exp_avg_sq")


def _corruption(traj, step: int, damage) -> None:
    """Damage the step file, then compare the errors of params() and step_data()."""
    path = step_file(traj.path, step)
    damage(path)
    with pytest.raises(TrajectoryCorruptError) as expected:
        traj.params(step)
    with pytest.raises(TrajectoryCorruptError) as caught:
        traj.step_data(step)
    assert type(caught.value) is type(expected.value)
    assert str(caught.value) == str(expected.value)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])


def _garble_header(path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16  # the JSON header no longer parses
    path.write_bytes(bytes(data))


def _drop_a_parameter(path) -> None:
    """A well-formed file that lacks one trainable parameter (it opens; reading it fails)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "param/fc1.weight"}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _drop_a_parameter],
                         ids=["truncated", "garbled-header", "missing-parameter"])
def test_step_data_on_a_corrupt_step_file_raises_what_params_raises(tmp_path, damage):
    traj = record_small(tmp_path / "run", steps=3)  # opened (and verified) before the damage
    _corruption(traj, 2, damage)
    # the other steps still read
    assert_params_equal(traj.step_data(3).params, traj.params(3))


# ============================================================================ track(loader)
class TokenDataset(Dataset):
    """Token sequences of varying length and a label; each item carries its own index, so the
    test knows independently which samples a batch held."""

    def __init__(self, n: int = 11, vocab: int = 13) -> None:
        g = torch.Generator().manual_seed(5)
        lengths = torch.randint(1, 7, (n,), generator=g).tolist()
        self.seqs = [torch.randint(1, vocab, (L,), generator=g) for L in lengths]
        self.labels = torch.randint(0, 3, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> Dict[str, object]:
        return {"input_ids": self.seqs[i], "labels": self.labels[i], "idx": i}


def pad_collate(items: List[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Pad ``input_ids`` with 0 to the longest sequence of the batch; a dict, like HF collators."""
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, : len(it["input_ids"])] = it["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": ids != 0,
        "labels": torch.tensor([it["labels"] for it in items]),
        "idx": torch.tensor([it["idx"] for it in items]),
    }


class BagModel(nn.Module):
    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, 4, mode="mean", padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(input_ids)).log_softmax(-1)


def test_track_logs_dataset_indices_of_dict_batches_from_a_padding_collate(tmp_path):
    """Dict samples of varying length, a padding collate returning a dict, a shuffling loader
    with a seeded generator: every recorded step holds exactly the dataset indices (and mean
    weights) of the batch the loop trained on, in order."""
    torch.manual_seed(0)
    ds = TokenDataset(11)
    loader = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=pad_collate,
                        generator=torch.Generator().manual_seed(11))
    model = BagModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    consumed = []
    with TrajectoryRecorder(model, opt, tmp_path / "bag") as rec:
        for _epoch in range(2):
            for batch in rec.track(loader):
                assert set(batch) == {"input_ids", "attention_mask", "labels", "idx"}  # the user's collate ran
                opt.zero_grad()
                nn.functional.nll_loss(model(batch["input_ids"]), batch["labels"]).backward()
                opt.step()
                consumed.append(batch["idx"].clone())
    traj = rec.trajectory
    assert [len(c) for c in consumed] == [4, 4, 3] * 2  # the short last batch is kept
    assert traj.num_steps == len(consumed)
    for s, idx in enumerate(consumed, start=1):
        batches = traj.record(s).batches
        assert len(batches) == 1
        assert batches[0].indices.dtype == torch.int64
        assert batches[0].indices.tolist() == idx.tolist()
        assert torch.equal(batches[0].weights, torch.full((len(idx),), 1.0 / len(idx), dtype=torch.float64))
    for epoch in range(2):  # each epoch is a permutation of the dataset, and really shuffled
        order = torch.cat(consumed[3 * epoch : 3 * epoch + 3]).tolist()
        assert sorted(order) == list(range(len(ds))) and order != list(range(len(ds)))
    assert torch.cat(consumed[:3]).tolist() != torch.cat(consumed[3:]).tolist()
    # tracking did not change the run: the same seeded loader, untracked, yields the same order
    plain = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=pad_collate,
                       generator=torch.Generator().manual_seed(11))
    assert [b["idx"].tolist() for _ in range(2) for b in plain] == [c.tolist() for c in consumed]
