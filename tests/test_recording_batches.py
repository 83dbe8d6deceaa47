"""Which samples fed each step: ``log_batch`` (weights, duplicates, micro-batches, reductions,
bad input, unconsumed batches) and ``track(loader)`` (real DataLoaders, workers, samplers).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from captum_explaind import (
    TrajectoryRecorder,
)

from recording_utils import nll, vector_data
from training import TanhMLP

REPO_ROOT = Path(__file__).resolve().parents[1]




# ============================================================================ log_batch
def _one_step(model, opt, X, Y):
    opt.zero_grad()
    nll(model(X[:3]), Y[:3]).mean().backward()
    opt.step()


def test_log_batch_weights_duplicates_and_micro_batches(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    # step 1: two micro-batches, a duplicate, default and explicit weights, list and ndarray
    rec.log_batch([3, 3, 5])
    rec.log_batch(np.array([1, 2], dtype=np.int32), weights=[0.25, 0.75])
    _one_step(model, opt, X, Y)
    # step 2: a 2-D tensor of indices is flattened; weights as a tensor
    rec.log_batch(torch.tensor([[0, 1], [2, 3]]))
    rec.log_batch(torch.tensor([7]), weights=torch.tensor([2.0], requires_grad=True))
    _one_step(model, opt, X, Y)
    # step 3: nothing logged
    _one_step(model, opt, X, Y)
    traj = rec.close()

    b = traj.record(1).batches
    assert len(b) == 2
    assert b[0].indices.tolist() == [3, 3, 5] and b[0].indices.dtype == torch.int64
    assert b[0].weights.tolist() == pytest.approx([1 / 3] * 3)
    assert b[0].weights.dtype == torch.float64
    assert b[1].indices.tolist() == [1, 2]
    assert b[1].weights.tolist() == pytest.approx([0.25, 0.75])
    b = traj.record(2).batches
    assert [m.indices.tolist() for m in b] == [[0, 1, 2, 3], [7]]
    assert b[0].weights.tolist() == pytest.approx([0.25] * 4)
    assert b[1].weights.tolist() == pytest.approx([2.0])
    assert traj.record(3).batches == []


def test_log_batch_reduction_sum(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", reduction="sum")
    rec.log_batch([4, 4, 9, 1])
    _one_step(model, opt, X, Y)
    b = rec.close().record(1).batches
    assert b[0].indices.tolist() == [4, 4, 9, 1]
    assert b[0].weights.tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="reduction"):
        TrajectoryRecorder(model, opt, tmp_path / "bad", reduction="median")


def test_log_batch_rejects_bad_input(tmp_path):
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    with pytest.raises(TypeError, match="integers"):
        rec.log_batch(torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="integers"):
        rec.log_batch(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="non-negative"):
        rec.log_batch([1, -2])
    with pytest.raises(ValueError, match="2 weights for 3 indices"):
        rec.log_batch([1, 2, 3], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        rec.log_batch([1, 2], weights=[0.5, float("nan")])
    rec.close()


def test_unconsumed_and_discarded_batches(tmp_path):
    X, Y = vector_data()
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    rec.log_batch([1, 2])
    rec.discard_batches()  # e.g. a step skipped by GradScaler
    rec.log_batch([5, 6, 7])
    _one_step(model, opt, X, Y)
    rec.log_batch([9])  # never followed by a step
    with pytest.warns(RuntimeWarning, match="not followed by an optimizer step"):
        traj = rec.close()
    assert traj.num_steps == 1
    assert [m.indices.tolist() for m in traj.record(1).batches] == [[5, 6, 7]]


# ============================================================================ track(loader)
class DictDataset(Dataset):
    """Map-style dataset whose samples carry their own index (so tests can check the recording)."""

    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(3)
        self.X = torch.randn(n, 5, generator=g)
        self.Y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int):
        return {"x": self.X[i], "y": self.Y[i], "idx": i}


class TupleDataset(DictDataset):
    def __getitem__(self, i: int):
        return (self.X[i], self.Y[i], i)


def tuple_collate(items):
    xs, ys, ids = zip(*items)
    return torch.stack(xs), torch.stack(ys), list(ids)


class Stream(IterableDataset):
    def __iter__(self):
        yield from ({"x": torch.zeros(5), "y": 0} for _ in range(4))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_track_records_the_batches_actually_consumed(tmp_path, num_workers):
    ds = DictDataset(10)
    loader = DataLoader(
        ds, batch_size=4, shuffle=True, drop_last=False, num_workers=num_workers,
        generator=torch.Generator().manual_seed(7),
    )
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    consumed = []
    with rec:
        for _epoch in range(2):
            tracked = rec.track(loader)
            assert len(tracked) == len(loader) == 3
            for batch in tracked:
                assert isinstance(batch, dict) and set(batch) == {"x", "y", "idx"}
                opt.zero_grad()
                nll(model(batch["x"]), batch["y"]).mean().backward()
                opt.step()
                consumed.append(batch["idx"].clone())
    traj = rec.trajectory
    assert traj.num_steps == 6
    assert [len(c) for c in consumed] == [4, 4, 2, 4, 4, 2]  # partial last batch kept
    for s, idx in enumerate(consumed, start=1):
        r = traj.record(s)
        assert len(r.batches) == 1
        assert torch.equal(r.batches[0].indices, idx.to(torch.int64))
        assert torch.allclose(r.batches[0].weights, torch.full((len(idx),), 1 / len(idx), dtype=torch.float64))
    for epoch in range(2):
        seen = torch.cat(consumed[3 * epoch: 3 * epoch + 3]).sort().values
        assert seen.tolist() == list(range(10))
    order = torch.cat(consumed[:3]).tolist()
    assert order != list(range(10))  # really shuffled
    assert torch.cat(consumed[3:]).tolist() != order  # a new permutation each epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_track_iterates_like_the_plain_loader_with_a_seeded_generator(num_workers):
    """Recording must not change the run: with the same seeded generator, the tracked loader
    yields the same batches, in the same order, as the loader the user passed in."""
    def loader():
        return DataLoader(DictDataset(10), batch_size=4, shuffle=True, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(7))

    plain = [b["idx"].tolist() for b in loader()]
    from captum_explaind.recording.indexing import TrackedDataLoader

    logged = []
    tracked = [b["idx"].tolist() for b in TrackedDataLoader(loader(), lambda i: logged.append(i.tolist()))]
    assert tracked == logged  # the indices handed to the recorder are those of the batch yielded
    assert tracked == plain


def test_track_with_custom_collate_and_sampling_with_replacement(tmp_path):
    ds = TupleDataset(4)  # batches of 5 out of 4 items: every full batch repeats an item
    sampler = RandomSampler(ds, replacement=True, num_samples=12, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(ds, batch_size=5, sampler=sampler, collate_fn=tuple_collate)
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    consumed = []
    with rec:
        for x, y, ids in rec.track(loader):
            assert isinstance(ids, list)  # the user's collate function produced this batch
            opt.zero_grad()
            nll(model(x), y).mean().backward()
            opt.step()
            consumed.append(ids)
    traj = rec.trajectory
    assert [len(c) for c in consumed] == [5, 5, 2]
    assert any(len(set(c)) < len(c) for c in consumed)  # duplicates drawn
    for s, ids in enumerate(consumed, start=1):
        assert traj.record(s).batches[0].indices.tolist() == ids


def test_track_breaking_out_early_with_prefetching_workers(tmp_path):
    """Workers prefetch batches ahead; only the batches handed to the loop are recorded."""
    ds = DictDataset(24)
    loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=2, prefetch_factor=2)
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    for k, batch in enumerate(rec.track(loader)):
        opt.zero_grad()
        nll(model(batch["x"]), batch["y"]).mean().backward()
        opt.step()
        if k == 1:
            break
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unconsumed micro-batches" warning
        traj = rec.close()
    assert traj.num_steps == 2
    assert [traj.record(s).batches[0].indices.tolist() for s in (1, 2)] == [[0, 1, 2], [3, 4, 5]]


def test_track_rejects_unsupported_loaders(tmp_path):
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run")
    with pytest.raises(TypeError, match="IterableDataset"):
        rec.track(DataLoader(Stream(), batch_size=2))
    with pytest.raises(TypeError, match="batch_size is None"):
        rec.track(DataLoader(DictDataset(4), batch_size=None))
    with pytest.raises(TypeError, match="DataLoader"):
        rec.track([torch.zeros(3)])
    rec.close()
