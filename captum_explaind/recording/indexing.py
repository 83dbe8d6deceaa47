"""Capture dataset indices from a ``DataLoader`` without the user threading them through.

:func:`tracked_loader` rebuilds a ``DataLoader`` over the same dataset, batch sampler, collate
function and worker settings, but with every item tagged by its dataset index. The index travels
through the worker processes with the item, is split off after collation and handed to a
callback *when the batch is yielded to the training loop*. So the recorded order is the order in
which the loop consumed the batches, regardless of prefetching or worker count.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["tracked_loader", "TrackedDataLoader"]


class _IndexedDataset(Dataset):
    """Wraps a map-style dataset so that ``ds[i]`` returns ``(i, original_item)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return int(index), self.base[index]


class _IndexedCollate:
    """Applies the user's collate function to the items and returns the indices beside them."""

    def __init__(self, collate: Callable[[List[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[Any]) -> Any:
        indices = torch.tensor([i for i, _ in items], dtype=torch.int64)
        return indices, self.collate([item for _, item in items])


class TrackedDataLoader:
    """Iterates like the wrapped ``DataLoader``; reports the indices of every yielded batch.

    Args:
        loader (DataLoader): the loader the training loop would otherwise use. Its dataset must be
            map-style (``__getitem__`` + ``__len__``) and it must batch automatically.
        on_batch (Callable[[Tensor], None]): called with the int64 dataset indices of each batch
            right before the batch is yielded.
    """

    def __init__(self, loader: DataLoader, on_batch: Callable[[torch.Tensor], None]) -> None:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"track() needs a torch.utils.data.DataLoader, got {type(loader).__name__}")
        if isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "track() cannot capture indices from an IterableDataset: its items have no dataset "
                "index. Use a map-style dataset, or call recorder.log_batch(indices) yourself."
            )
        if loader.batch_sampler is None:
            raise TypeError(
                "track() needs a DataLoader that batches (batch_size is None here); call "
                "recorder.log_batch(indices) yourself instead."
            )
        self.loader = loader
        self.on_batch = on_batch
        collate = loader.collate_fn if loader.collate_fn is not None else default_collate
        kwargs = dict(
            batch_sampler=loader.batch_sampler,
            num_workers=loader.num_workers,
            collate_fn=_IndexedCollate(collate),
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            persistent_workers=loader.persistent_workers,
            # The loader's iterator draws its base seed from this generator: without it the
            # shuffled order (and worker seeds) would differ from the untracked loader's.
            generator=loader.generator,
        )
        if hasattr(loader, "in_order"):
            kwargs["in_order"] = loader.in_order
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        self._inner = DataLoader(_IndexedDataset(loader.dataset), **kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __iter__(self) -> Iterator[Any]:
        for indices, batch in self._inner:
            self.on_batch(indices)
            yield batch


def tracked_loader(loader: DataLoader, on_batch: Callable[[torch.Tensor], None]) -> TrackedDataLoader:
    """Functional alias of :class:`TrackedDataLoader`."""
    return TrackedDataLoader(loader, on_batch)
