"""Checks before a recorder appends to an existing recording (``TrajectoryRecorder(resume=True)``).

Appending is only correct if training goes on from exactly the state the recording ends in:
the same architecture, optimizer and recording options, and the live parameters, buffers and
optimizer state bit-identical (as stored) to those of the last complete step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
from torch import nn

from ..errors import TrajectoryMismatchError
from .trajectory import Trajectory

__all__ = ["check_manifest_compatible", "check_state_matches"]


def check_manifest_compatible(old: Dict[str, Any], new: Dict[str, Any], path: str) -> None:
    """Raise :class:`TrajectoryMismatchError` naming the first field in which the recording at
    ``path`` (manifest ``old``) differs from what this recorder would write (``new``)."""
    fields = [
        ("model.params", lambda m: m["model"]["params"]),
        ("model.buffers", lambda m: m["model"].get("buffers", [])),
        ("optimizer.class", lambda m: m["optimizer"]["class"]),
        ("optimizer.family", lambda m: m["optimizer"]["family"]),
        ("optimizer.n_groups", lambda m: m["optimizer"]["n_groups"]),
        ("optimizer.state_keys", lambda m: m["optimizer"].get("state_keys", [])),
        ("recording.store_dtype", lambda m: m.get("recording", {}).get("store_dtype")),
        ("recording.reduction", lambda m: m.get("recording", {}).get("reduction")),
    ]
    for name, get in fields:
        a, b = get(old), get(new)
        if a != b:
            if name == "model.params" and isinstance(a, list):
                diff = next((f"{x} vs. now {y}" for x, y in zip(a, b) if x != y), f"{len(a)} vs. now {len(b)} entries")
                detail = f" (first difference: recorded {diff})"
            else:
                detail = f" (recorded {a!r:.200}, now {b!r:.200})"
            raise TrajectoryMismatchError(
                f"cannot resume {path!r}: its {name} differs from this model/optimizer/recorder{detail}; "
                "resume with the same architecture, optimizer and recording options, or record to a new path"
            )


def _compare(what: str, live: torch.Tensor, recorded: torch.Tensor, step: int, path: str) -> None:
    if live.shape == recorded.shape and live.dtype == recorded.dtype and torch.equal(live, recorded):
        return
    if live.shape == recorded.shape and live.is_floating_point() and recorded.is_floating_point():
        diff = f"max |difference| {float((live.double() - recorded.double()).abs().max()):.3g}"
    else:
        diff = f"shape/dtype {tuple(live.shape)}/{live.dtype} vs. {tuple(recorded.shape)}/{recorded.dtype}"
    where = "θ_0" if step == 0 else f"its last complete step {step}"
    raise TrajectoryMismatchError(
        f"cannot resume {path!r}: {what} of the live model/optimizer differs from {where} ({diff}). "
        f"Resuming must continue from exactly the state the recording ends in: load the checkpoint "
        f"(model and optimizer) saved right after step {step}, or record to a new path"
    )


def check_state_matches(
    traj: Trajectory,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stored: Callable[[torch.Tensor], torch.Tensor],
    trainable: List[str],
) -> None:
    """Check that ``model``/``optimizer`` are in the state of ``traj``'s last complete step.

    ``stored`` converts a live tensor the way the recorder stores it, so the comparison is bit
    for bit in the stored dtype. Compared: trainable parameters (θ_N), frozen parameters (θ_0),
    buffers in effect after step N, and the recorded optimizer state and step counts of step N.
    """
    n, path = traj.num_steps, traj.path
    params = dict(model.named_parameters())
    recorded = traj.params(n)
    for name in trainable:
        _compare(f"parameter {name!r}", stored(params[name]), recorded[name], n, path)
    for name, value in traj.frozen_params().items():
        _compare(f"frozen parameter {name!r}", stored(params[name]), value, 0, path)
    buffers = dict(model.named_buffers())
    for name, value in traj.buffers(n).items():
        _compare(f"buffer {name!r}", stored(buffers[name]), value, n, path)
    if n == 0:
        return
    record = traj.record(n)
    for key in traj.state_keys:
        for name, value in traj.state(n, key).items():
            live = optimizer.state.get(params[name], {}).get(key)
            if not isinstance(live, torch.Tensor):
                raise TrajectoryMismatchError(
                    f"cannot resume {path!r}: the optimizer has no {key!r} state for {name!r}, recorded at step {n}; "
                    "load the optimizer's state saved with the model (optimizer.load_state_dict)"
                )
            _compare(f"optimizer state {key!r} of {name!r}", stored(live), value, n, path)
    for name, count in record.state_step.items():
        live_step = optimizer.state.get(params[name], {}).get("step")
        if live_step is None or int(float(live_step)) != count:
            raise TrajectoryMismatchError(
                f"cannot resume {path!r}: the optimizer's step count for {name!r} is {live_step}, but it was "
                f"{count} after the recording's last complete step {n}; load the optimizer state saved then"
            )
