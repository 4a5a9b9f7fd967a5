"""Input normalisation as data: the mean/std a model was trained with, by convention name or given explicitly.

A checkpoint only works with the normalisation it was trained under; a model evaluated with another one loses
accuracy silently (the published ANP code's CIFAR-10 std is (0.2023, 0.1994, 0.2010), torchvision-style code
uses (0.2470, 0.2435, 0.2616): the same checkpoint lost half its clean accuracy between the two). So the
convention is a setting (``--normalize``), every report states it, and checkpoints anp_fast writes carry it in
their metadata (:func:`to_metadata` / :func:`from_metadata`), read back when no setting is given.

Conventions (``--normalize NAME``), each with its source:

- ``dataset`` (default): the data set's own constants (:mod:`anp_fast.datasets`).
- ``published``: csdongxian/ANP_backdoor (``optimize_mask_cifar.py``, ``prune_neuron_cifar.py``): CIFAR-10
  mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010). CIFAR-10 only (the code has no other data set).
- ``backdoorbench``: SCLBD/BackdoorBench ``utils/dataset_and_transform_generate.py::get_dataset_normalization``:
  CIFAR-10 (0.4914, 0.4822, 0.4465)/(0.247, 0.243, 0.261), CIFAR-100 (0.5071, 0.4865, 0.4409)/(0.2673, 0.2564,
  0.2762), MNIST 0.5/0.5, ImageNet torchvision's.
- ``torchvision``: ImageNet's (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225), as torchvision's pretrained weights.
- ``none``: mean 0, std 1 (the model sees pixels in [0, 1]).
- explicit ``MEAN/STD``, comma-separated per channel (one value: every channel), e.g. ``0.5/0.25`` or
  ``0.49,0.48,0.45/0.2,0.2,0.2``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# data set name (DatasetSplits.name) -> (mean, std) of each named convention
_TABLES: Dict[str, Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]]] = {
    "published": {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))},
    "backdoorbench": {"cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
                      "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                      "mnist5k": ((0.5,), (0.5,)),
                      "imagefolder": IMAGENET},
}
CONVENTIONS = ("dataset", "published", "backdoorbench", "torchvision", "none")
META_KEY = "anp_fast.normalization"


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std``; ``name``: the convention it came from (or ``explicit``)."""

    name: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def describe(self) -> str:
        fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in v) + ")"  # noqa: E731
        return f"{self.name}: mean {fmt(self.mean)}, std {fmt(self.std)}"

    def to_dict(self) -> Dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}


def _numbers(text: str, what: str, spec: str) -> Tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--normalize {spec!r}: the {what} {text!r} is not a comma-separated list of numbers; "
                          f"give a convention ({', '.join(CONVENTIONS)}) or MEAN/STD") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--normalize {spec!r}: the {what} must be finite")
    return values


def _fit(values: Sequence[float], channels: int, what: str, spec: str) -> Tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise ConfigError(f"--normalize {spec!r}: {len(values)} {what} values for {channels}-channel images")
    return tuple(values)


def resolve(spec: Optional[str], data_name: str, channels: int, default_mean: Sequence[float],
            default_std: Sequence[float]) -> Normalization:
    """The normalisation ``spec`` names for a data set (``data_name``: its DatasetSplits.name) with
    ``channels`` channels; ``None`` or ``dataset``: the data set's own ``default_mean``/``default_std``."""
    text = "dataset" if spec is None else str(spec).strip()
    key = text.lower()
    if key == "dataset":
        norm = Normalization("dataset", tuple(default_mean), tuple(default_std))
    elif key == "none":
        norm = Normalization("none", (0.0,) * channels, (1.0,) * channels)
    elif key == "torchvision":
        norm = Normalization("torchvision", *IMAGENET)
    elif key in _TABLES:
        table = _TABLES[key]
        if data_name not in table:
            raise ConfigError(f"--normalize {key}: that convention has no constants for {data_name} (it defines "
                              f"{', '.join(sorted(table))}); give MEAN/STD explicitly")
        norm = Normalization(key, *table[data_name])
    elif "/" in text:
        mean_text, _, std_text = text.partition("/")
        norm = Normalization("explicit", _numbers(mean_text, "mean", text), _numbers(std_text, "std", text))
    else:
        raise ConfigError(f"--normalize {text!r}: unknown; give a convention ({', '.join(CONVENTIONS)}) or "
                          "MEAN/STD, e.g. 0.4914,0.4822,0.4465/0.2023,0.1994,0.2010")
    mean, std = _fit(norm.mean, channels, "mean", text), _fit(norm.std, channels, "std", text)
    if any(s <= 0 for s in std):
        raise ConfigError(f"--normalize {text!r}: every std must be > 0")
    return Normalization(norm.name, mean, std)


def to_metadata(norm: Normalization) -> Dict[str, str]:
    """The safetensors metadata entry that records ``norm`` in a checkpoint."""
    return {META_KEY: json.dumps(norm.to_dict())}


def from_metadata(metadata: Optional[Mapping[str, str]]) -> Optional[Normalization]:
    """The normalisation recorded in a checkpoint's metadata, or None (absent or unreadable)."""
    if not metadata or META_KEY not in metadata:
        return None
    try:
        d = json.loads(metadata[META_KEY])
        mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        if len(mean) != len(std) or not mean or any(s <= 0 or not math.isfinite(s) for s in std):
            return None
        return Normalization(str(d.get("name", "explicit")), mean, std)
    except (ValueError, KeyError, TypeError):
        return None
