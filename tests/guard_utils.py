"""Shared helpers of the guard tests: a time limit per case and a tiny recorded run."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch

from training import OPTIMIZERS, RunConfig, TanhMLP, make_data, record_run


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (TimeoutError) if the block runs longer than ``seconds`` (SIGALRM; main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"the call did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def small_run(path, optimizer: str = "sgd_momentum", steps: int = 4, loss: str = "nll", n: int = 24, **cfg):
    """A float64 TanhMLP trained on generated vectors: (model, trajectory, X, Y)."""
    torch.manual_seed(0)
    model = TanhMLP(log_softmax=loss == "nll").double()
    X, Y = make_data("vector", n)
    traj, _ = record_run(model, X, Y, path, RunConfig(OPTIMIZERS[optimizer], steps=steps, loss=loss, **cfg))
    return model, traj, X, Y
