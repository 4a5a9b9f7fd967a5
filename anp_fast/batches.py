"""The clean batches the ANP loop draws (with replacement, seeded, resumable) from tensors, a Dataset or a
DataLoader; the digits data sets are in :mod:`anp_fast.datasets`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError


def check_labels(y: Tensor, num_classes: int) -> None:
    """Raise DataError unless ``y`` holds integer class labels in [0, num_classes)."""
    if not isinstance(y, Tensor):
        raise DataError(f"labels must be a tensor, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise DataError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise DataError(f"labels must be 1-D (one class index per image), got shape {tuple(y.shape)}")
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise DataError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} outputs; "
                            f"found labels from {low} to {high}")


class BatchSource:
    """Yields batches (x, y) for iterations ``start .. iters - 1``. ``on_host``: batches arrive on the CPU (cheap
    to check); ``labels``: every label of the clean set when known up front. ``state()`` / ``restore(state,
    start)`` let a run resume where it stopped, drawing the same batches as an uninterrupted run."""

    on_host = True
    labels: Optional[Tensor] = None
    exact_resume = True  # restore() reproduces the batches an uninterrupted run would have drawn
    start = 0
    part: Optional[slice] = None  # several processes: this one's slice of every global batch (see shard)
    batch_size: Optional[int] = None  # the global batch size, when every batch has it

    def shard(self, part: slice) -> bool:
        """Yield only ``part`` of every global batch (the same draws as unsharded, so every process sees its
        slice of the same batch and the state resumes under any number of processes); False if this source
        cannot (the caller then slices whole batches)."""
        return False

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def state(self):
        return None

    def restore(self, state, start: int) -> None:
        self.start = start


class TensorPairSource(BatchSource):
    def __init__(self, x: Tensor, y: Tensor, batch_size: int, iters: int, seed: int):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"clean images and labels differ in length: {x.shape[0]} vs {y.shape[0]}")
        if y.dtype.is_floating_point:
            raise DataError(f"labels must be integer class indices, got dtype {y.dtype}")
        self.x, self.y = x, y.long()
        self.labels = self.y
        self.on_host = x.device.type == "cpu"
        self.batch_size, self.iters = batch_size, iters
        self.generator = torch.Generator().manual_seed(seed)

    def state(self):
        return self.generator.get_state()

    def restore(self, state, start: int) -> None:
        self.generator.set_state(state)
        self.start = start

    def shard(self, part: slice) -> bool:
        self.part = part
        return True

    def __iter__(self):
        n = self.x.shape[0]
        for _ in range(self.start, self.iters):
            idx = torch.randint(n, (self.batch_size,), generator=self.generator)
            if self.part is not None:
                idx = idx[self.part]
            if not self.on_host:
                idx = idx.to(self.x.device)
            yield self.x[idx], self.y[idx]


class _SeededBatches(Sampler):
    """Index batches drawn with replacement, batch i from a generator seeded by (seed, i): any iteration's batch
    is known without drawing the ones before it, so a resumed run (and DataLoader workers) see the same data."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, iters: int, part: Optional[slice] = None):
        self.n, self.batch_size, self.seed, self.start, self.iters = n, batch_size, seed, start, iters
        self.part = part

    def __len__(self):
        return self.iters - self.start

    def __iter__(self):
        g = torch.Generator()
        for i in range(self.start, self.iters):
            g.manual_seed(self.seed * 1_000_003 + i)
            idx = torch.randint(self.n, (self.batch_size,), generator=g)
            yield (idx if self.part is None else idx[self.part]).tolist()


class DatasetSource(BatchSource):
    """Batches drawn with replacement from a Dataset (seeded per iteration), loaded by a DataLoader."""

    def __init__(self, dataset: Dataset, batch_size: int, iters: int, seed: int, num_workers: int = 0):
        self.dataset, self.batch_size, self.iters, self.seed = dataset, batch_size, iters, seed
        self.num_workers = num_workers

    def shard(self, part: slice) -> bool:
        self.part = part
        return True

    def __iter__(self):
        sampler = _SeededBatches(len(self.dataset), self.batch_size, self.seed, self.start, self.iters, self.part)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers)
        for batch in loader:
            yield _as_pair(batch)


class LoaderSource(BatchSource):
    """Cycles over a user's DataLoader (its own sampling and batch size) for ``iters`` batches. A resumed run
    skips the batches already used; it sees the same data only if the loader's own order is seeded."""

    exact_resume = False

    def __init__(self, loader: DataLoader, iters: int):
        self.loader, self.iters = loader, iters

    def __iter__(self):
        produced, skip = self.start, self.start
        while produced < self.iters:
            empty = True
            for batch in self.loader:
                empty = False
                if skip:
                    skip -= 1
                    continue
                yield _as_pair(batch)
                produced += 1
                if produced == self.iters:
                    return
            if empty:
                raise DataError("the clean DataLoader yielded no batch")


class EpochSource(BatchSource):
    """Epochs over an (x, y) tensor pair, each a shuffle (epoch e's order from a generator seeded by
    (seed, e)) cut into batches of ``batch_size``, the last one partial: a DataLoader with ``shuffle=True``, as
    the RNP code reads its clean set. ``len(source)`` batches in all; any batch is known without drawing the
    ones before it, so a resumed run sees the same data."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, epochs: int, seed: int):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"clean images and labels differ in length: {x.shape[0]} vs {y.shape[0]}")
        if x.shape[0] == 0:
            raise DataError("the clean set is empty")
        self.x, self.y = x, y.long()
        self.labels = self.y
        self.on_host = x.device.type == "cpu"
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.per_epoch = -(-x.shape[0] // batch_size)

    def __len__(self) -> int:
        return self.epochs * self.per_epoch

    def order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.x.shape[0], generator=g)

    def __iter__(self):
        order, current = None, None
        for i in range(self.start, len(self)):
            epoch, b = divmod(i, self.per_epoch)
            if epoch != current:
                order, current = self.order(epoch), epoch
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if not self.on_host:
                idx = idx.to(self.x.device)
            yield self.x[idx], self.y[idx]


def _as_pair(batch) -> Tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            return x, y
    raise DataError("each clean batch must be (images, labels) tensors; got "
                    f"{type(batch).__name__}")


def batch_source(clean_data, batch_size: int, iters: int, seed: int) -> BatchSource:
    """Batches for the ANP loop from an (x, y) tensor pair, a Dataset (sampled with replacement, seeded)
    or a DataLoader (used as it is, cycled); a BatchSource is used as it is."""
    if isinstance(clean_data, BatchSource):
        return clean_data
    if isinstance(clean_data, (tuple, list)) and len(clean_data) == 2 and all(
            isinstance(t, Tensor) for t in clean_data):
        x, y = clean_data
        if x.shape[0] == 0:
            raise DataError("the clean set is empty")
        return TensorPairSource(x, y, batch_size, iters, seed)
    if isinstance(clean_data, DataLoader):
        try:
            if len(clean_data) == 0:
                raise DataError("the clean set is empty (the DataLoader has no batch)")
        except TypeError:
            pass  # an iterable-style loader has no length
        return LoaderSource(clean_data, iters)
    if isinstance(clean_data, Dataset):
        try:
            n = len(clean_data)
        except TypeError as exc:
            raise DataError("a clean Dataset must have a length (or pass a DataLoader)") from exc
        if n == 0:
            raise DataError("the clean set is empty")
        return DatasetSource(clean_data, batch_size, iters, seed)
    raise DataError("clean_data must be a Dataset, a DataLoader or an (images, labels) tensor pair; got "
                    f"{type(clean_data).__name__}")
