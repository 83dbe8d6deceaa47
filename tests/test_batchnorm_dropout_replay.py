"""Dropout masks replayed from the recorded RNG states (CONTRACTS C1) in the coupled gradient path,
alone and together with train-mode BatchNorm; and the fallback detection for older recordings."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import TrainingDataInfluence, TrajectoryRecorder
from captum_explaind.epk.train_grads import training_modes


class DropNet(nn.Module):
    def __init__(self, batch_norm: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def run(tmp_path, batch_norm: bool):
    torch.manual_seed(0)
    model = DropNet(batch_norm).double()
    X, Y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = TrajectoryRecorder(model, opt, tmp_path / f"drop{int(batch_norm)}")
    model.train()
    with rec:
        for s in range(4):
            idx = torch.arange(3 * s, 3 * s + 5) % 12
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory, X, Y


@pytest.mark.parametrize("batch_norm", [False, True], ids=["dropout", "dropout+batchnorm"])
def test_recorded_dropout_masks_are_replayed(tmp_path, batch_norm):
    model, traj, X, Y = run(tmp_path, batch_norm)
    assert traj.record(1).batches[0].rng_state is not None
    modes = training_modes(traj, model)
    assert modes.source == "manifest" and modes.dropout == ["drop"]
    rng = torch.get_rng_state()
    res = TrainingDataInfluence(model, traj, TensorDataset(X, Y)).explain(X[:2], target=0)
    assert torch.equal(rng, torch.get_rng_state())  # the replay ran under a forked RNG
    assert res.train_grads == "coupled"
    change = res.change.abs().max()
    assert float(res.residual.abs().max()) < 1e-12 * float(change)
    assert res.grad_scale == pytest.approx({s: 1.0 for s in range(1, 5)}, abs=1e-12)
    total = res.scores.sum(1) + res.regularization + res.residual + res.buffers + res.delta
    torch.testing.assert_close(total, res.change, rtol=0, atol=1e-12)
    # negative control: without the masks (each sample alone, dropout off) the replay misses
    off = TrainingDataInfluence(model, traj, TensorDataset(X, Y), train_grads="independent").explain(X[:2], target=0)
    assert float(off.residual.abs().max()) > 1e-3 * float(change)


def test_older_recordings_detect_batch_norm_from_moved_statistics(tmp_path):
    model, traj, X, Y = run(tmp_path, True)
    traj.manifest.pop("training_modes")
    modes = training_modes(traj, model)
    assert modes.source == "buffers" and modes.batch_norm == ["bn"] and modes.dropout == []
