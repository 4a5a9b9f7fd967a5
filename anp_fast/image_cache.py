"""Decode the clean images of an ImageFolder once, into a uint8 file every later run memory-maps.

ANP draws ``iters x batch_size`` images with replacement from its clean set (2000 x 128 = 256,000 draws for
the published settings): decoding a JPEG at every draw costs more than the step on a GPU. The images a run
uses (clean and held-out: a small part of the training split) are decoded ONCE, resized and cropped exactly as
:func:`anp_fast.datasets.load_image` does, into ``DIR/images-KEY.u8`` (N x 3 x S x S bytes: 1.9 GB for
12,800 images at 224). KEY hashes the image paths, sizes and modification times and the crop, so a changed
file or another selection makes another cache. Later runs read rows of the file through ``np.memmap``
(read-only): the pages live in the operating system's page cache, shared by every process of the machine,
not copied into each. With several processes, the first process of each machine (LOCAL_RANK 0) decodes while
the others wait; the file appears atomically (written to a temporary name, then renamed), so an interrupted
build leaves no half cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError


def default_dir() -> str:
    """``$ANP_FAST_CACHE`` or ``~/.cache/anp_fast``."""
    return os.environ.get("ANP_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "anp_fast")


class _Decode(Dataset):
    def __init__(self, base, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, r):
        from .datasets import decode_image

        path, _ = self.base.samples[self.indices[r]]
        return decode_image(path, self.base.size, self.base.resize)


class CachedImages(Dataset):
    """``base`` (an :class:`~anp_fast.datasets.ImageFolderDataset`) with the images at ``indices`` read from
    the decoded cache at ``path``, the others decoded from their files as before. Same items as ``base``."""

    def __init__(self, base, indices: Sequence[int], path: str):
        self.base, self.path = base, path
        self.rows = {int(i): r for r, i in enumerate(indices)}
        self.targets = base.targets
        self.classes, self.samples = base.classes, base.samples
        self.size, self.resize = base.size, base.resize
        self._array = None  # opened lazily: a DataLoader worker opens its own map

    def __len__(self) -> int:
        return len(self.base)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            shape = (len(self.rows), 3, self.size, self.size)
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=shape)
        return self._array

    def __getitem__(self, i):
        r = self.rows.get(int(i))
        if r is None:
            return self.base[i]
        from .datasets import to_unit

        return to_unit(torch.from_numpy(np.array(self.array[r]))), int(self.targets[i])


def cache_key(base, indices: Sequence[int]) -> str:
    """What the decoded bytes depend on: each image's path, size and modification time, in order, and the
    resize and crop."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"v1 resize={base.resize} crop={base.size}\n".encode())
    for i in indices:
        path = base.samples[int(i)][0]
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _build(base, indices: Sequence[int], path: str, workers: int, progress: bool) -> None:
    from .progress import progress_bar

    n, size = len(indices), base.size
    need = n * 3 * size * size
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need + (64 << 20):
        raise DataError(f"the decoded-image cache needs {_size(need)} in {folder}, which has {_size(free)} free: "
                        "give another --image-cache DIR or --no-image-cache")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, 3, size, size))
        loader = DataLoader(_Decode(base, indices), batch_size=64, num_workers=workers)
        done = 0
        with progress_bar(total=n, desc="decoding the clean images once", unit="img", disable=not progress) as bar:
            for batch in loader:
                array[done:done + batch.shape[0]] = batch.numpy()
                done += batch.shape[0]
                bar.update(batch.shape[0])
        array.flush()
        del array
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cached_images(base, indices: Sequence[int], cache_dir: Optional[str] = None, workers: int = 0,
                  progress: bool = False, log=None, collective=None) -> CachedImages:
    """``base`` with the images at ``indices`` decoded once into the cache under ``cache_dir`` (default
    :func:`default_dir`) and read from there. ``collective``: the processes of a run (the first of each
    machine decodes, all wait for it); ``workers``: DataLoader processes that decode in parallel."""
    indices = [int(i) for i in indices]
    folder = cache_dir or default_dir()
    path = os.path.join(folder, f"images-{cache_key(base, indices)}.u8")
    if not os.path.exists(path):
        local_lead = int(os.environ.get("LOCAL_RANK", "0")) == 0 if collective is not None else True
        if local_lead:
            if log is not None:
                log(f"decoding {len(indices)} clean images once into {path} "
                    f"({_size(len(indices) * 3 * base.size ** 2)})")
            _build(base, indices, path, workers, progress)
    if collective is not None:  # the others wait for their machine's cache
        import torch.distributed as dist

        dist.barrier(group=collective.group)
    expected = len(indices) * 3 * base.size * base.size
    if not os.path.exists(path) or os.path.getsize(path) != expected:
        raise DataError(f"the decoded-image cache {path} is missing or has the wrong size (another process of "
                        "this run did not build it on this machine?): remove it, or run with --no-image-cache")
    return CachedImages(base, indices, path)
