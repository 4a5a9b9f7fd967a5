"""What a command reads and checks before any work is spent: the pruning rule, the output folder, the model
with its checkpoint and the data set around it (normalised as the checkpoint or the user says), and the
trigger whose ASR is reported. Every bad input is one clear :class:`~anp_fast.errors.ConfigError` line."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
from torch.utils.data import Dataset, Subset

from .errors import ConfigError
from .evaluation import Normalized, labels_of


def parse_prune_rule(text: str) -> Dict:
    """'threshold:T' | 'number:K' | 'fraction:F' | 'auto[:walk|masks|evidence|most|first]' -> a dict for
    pruning.select_pruned (or auto, with its selection mode: see selection.choose)."""
    from .selection import AUTO_MODES

    if text == "auto" or text.startswith("auto:"):
        mode = text.partition(":")[2] or "walk"
        if mode not in AUTO_MODES:
            raise ConfigError(f"--prune {text!r}: auto modes are {', '.join(AUTO_MODES)} (default walk)")
        return {"auto": True, "mode": mode}
    kind, _, value = text.partition(":")
    try:
        if kind == "threshold":
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return {"threshold": v}
        if kind == "number":
            v = int(value)
            if v < 0:
                raise ValueError
            return {"number": v}
        if kind == "fraction":
            v = float(value)
            if not 0 <= v <= 1:
                raise ValueError
            return {"fraction": v}
    except ValueError:
        pass
    raise ConfigError(f"--prune {text!r}: use threshold:T (e.g. threshold:0.2), number:K, fraction:F (0-1), auto "
                      f"or auto:MODE ({', '.join(AUTO_MODES)})")


def check_rule(rule: Dict, budget: float, holdout_fraction: float) -> None:
    """What can be checked of a pruning rule before anything runs."""
    if not math.isfinite(budget) or budget < 0:
        raise ConfigError(f"--budget {budget}: must be a finite number >= 0 (accuracy points)")
    if rule.get("auto") and holdout_fraction <= 0:
        raise ConfigError("--prune auto chooses the amount on held-out clean data: give --holdout-fraction > 0, "
                          "or a fixed rule (threshold:T, number:K, fraction:F)")


def check_rule_fits(rule: Dict, neurons: int) -> None:
    if "number" in rule and rule["number"] > neurons:
        raise ConfigError(f"--prune number:{rule['number']}: the model has {neurons} perturbable neurons")


def check_out(out: str, outputs: Sequence[str], overwrite: bool, resume: bool = False) -> None:
    """Refuse an ``out`` that already holds any of our ``outputs`` unless ``overwrite`` (which only ever replaces
    those files) or ``resume``. Creates nothing: inputs are checked before anything is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} exists and is not a directory")
    present = [f for f in outputs if os.path.exists(os.path.join(out, f))]
    if present and not (overwrite or resume):
        raise ConfigError(f"{out} already holds results ({', '.join(present)}); choose another --out, pass "
                          "--overwrite to replace them, or --resume to continue that run")


def make_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {out}: {exc.strerror}") from exc



@dataclass
class Loaded:
    """A model (with its checkpoint) and the data around it, normalised with ``normalization``
    (``splits.mean``/``std`` are its constants); ``notes``: lines for the user about where it came from."""

    model: nn.Module
    splits: object  # datasets.DatasetSplits
    norm_train: Dataset
    norm_test: Dataset
    normalization: object = None  # normalization.Normalization
    notes: List[str] = field(default_factory=list)
    data_mean: Sequence[float] = ()  # the data set's own constants (the "dataset" convention)
    data_std: Sequence[float] = ()


def load_model_and_data(arch: str, checkpoint: Optional[str], data: str, arch_args: Dict,
                        data_root: Optional[str] = None, normalize: Optional[str] = None) -> Loaded:
    """The architecture (with the checkpoint's weights) and the data set, normalised as ``normalize`` says (a
    convention of :mod:`anp_fast.normalization` or MEAN/STD); when it is None, as the checkpoint's metadata
    records (checkpoints anp_fast writes), else the data set's own constants."""
    import dataclasses

    from .archs import build_arch
    from .checkpoint import apply_state_dict, checkpoint_metadata, load_state_dict
    from .datasets import load_dataset
    from .normalization import from_metadata, resolve

    reserved = sorted({"num_classes", "in_channels"} & set(arch_args))
    if reserved:
        raise ConfigError(f"--arch-arg {', '.join(reserved)}: set by the data set, not by an --arch-arg")
    splits = load_dataset(data, root=data_root) if data_root else load_dataset(data)
    norm = resolve(normalize, splits.name, splits.in_channels, splits.mean, splits.std)
    notes = []
    stored = from_metadata(checkpoint_metadata(checkpoint)) if checkpoint is not None else None
    if stored is not None and len(stored.mean) != splits.in_channels:
        notes.append(f"warning: {checkpoint} records a {len(stored.mean)}-channel normalisation, the data has "
                     f"{splits.in_channels} channels: ignored")
        stored = None
    if stored is not None and normalize is None:
        norm = stored
        notes.append(f"normalisation from the checkpoint's metadata ({norm.describe()})")
    elif stored is not None and (stored.mean, stored.std) != (norm.mean, norm.std):
        notes.append(f"warning: --normalize {normalize} ({norm.describe()}) differs from the normalisation "
                     f"{checkpoint} was written with ({stored.describe()}); the model may be evaluated wrongly")
    data_mean, data_std = tuple(splits.mean), tuple(splits.std)
    splits = dataclasses.replace(splits, mean=norm.mean, std=norm.std)
    model = build_arch(arch, num_classes=splits.num_classes, in_channels=splits.in_channels, **arch_args)
    if checkpoint is not None:
        apply_state_dict(model, load_state_dict(checkpoint))
    return Loaded(model, splits, Normalized(splits.train, splits.mean, splits.std),
                  Normalized(splits.test, splits.mean, splits.std), norm, notes, data_mean, data_std)


def make_trigger_spec(spec: Optional[str], image_shape):
    """A trigger by name (``badnets``, ``patch``, ``blend``, ``sig``, ``wanet``, ``published-badnets``,
    ``published-4corner``, each with ``:KEY=VALUE,...`` options), the published code's ``trigger_info.th``
    (.th/.pt/.pth), or a picture file (stamped bottom-right, or blended when it is the images' size)."""
    if spec is None:
        return None
    from .attacks import TRIGGERS, ImageTrigger, parse_trigger

    if spec.partition(":")[0].strip().lower() in TRIGGERS:
        return parse_trigger(spec, image_shape)
    if os.path.isfile(spec) and spec.lower().endswith((".th", ".pt", ".pth")):  # the published trigger_info.th
        from .attacks import TriggerInfo
        from .checkpoint import load_trigger_info

        info = load_trigger_info(spec)
        return TriggerInfo(pattern=info["trigger_pattern"][0].permute(2, 0, 1), alpha=float(info["trigger_alpha"]),
                           mask=info["trigger_mask"][0].permute(2, 0, 1), source=spec)
    if os.path.isfile(spec):
        return ImageTrigger.from_file(spec, image_shape)
    raise ConfigError(f"--trigger {spec!r}: neither a trigger name ({', '.join(TRIGGERS)}) nor an existing image "
                      "file")


def asr_dataset(splits, trigger: Optional[str], target: Optional[int]) -> Optional[Dataset]:
    """The ASR set: test images whose label is not the target, triggered, normalised (None without trigger)."""
    trig = make_trigger_spec(trigger, (splits.in_channels, *splits.image_size))
    if trig is None:
        return None
    keep = (labels_of(splits.test) != target).nonzero().flatten().tolist()
    return Normalized(Subset(splits.test, keep), splits.mean, splits.std, trigger=trig)
