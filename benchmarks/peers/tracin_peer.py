"""Captum's ``TracInCP`` set up on a trajectory recorded by this library.

TracInCP's checkpoint s is θ_{s−1} with the learning rate η_s of step s (s = 1..N), so that
Σ_s η_s ∇f(θ_{s−1}; x)·∇L_k(θ_{s−1}) is the first-order (left-endpoint) path-kernel sum over the
same steps. Checkpoints are plain tensor dicts loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
from typing import List

import torch
from torch import nn

from captum_explaind import Trajectory


def save_checkpoints(trajectory: Trajectory, directory: str) -> List[str]:
    """θ_{s−1} with the learning rate η_s of step s, for s = 1..N (TracInCP's checkpoint s)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(1, trajectory.num_steps + 1):
        path = os.path.join(directory, f"checkpoint_{s:05d}.pt")
        params = {k: v.detach().clone() for k, v in trajectory.params(s - 1).items()}
        torch.save({"params": params, "lr": float(trajectory.record(s).lr[0])}, path)
        paths.append(path)
    return paths


def load_checkpoint(model: nn.Module, path: str) -> float:
    ck = torch.load(path, weights_only=True)
    model.load_state_dict(ck["params"])
    return float(ck["lr"])


def label_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example test "loss" = the label's output, so TracInCP scores the same quantity as ours."""
    return outputs.gather(1, targets.view(-1, 1))[:, 0]
