"""All ``torch.distributed`` state of the library, in one place (nobody else imports it).

Under ``torchrun`` (an initialized default process group, any backend) the engine shards its
work over the ranks and gives every rank the full result; outside a process group — or in a
group of one — every function here is the identity and nothing changes. The helpers:

* :func:`active`, :func:`rank`, :func:`world_size`, :func:`is_writer` — where this process stands;
* :func:`shard` — the contiguous, balanced part of a sequence (steps, input rows) a rank owns;
* :func:`pair_segment` / :class:`StepClaims` — a sequence split over pairs of ranks, the two ranks of a
  pair taking its items from both ends, one at a time, until they meet (balanced by time, not count);
* :func:`all_reduce_sum_` / :func:`all_reduce_max` / :func:`all_reduce_max_` — combining per-rank
  partial results, in place;
* :func:`all_gather_shards` — a tensor's rows from every rank's :func:`shard` of them, on every rank;
* :func:`send_tensors` / :func:`recv_tensors` — tensors from one rank to another (a carry handed down
  the ranks' blocks of steps);
* :func:`all_gather_objects` / :func:`gather_indices` / :func:`broadcast_object` — small Python
  payloads (micro-batch indices of a ``DistributedSampler`` run, counters);
* :func:`shutdown` — leaving the group at the end of a script (garbage collected first).

Tensors travel on the device the backend supports (``gloo``: CPU; ``nccl``: CUDA) and come back
where they were, in their own dtype, so float64 results stay float64.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

__all__ = ["active", "rank", "world_size", "is_writer", "shard", "pair_segment", "StepClaims", "all_reduce_sum_",
           "all_reduce_max", "all_reduce_max_", "all_gather_shards", "send_tensors", "recv_tensors", "exchange",
           "all_gather_objects", "gather_indices", "broadcast_object", "barrier", "check_same", "shutdown"]

T = TypeVar("T")


def active() -> bool:
    """True inside an initialized default process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes shared files (rank 0, or the only process)."""
    return rank() == 0


def shard(items: Sequence[T], index: int | None = None, count: int | None = None) -> List[T]:
    """The contiguous part of ``items`` owned by rank ``index`` of ``count`` (default: this rank).

    Parts differ in length by at most one, earlier ranks taking the longer ones; a rank may get
    nothing when there are fewer items than ranks.
    """
    index = rank() if index is None else index
    count = world_size() if count is None else count
    n = len(items)
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return list(items[start:stop])


def pair_segment(items: Sequence[T], index: Optional[int] = None, count: Optional[int] = None
                 ) -> Tuple[List[T], int, bool]:
    """The part of ``items`` shared by rank ``index``'s pair, the pair's number, and whether this rank
    takes the part's items from the front (the pair's first rank, or a rank alone) or the back.

    Ranks ``2j`` and ``2j + 1`` form pair ``j``; with an odd ``count`` the last rank is alone. The
    pairs' parts are contiguous, in rank order, sized by the ranks they hold (a lone rank's part is
    half a pair's), so every item lies in exactly one part.
    """
    index = rank() if index is None else index
    count = world_size() if count is None else count
    pair = index // 2
    # a pair's part is the union of its ranks' shards: sized by rank count, contiguous, covering all
    members = [r for r in (2 * pair, 2 * pair + 1) if r < count]
    part = [x for r in members for x in shard(items, r, count)]
    return part, pair, index == members[0]


def _default_store() -> Any:
    """The default process group's key-value store (None where this torch has no such accessor)."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except (RuntimeError, ValueError):
        return None


def store_available() -> bool:
    """Whether :class:`StepClaims` can use the process group's store (the same on every rank)."""
    return active() and _default_store() is not None


class StepClaims:
    """A shared counter through which the two ranks of a pair take the ``n`` items of their part
    (:func:`pair_segment`) one at a time, the first rank from the front and the second from the back.

    :meth:`take` succeeds exactly ``n`` times over both ranks: each success is one more item taken
    from the part, so the front and back runs never overlap and together cover it, wherever they
    meet. Where the work per item varies (refined steps), the ranks meet where their *times*
    balance rather than their counts. Which rank integrates an item therefore depends on timing;
    the results are the same sums, grouped differently (round-off). The counter lives in the
    process group's store (an atomic ``add``; one round trip per item).

    Created collectively (every rank of the group, in the same order: the key is rank 0's).
    :meth:`available` is False where the store cannot be reached; then nothing is taken.
    """

    def __init__(self, n: int, pair: int) -> None:
        self.n = n
        self._store = _default_store()
        tag = broadcast_object(uuid.uuid4().hex)  # one key for all ranks, new for every sweep
        self._key = f"captum_explaind/claims/{tag}/{pair}"

    @property
    def available(self) -> bool:
        return self._store is not None

    def take(self) -> bool:
        """Claim the next item of the part for this rank; False once all ``n`` are taken."""
        return int(self._store.add(self._key, 1)) <= self.n

    def close(self) -> None:
        """Drop the counter (after a collective that every rank of the pair has passed)."""
        try:
            self._store.delete_key(self._key)
        except (RuntimeError, AttributeError):  # a store without delete: the key stays (a few bytes)
            pass


def _comm_device(t: torch.Tensor) -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place (a no-op outside a process group).

    All tensors of one dtype and device go in one flat buffer, so the ranks exchange a few
    messages however many accumulators a view holds.
    """
    if not active():
        return
    groups: dict = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.dtype, t.device), []).append(t)
    for (_, device), ts in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = torch.cat([t.reshape(-1) for t in ts]).to(_comm_device(ts[0]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(device)
        off = 0
        for t in ts:
            t.copy_(flat[off : off + t.numel()].view_as(t))
            off += t.numel()


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over the ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_max_(t: torch.Tensor) -> None:
    """Elementwise maximum of ``t`` over the ranks, in place (a no-op outside a process group)."""
    if not active() or not t.numel():
        return
    buf = t.to(_comm_device(t))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    t.copy_(buf.to(t.device))


def all_gather_shards(part: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """The whole tensor of ``n`` rows (along ``dim``) from every rank's :func:`shard` of them.

    Each rank passes its own rows ``part`` (``len(shard(range(n)))`` of them along ``dim``); every
    rank gets all ``n`` in rank order. One ``all_gather`` of the largest part: a rank sends its
    rows only, half the traffic of an all-reduce of the whole tensor, and nothing is added, so the
    rows arrive bit for bit. Outside a process group: ``part`` itself.
    """
    if not active():
        return part
    world = world_size()
    sizes = [len(shard(range(n), r, world)) for r in range(world)]
    if part.shape[dim] != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {part.shape[dim]} rows, its shard of {n} has {sizes[rank()]}")
    size = max(sizes)
    moved = part.movedim(dim, 0)
    send = moved.to(_comm_device(part))
    if send.shape[0] < size:  # parts differ by one row: pad to the common size
        send = torch.cat([send, send.new_zeros((size - send.shape[0],) + send.shape[1:])])
    recv = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(recv, send.contiguous())
    whole = torch.cat([r[:k] for r, k in zip(recv, sizes)]).to(part.device)
    return whole.movedim(0, dim)


def send_tensors(tensors: Sequence[torch.Tensor], dst: int, tag: int) -> None:
    """Send ``tensors`` to rank ``dst`` (point to point, one message each, tags ``tag, tag+1, …``);
    the receiver calls :func:`recv_tensors` with buffers of the same shapes and dtypes."""
    if not active():
        return
    reqs = [dist.isend(t.contiguous().to(_comm_device(t)), dst=dst, tag=tag + i) for i, t in enumerate(tensors)]
    for r in reqs:
        if r is not None:
            r.wait()


def recv_tensors(likes: Sequence[torch.Tensor], src: int, tag: int) -> List[torch.Tensor]:
    """Receive from rank ``src`` what it sent by :func:`send_tensors`: tensors shaped and typed
    like ``likes``, where they are."""
    if not active():
        return []
    bufs = [torch.empty(t.shape, dtype=t.dtype, device=_comm_device(t)) for t in likes]
    reqs = [dist.irecv(b, src=src, tag=tag + i) for i, b in enumerate(bufs)]
    for r in reqs:
        if r is not None:
            r.wait()
    return [b.to(t.device) for b, t in zip(bufs, likes)]


def exchange(send: Dict[int, torch.Tensor], receive: Sequence[int], peer: int, like: torch.Tensor
             ) -> Dict[int, torch.Tensor]:
    """Point to point with rank ``peer``: send it ``send`` (key → tensor), receive from it the
    tensors of keys ``receive``, each shaped and typed like ``like`` (keys are the message tags)."""
    if not active() or (not send and not receive):
        return {}
    device = _comm_device(like)
    reqs = [dist.isend(t.contiguous().to(device), dst=peer, tag=int(k)) for k, t in sorted(send.items())]
    got = {int(k): torch.empty(like.shape, dtype=like.dtype, device=device) for k in sorted(receive)}
    reqs += [dist.irecv(buf, src=peer, tag=k) for k, buf in got.items()]
    for r in reqs:
        if r is not None:
            r.wait()
    return {k: buf.to(like.device) for k, buf in got.items()}


def all_gather_objects(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` outside a process group)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_indices(indices: torch.Tensor) -> torch.Tensor:
    """The micro-batch indices of every rank, concatenated in rank order (CPU int64).

    Under DDP with a ``DistributedSampler`` each rank trains on its own part of the global batch;
    the optimizer step applies the average of all of them, so the recorded step must hold all.
    """
    idx = torch.as_tensor(indices).reshape(-1).to("cpu", torch.int64)
    parts = all_gather_objects(idx)
    return torch.cat(parts) if len(parts) > 1 else idx


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same(fingerprint: Any, what: str) -> None:
    """Raise ``ValueError`` on every rank unless all ranks passed an equal ``fingerprint``.

    A split computation is only the full result when every rank asked the same question; ranks
    that explain different inputs must say so (``EPKOptions(distributed=False)``) instead of
    silently summing unrelated parts.
    """
    if not active():
        return
    prints = all_gather_objects(fingerprint)
    differ = [r for r, p in enumerate(prints) if p != prints[0]]
    if differ:
        raise ValueError(
            f"inside a process group of {len(prints)} ranks the work is split over the ranks, so every rank must "
            f"call with the same {what}; rank(s) {differ} differ from rank 0. To compute on each rank alone, "
            "pass distributed=False"
        )


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the default process group: collect garbage, wait for every rank, then
    ``destroy_process_group`` (a no-op where none is initialized). Called while an exception
    propagates (a ``finally`` block), it does not wait: the other ranks may never arrive.

    Calling ``destroy_process_group`` directly after the sweeps, 2-rank gloo launches of
    ``benchmarks/scaling.py`` ended in ``terminate called without an active exception`` (SIGABRT
    after the script's last line, no Python frame) in about 1 of 4 to 8 launches here
    (torch 2.13, CPU); with the collection and barrier first, 0 of 14. Objects that reference
    tensors and process-group work and sit in reference cycles are then freed while the
    interpreter and the group are still alive, not during interpreter finalization.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    import gc

    from .epk import allocator

    gc.collect()
    if dist.get_world_size() > 1 and sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()
    allocator.release()  # the heap kept between sweeps under the group (epk/allocator.py)

