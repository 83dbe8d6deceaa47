"""Random augmentation in the training set: warned about by name, its cost reported as the residual."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from captum_explaind import TrainingDataInfluence, TrajectoryRecorder
from captum_explaind.epk.augmentation import random_transforms

pytest.importorskip("captum_explaind.adapters.torchvision")
from torchvision import transforms as T  # noqa: E402


class Images(Dataset):
    """(image, label) pairs through an optional torchvision transform, like torchvision's datasets."""

    def __init__(self, X, Y, transform=None):
        self.X, self.Y, self.transform = X, Y, transform

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        x = self.X[i]
        return (self.transform(x) if self.transform is not None else x), self.Y[i]


class Noisy(Images):
    """Randomness without a transform attribute."""

    def __getitem__(self, i):
        return self.X[i] + 0.1 * torch.randn_like(self.X[i]), self.Y[i]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(nn.functional.avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory):
    torch.manual_seed(0)
    X = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    Y = torch.randint(0, 2, (12,))
    data = Images(X, Y, T.Compose([T.RandomHorizontalFlip(p=0.5), T.Normalize([0.0], [1.0])]))
    model = SmallCNN().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = TrajectoryRecorder(model, opt, tmp_path_factory.mktemp("aug") / "run")
    with rec:
        for s in range(4):
            idx = torch.arange(3 * s, 3 * s + 6) % 12
            xb = torch.stack([data[int(i)][0] for i in idx])  # augmented as a DataLoader would
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory, X, Y, data


def test_random_transforms_are_named():
    torch.manual_seed(0)
    X, Y = torch.randn(4, 1, 6, 6), torch.arange(4)
    assert random_transforms(Images(X, Y, T.Compose([T.RandomHorizontalFlip(0.5)]))) == ["RandomHorizontalFlip"]
    assert random_transforms(Subset(Images(X, Y, T.RandomVerticalFlip(0.5)), [0, 1, 2, 3])) == ["RandomVerticalFlip"]
    # always flipping is deterministic: replayable, no warning
    assert random_transforms(Images(X, Y, T.RandomHorizontalFlip(1.0))) == []
    assert random_transforms(Noisy(X, Y)) == ["Noisy"]
    assert random_transforms(Images(X, Y, T.Normalize([0.0], [2.0]))) == []
    assert random_transforms(TensorDataset(X, Y)) == []
    # a random transform that happens to be a no-op on the probe (p=0) is no evidence: no warning
    assert random_transforms(Images(X, Y, T.RandomHorizontalFlip(p=0.0))) == []
    rng = torch.get_rng_state()
    random_transforms(Noisy(X, Y))
    assert torch.equal(rng, torch.get_rng_state())  # the probe leaves the caller's RNG alone


def test_augmented_training_set_warns_and_reports_the_residual(augmented_run):
    model, traj, X, Y, data = augmented_run
    with pytest.warns(UserWarning, match="RandomHorizontalFlip"):
        tdi = TrainingDataInfluence(model, traj, data)
    res = tdi.explain(X[:2], target=1)
    change = res.change.abs().max()
    assert float(res.residual.abs().max()) > 1e-6 * float(change)  # the replay is inexact, and says so
    total = res.scores.sum(1) + res.regularization + res.residual + res.buffers + res.delta
    torch.testing.assert_close(total, res.change, rtol=0, atol=1e-12)


def test_deterministic_dataset_replays_exactly(tmp_path):
    torch.manual_seed(1)
    X = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    Y = torch.randint(0, 2, (12,))
    data = Images(X, Y, T.Normalize([0.0], [1.0]))
    model = SmallCNN().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = TrajectoryRecorder(model, opt, tmp_path / "det")
    with rec:
        for s in range(3):
            idx = torch.arange(3 * s, 3 * s + 6) % 12
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.stack([data[int(i)][0] for i in idx])), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tdi = TrainingDataInfluence(model, rec.trajectory, data)
    res = tdi.explain(X[:2], target=0)
    assert float(res.residual.abs().max()) < 1e-12 * float(res.change.abs().max())
