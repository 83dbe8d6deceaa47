"""The recorder under DDP (``torchrun``): rank 0 writes, every rank's micro-batches are gathered
into the step it records, and the other ranks run with stand-ins for the writer and the lock."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .. import distributed
from . import format as fmt

__all__ = ["gathered", "FollowerWriter", "FollowerLock"]


def gathered(pending: List[fmt.MicroBatch]) -> List[fmt.MicroBatch]:
    """Every rank's micro-batches of this step, in rank order (DDP averages the ranks' gradients,
    so each sample's weight is its rank's weight ÷ world size; RNG states travel with them)."""
    world = distributed.world_size()
    mine = [(mb.indices, mb.weights, getattr(mb, "rng_state", None), getattr(mb, "cuda_rng_state", None))
            for mb in pending]
    out = []
    for part in distributed.all_gather_objects(mine):
        for idx, w, rng, cuda_rng in part:
            mb = fmt.MicroBatch(indices=idx, weights=w / world)
            if rng is not None or cuda_rng is not None:
                mb.rng_state, mb.cuda_rng_state = rng, cuda_rng
            out.append(mb)
    return out


class FollowerWriter:
    """A non-writing rank's stand-in for the step writer: a step counts once handed over."""

    error: Optional[BaseException] = None
    failed_path: Optional[str] = None
    background = False
    cpu_seconds = 0.0

    def snapshot(self) -> None:
        return None

    def release(self, snap: Any) -> None:
        return None

    def submit(self, path: str, tensors: Any, metadata: Any, done: Any, snap: Any = None) -> None:
        done()

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class FollowerLock:
    """A non-writing rank holds no lock (rank 0 holds the directory's)."""

    stale: Optional[Dict[str, Any]] = None

    def acquire(self) -> None:
        return None

    def release(self, *, keep_stale: bool = False) -> None:
        return None

    def check(self) -> None:
        return None
