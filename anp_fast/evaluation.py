"""Evaluation: a model's predictions on data sets, the one :class:`Evaluator` every command, the demo, the
selection rule and the quality runner measure with (ACC on the test split, ASR on its triggered part, accuracy
and loss on the defender's clean data), and the plausibility check a loaded checkpoint must pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from .inputs import Loaded


class Normalized(Dataset):
    """``base`` items (pixels in [0, 1], label), optionally triggered, normalised with (mean, std)."""

    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float], trigger=None):
        self.base, self.trigger = base, trigger
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        x = torch.as_tensor(x, dtype=torch.float32)
        if self.trigger is not None:
            x = self.trigger.apply(x.unsqueeze(0))[0]
        return (x - self.mean) / self.std, int(y)


def labels_of(ds: Dataset) -> torch.Tensor:
    """Every label of a dataset (fast paths for the tensor-backed ones)."""
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).long()
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[torch.as_tensor(ds.indices)]
    if isinstance(ds, Normalized):  # its labels are its base's (a trigger moves no label): never decode images
        return labels_of(ds.base)
    tensors = getattr(ds, "tensors", None)
    if tensors is not None:
        return tensors[1].long()
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def tensors_of(ds: Dataset, batch_size: int = 512):
    """(x, y) of a whole dataset stacked in memory."""
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys).long()


@torch.no_grad()
def logits(model: nn.Module, ds: Dataset, device, batch_size: int = 256, workers: int = 0) -> torch.Tensor:
    """The model's logits (eval mode, fp32, on the CPU) for every item of ``ds``."""
    was_training = model.training
    model.eval()
    out = []
    for x, _ in DataLoader(ds, batch_size=batch_size, num_workers=workers):
        out.append(model(x.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def predictions(model: nn.Module, ds: Dataset, device, batch_size: int = 256, workers: int = 0) -> torch.Tensor:
    out = logits(model, ds, device, batch_size, workers)
    return out.argmax(1) if out.numel() else torch.zeros(0, dtype=torch.long)


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of the images ``x`` classified as ``y`` (eval mode; on the model's device)."""
    pred = predictions(model, TensorDataset(x, y), _device_of(model))
    return float((pred == y.cpu()).float().mean()) if len(y) else float("nan")


def attack_success_rate(model: nn.Module, x_triggered: torch.Tensor, target: int) -> float:
    """Fraction of the triggered images (true label != target) classified as ``target``."""
    dummy = torch.zeros(len(x_triggered), dtype=torch.long)
    pred = predictions(model, TensorDataset(x_triggered, dummy), _device_of(model))
    return float((pred == target).float().mean()) if len(x_triggered) else float("nan")


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


@dataclass
class Evaluator:
    """ACC on the test split, ASR on its triggered non-target part, and the defender's clean data: ACC (and
    loss) on the held-out clean split and, when ``clean`` (the method's own clean set) is given, on it, and on
    all of it together (``select_acc``, ``select_loss``: what ``--prune auto`` reads)."""

    device: torch.device
    test: Dataset
    holdout: Optional[Dataset] = None
    triggered: Optional[Dataset] = None
    target: Optional[int] = None
    workers: int = 0
    clean: Optional[Dataset] = None
    labels: Dict[str, torch.Tensor] = field(default_factory=dict)
    collective: Optional[object] = None  # several processes: each evaluates its part, the counts are summed

    def __post_init__(self):
        self.labels["test"] = labels_of(self.test)
        for name in ("holdout", "clean"):
            if getattr(self, name) is not None:
                self.labels[name] = labels_of(getattr(self, name))

    def _counts(self, model: nn.Module, name: str) -> torch.Tensor:
        """[right answers, images, summed loss] over this process's part of data set ``name`` (the target's
        hits for ``triggered``)."""
        ds = getattr(self, name)
        n = len(ds)
        part = self.collective.share(n) if self.collective is not None else slice(0, n)
        if self.collective is not None:
            ds = Subset(ds, range(part.start, part.stop))
        out = logits(model, ds, self.device, workers=self.workers) if len(ds) else torch.zeros(0, 1)
        if name == "triggered":
            return torch.tensor([float((out.argmax(1) == self.target).sum()), float(len(ds)), 0.0], dtype=torch.float64)
        labels = self.labels[name][part]
        losses = torch.nn.functional.cross_entropy(out.float(), labels, reduction="none") if len(ds) else out.sum(1)
        return torch.tensor([float((out.argmax(1) == labels).sum()), float(len(ds)), float(losses.double().sum())],
                            dtype=torch.float64)

    def __call__(self, model: nn.Module, holdout_only: bool = False) -> Dict[str, float]:
        """Every metric; ``holdout_only``: the defender's clean data only (what choosing may look at)."""
        names = [n for n in ("holdout", "clean") if getattr(self, n) is not None]
        if not holdout_only:
            names += ["test"] + (["triggered"] if self.triggered is not None else [])
        counts = torch.stack([self._counts(model, name) for name in names]) if names else torch.zeros(0, 3)
        if self.collective is not None:
            self.collective.all_reduce_((counts,))
        row, hits, seen, loss_sum = {}, 0.0, 0.0, 0.0
        found = dict(zip(names, counts.tolist()))
        for name in ("holdout", "clean"):
            if name in found:
                right, n, loss = found[name]
                row[f"{name}_acc"], row[f"{name}_loss"] = _fp32(right / n), loss / n
                hits, seen, loss_sum = hits + right, seen + n, loss_sum + loss
        if seen:
            row["select_acc"], row["select_loss"] = hits / seen, loss_sum / seen
        for name, key in (("test", "acc"), ("triggered", "asr")):
            if name in found:
                right, n, _ = found[name]
                row[key] = _fp32(right / n) if n else float("nan")  # the fp32 mean of the hits, as before
        return row


PLAUSIBLE_SAMPLE = 2000   # test images the plausibility check looks at (evenly spaced)
CHANCE_FACTOR = 1.5       # clean accuracy at or below 1.5x chance: the model does not fit this data as loaded
DOMINANT_SHARE = 0.5      # ... or one class takes more than half of the predictions of clean images


BETTER_BY = 0.10          # ... or another normalisation convention gives 10 points more clean accuracy


def _sample(test: Dataset) -> Dataset:
    n = len(test)
    if n <= PLAUSIBLE_SAMPLE:
        return test
    return Subset(test, sorted({int(i * n / PLAUSIBLE_SAMPLE) for i in range(PLAUSIBLE_SAMPLE)}))


def plausibility(model: nn.Module, test: Dataset, num_classes: int, device, workers: int = 0) -> Dict:
    """How the loaded model does on (up to 2,000 evenly spaced) clean test images, and whether that looks like a
    model that fits this data: ``{"acc", "chance", "top_class", "top_share", "ok", "why", "images"}``.
    Near-chance accuracy, or one class taking most predictions while it holds far fewer of the labels, means the
    checkpoint is evaluated wrongly (normalisation, architecture, label order) far more often than that it is
    this bad."""
    sample = _sample(test)
    pred = predictions(model, sample, device, workers=workers)
    labels = labels_of(sample)
    n = len(labels)
    acc = float((pred == labels).float().mean()) if n else 1.0
    counts = torch.bincount(pred, minlength=num_classes).float() if n else torch.zeros(max(1, num_classes))
    top = int(counts.argmax())
    share = float(counts[top] / max(1, n))
    label_share = float((labels == top).float().mean()) if n else 0.0
    chance = 1.0 / num_classes
    why = []
    if n and num_classes >= 2 and acc <= CHANCE_FACTOR * chance:
        why.append(f"clean test accuracy {100 * acc:.1f}% is near chance ({100 * chance:.1f}%)")
    if n and num_classes >= 3 and share > DOMINANT_SHARE and share > 2 * label_share:
        why.append(f"class {top} takes {100 * share:.0f}% of the predictions of clean images (it is "
                   f"{100 * label_share:.0f}% of their labels)")
    return {"acc": acc, "chance": chance, "top_class": top, "top_share": share, "ok": not why, "why": why,
            "images": n}


def _other_conventions(model: nn.Module, loaded: "Loaded", device, workers: int) -> Dict[str, float]:
    """Clean accuracy of the model under each other named normalisation convention this data set has."""
    from .normalization import CONVENTIONS, resolve

    splits, current = loaded.splits, loaded.normalization
    base = _sample(splits.test)
    labels = labels_of(base)
    found = {}
    for name in CONVENTIONS:
        try:
            norm = resolve(name, splits.name, splits.in_channels, loaded.data_mean, loaded.data_std)
        except ConfigError:
            continue
        if (norm.mean, norm.std) == (current.mean, current.std):
            continue
        pred = predictions(model, Normalized(base, norm.mean, norm.std), device, workers=workers)
        found[name] = float((pred == labels).float().mean()) if len(labels) else 0.0
    return found


def check_plausible(model: nn.Module, loaded: "Loaded", device, checkpoint: str, force: bool, log,
                    workers: int = 0) -> Dict:
    """Stop (DataError) before any work is spent when the loaded checkpoint does not look like a model of this
    data as loaded (see :func:`plausibility`), or when another normalisation convention gives it at least 10
    points more clean accuracy; with ``force``, warn and go on. Returns the findings (for the report)."""
    found = plausibility(model, loaded.norm_test, loaded.splits.num_classes, device, workers)
    others = _other_conventions(model, loaded, device, workers)
    found["other_conventions"] = others
    best = max(others.items(), key=lambda kv: kv[1], default=None)
    if best is not None and best[1] >= found["acc"] + BETTER_BY:
        found["why"].append(f"with --normalize {best[0]} its clean accuracy is {100 * best[1]:.1f}%, as loaded "
                            f"{100 * found['acc']:.1f}%")
        found["ok"] = False
    if not found["ok"]:
        text = (f"{checkpoint} does not look like a model of {loaded.splits.name} as loaded: "
                f"{'; '.join(found['why'])}. "
                f"Likely causes: the wrong input normalisation (now {loaded.normalization.describe()}; set "
                "--normalize), the wrong --arch/--arch-arg, or a different label order")
        if not force:
            raise DataError(text + "; pass --force to go on anyway")
        log("warning: " + text + " (--force: going on)")
    return found


MEMORIZED_LOSS = 0.01  # held-out fit (mean cross-entropy of its correctly classified images) below this ...
MEMORIZED_RATIO = 2.0  # ... and this many times below the test split's fit: images the model was trained on


def fit_loss(model: nn.Module, ds: Dataset, device, labels: Optional[torch.Tensor] = None, workers: int = 0) -> float:
    """The mean cross-entropy of the images of ``ds`` the model classifies correctly (how tightly it fits them;
    errors left out: on a few hundred images one error would outweigh the rest)."""
    out = logits(model, ds, device, workers=workers)
    y = labels_of(ds) if labels is None else labels
    right = out.argmax(1) == y
    if not bool(right.any()):
        return float("inf")
    return float(torch.nn.functional.cross_entropy(out[right], y[right]))


def memorization(model: nn.Module, evaluator: "Evaluator", row: Dict) -> Dict:
    """Whether the held-out clean images look like images the model was trained on: nearly all right
    (>= 99%) and fitted far more tightly than the test split's unseen images (fit below MEMORIZED_LOSS and
    MEMORIZED_RATIO times below the test's). Measured: the quality matrix's models fit their training images
    at 0.001-0.002 nats, unseen ones at about 0.04; the digits demo model fits unseen reserved images as
    tightly as its test images (0.005-0.007), which an absolute threshold alone took for memorized. Returns the
    figures and ``memorized``."""
    if evaluator.holdout is None:
        return {"memorized": False}
    held = fit_loss(model, evaluator.holdout, evaluator.device, evaluator.labels["holdout"], evaluator.workers)
    test = fit_loss(model, evaluator.test, evaluator.device, evaluator.labels["test"], evaluator.workers)
    memorized = row.get("holdout_acc", 0.0) >= 0.99 and held < MEMORIZED_LOSS and held * MEMORIZED_RATIO < test
    return {"holdout_fit": held, "test_fit": test, "memorized": bool(memorized)}


def format_row(row: Dict) -> str:
    parts = [f"ACC {100 * row['acc']:.1f}%"]
    if "asr" in row:
        parts.append(f"ASR {100 * row['asr']:.1f}%")
    if "holdout_acc" in row:
        parts.append(f"held-out ACC {100 * row['holdout_acc']:.1f}%")
    return ", ".join(parts)
