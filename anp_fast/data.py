"""Clean data for the ANP loop (batches drawn with replacement) and the digits data set of the demo."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

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
    """Yields ``iters`` batches (x, y). ``on_host``: batches arrive on the CPU (cheap to check);
    ``labels``: every label of the clean set when known up front."""

    on_host = True
    labels: Optional[Tensor] = None

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        raise NotImplementedError


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

    def __iter__(self):
        n = self.x.shape[0]
        for _ in range(self.iters):
            idx = torch.randint(n, (self.batch_size,), generator=self.generator)
            if not self.on_host:
                idx = idx.to(self.x.device)
            yield self.x[idx], self.y[idx]


class LoaderSource(BatchSource):
    """Cycles over a user's DataLoader (its own sampling and batch size) for ``iters`` batches."""

    def __init__(self, loader: DataLoader, iters: int):
        self.loader, self.iters = loader, iters

    def __iter__(self):
        produced = 0
        while produced < self.iters:
            empty = True
            for batch in self.loader:
                empty = False
                yield _as_pair(batch)
                produced += 1
                if produced == self.iters:
                    return
            if empty:
                raise DataError("the clean DataLoader yielded no batch")


def _as_pair(batch) -> Tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            return x, y
    raise DataError("each clean batch must be (images, labels) tensors; got "
                    f"{type(batch).__name__}")


def batch_source(clean_data, batch_size: int, iters: int, seed: int) -> BatchSource:
    """Batches for the ANP loop from an (x, y) tensor pair, a Dataset (sampled with replacement, seeded)
    or a DataLoader (used as it is, cycled)."""
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
        sampler = RandomSampler(clean_data, replacement=True, num_samples=batch_size * iters,
                                generator=torch.Generator().manual_seed(seed))
        return LoaderSource(DataLoader(clean_data, batch_size=batch_size, sampler=sampler), iters)
    raise DataError("clean_data must be a Dataset, a DataLoader or an (images, labels) tensor pair; got "
                    f"{type(clean_data).__name__}")


@dataclass
class Split:
    x: Tensor
    y: Tensor

    def __len__(self):
        return self.x.shape[0]


@dataclass
class DigitsSplits:
    train: Split
    clean: Split  # the defender's clean set: the attack never touches it
    test: Split
    num_classes: int = 10


def load_digits(size: int = 16, clean_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 0) -> DigitsSplits:
    """scikit-learn's digits (1797 real 8x8 images shipped with scikit-learn), scaled to [0, 1] and
    upsampled to ``size`` x ``size``, split reproducibly and per class into disjoint train/clean/test."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.tensor(raw.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "clean": [], "test": []}
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        n_clean = round(len(idx) * clean_fraction)
        parts["test"].append(idx[:n_test])
        parts["clean"].append(idx[n_test:n_test + n_clean])
        parts["train"].append(idx[n_test + n_clean:])
    splits = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=g)]
        splits[name] = Split(x[idx].contiguous(), y[idx].contiguous())
    return DigitsSplits(**splits)
