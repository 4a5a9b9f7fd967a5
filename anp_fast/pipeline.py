"""The purification pipeline behind ``anp-fast purify / prune / attack``: from a checkpoint file and a data
spec to a purified checkpoint and a report, safely (no arbitrary unpickling), resumably and with one clear
error line for every bad input.

Data flow: datasets yield pixels in [0, 1]; triggers act on pixels; the model sees them normalised with the
dataset's mean/std (the attack trains the same way, so checkpoints it writes fit). The clean data ANP uses and
the held-out clean split that chooses the pruning amount are disjoint parts of the TRAINING split; ACC and ASR
are measured on the test split, and triggered data is only ever reported, never used to choose.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .config import RUN, ANPConfig
from .config import check_device as config_check_device
from .errors import Interrupted
from .errors import ANPError, ConfigError, DataError
from .fileio import atomic_write_text
from .maskfile import load_masks, save_masks
from .normalization import to_metadata
from .pruning import pruned_count, prune, sweep
from .report import write_csv, write_json
from .surgery import perturbable_layers

STATE_FILE = "anp_state.pt"
STATE_FILES = (STATE_FILE, "rnp_state.pt", "rnp_unlearned.pt")  # what the methods save to resume from
COMMAND_FILE = "command.json"
PURIFY_OUTPUTS = ("purified.safetensors", "purified.pt", "masks.txt", "report.json", "sweep.csv",
                  "mask_histograms.png", "pruning_sweep.png")
ATTACK_OUTPUTS = ("backdoored.safetensors", "backdoored.pt", "attack.json")


# ------------------------------------------------------------------------------------------------ data
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


# ------------------------------------------------------------------------------------------------ options
def parse_prune_rule(text: str) -> Dict:
    """'threshold:T' | 'number:K' | 'fraction:F' | 'auto[:walk|masks|most|first]' -> a dict for
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
                      "or auto:MODE (walk, masks, most, first)")


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


def check_device(device: Optional[str], cuda_graphs: bool = False) -> None:
    config_check_device(device, cuda_graphs, name="--device")


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


# ------------------------------------------------------------------------------------------------ evaluation
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

    def __post_init__(self):
        self.labels["test"] = labels_of(self.test)
        for name in ("holdout", "clean"):
            if getattr(self, name) is not None:
                self.labels[name] = labels_of(getattr(self, name))

    def __call__(self, model: nn.Module, holdout_only: bool = False) -> Dict[str, float]:
        """Every metric; ``holdout_only``: the defender's clean data only (what choosing may look at)."""
        row, hits, seen, loss_sum = {}, 0, 0, 0.0
        for name in ("holdout", "clean"):
            ds = getattr(self, name)
            if ds is None:
                continue
            out = logits(model, ds, self.device, workers=self.workers)
            right = out.argmax(1) == self.labels[name]
            losses = torch.nn.functional.cross_entropy(out.float(), self.labels[name], reduction="none")
            row[f"{name}_acc"] = float(right.float().mean())
            row[f"{name}_loss"] = float(losses.mean())
            hits, seen, loss_sum = hits + int(right.sum()), seen + len(right), loss_sum + float(losses.sum())
        if seen:
            row["select_acc"], row["select_loss"] = hits / seen, loss_sum / seen
        if holdout_only:
            return row
        row["acc"] = float((predictions(model, self.test, self.device, workers=self.workers)
                            == self.labels["test"]).float().mean())
        if self.triggered is not None:
            row["asr"] = float((predictions(model, self.triggered, self.device, workers=self.workers)
                                == self.target).float().mean())
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


from .selection import THRESHOLDS, auto_number  # noqa: E402  (re-exported: the rule lives in selection)


def _pruning_sweep(model, masks, evaluator: Evaluator, rule: Dict, progress: bool = False):
    """The sweep rows (threshold grid, every column), the chosen rule and how it was chosen (the auto rule's
    name and report, or None)."""
    from .selection import choose

    rows = sweep(model, masks, evaluator, thresholds=THRESHOLDS, progress=progress)
    if rule.get("auto"):
        if evaluator.holdout is None:
            raise ConfigError("--prune auto needs a held-out clean split (--holdout-fraction > 0)")
        choice = choose(model, masks, evaluator, rule["budget"], mode=rule.get("mode", "walk"), progress=progress)
        return rows, choice.pop("rule"), choice
    return rows, {k: v for k, v in rule.items() if k in ("threshold", "number", "fraction")}, None


# ------------------------------------------------------------------------------------------------ purify
def run_purify(*, arch: str, checkpoint: str, data: str, out: str, config: ANPConfig,
               arch_args: Optional[Dict] = None, clean_fraction: Optional[float] = None,
               clean_count: Optional[int] = None, holdout_fraction: float = RUN.holdout_fraction, prune_rule: str = RUN.prune,
               budget: float = RUN.budget, trigger: Optional[str] = None, target: Optional[int] = None,
               save_every: int = 0, resume: bool = False, overwrite: bool = False,
               allow_small_clean: bool = False, workers: int = 0, progress: bool = True,
               command: Optional[Dict] = None, method: str = "anp", method_options=None,
               stop_patience: int = 0, stop_every: int = 100, normalize: Optional[str] = None,
               force: bool = False, log=print) -> Dict:
    """Load, learn masks with ``method`` (``anp``, ``rnp`` or a registered front end's; ``method_options``:
    its own settings, e.g. an RNPConfig), prune, and write every output into ``out``; returns the report.
    ``command``: the arguments to record in ``out/command.json`` for a later ``--resume``. ``stop_patience``
    K > 0: the opt-in stop rule (:class:`anp_fast.selection.StopRule`): every ``stop_every`` iterations the
    pruning rule is applied to the current masks, and the loop ends once the set it would prune has not changed
    over K checks. ``normalize``: the input normalisation (:mod:`anp_fast.normalization`; default: the
    checkpoint's recorded one, else the data set's). ``force``: go on when the loaded checkpoint fails the
    plausibility check (:func:`check_plausible`)."""
    from .methods import METHODS
    from .checkpoint import save_checkpoint
    from .datasets import clean_split

    t_start = time.perf_counter()
    rule = parse_prune_rule(prune_rule)
    if rule.get("auto"):
        rule["budget"] = budget
    if not 0 <= holdout_fraction < 1:
        raise ConfigError(f"--holdout-fraction {holdout_fraction}: must be in [0, 1)")
    check_rule(rule, budget, holdout_fraction)
    if save_every < 0:
        raise ConfigError(f"--save-every {save_every}: must be >= 0 (0: only on Ctrl-C)")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be >= 0")
    if isinstance(stop_patience, bool) or not isinstance(stop_patience, int) or stop_patience < 0 or \
            isinstance(stop_every, bool) or not isinstance(stop_every, int) or stop_every < 1:
        raise ConfigError(f"--stop-patience {stop_patience} / --stop-every {stop_every}: the patience must be an "
                          "integer >= 0 (0: off) and the check interval >= 1")
    if (clean_fraction is None) == (clean_count is None):
        clean_fraction = RUN.clean_fraction if clean_count is None else clean_fraction
    check_device(config.device, config.cuda_graphs)
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: known methods are {', '.join(METHODS)}")
    saved_state = any(os.path.exists(os.path.join(out, f)) for f in STATE_FILES)
    finished = os.path.join(out, "report.json")
    if resume and os.path.exists(finished) and all(
            os.path.getmtime(finished) >= os.path.getmtime(os.path.join(out, f))
            for f in STATE_FILES if os.path.exists(os.path.join(out, f))):
        raise ConfigError(f"{out} holds a finished run (its report.json is newer than its saved state): nothing "
                          "to resume, nothing changed; choose another --out, or --overwrite to run again there")
    if resume and not saved_state and any(os.path.exists(os.path.join(out, f)) for f in PURIFY_OUTPUTS):
        raise ConfigError(f"{out} holds a finished run (no saved state to continue): nothing to resume; choose "
                          "another --out, or --overwrite to run again there")
    resume = resume and saved_state
    check_out(out, PURIFY_OUTPUTS, overwrite, resume)
    loaded = load_model_and_data(arch, checkpoint, data, arch_args or {}, normalize=normalize)
    check_rule_fits(rule, sum(n for _, n in perturbable_layers(loaded.model, config.layers)))
    splits = loaded.splits
    if target is not None and not 0 <= target < splits.num_classes:
        raise ConfigError(f"--target {target}: {splits.name} has classes 0-{splits.num_classes - 1}")
    if trigger is not None and target is None:
        raise ConfigError("--trigger needs --target (the class the backdoor sends images to)")
    clean_idx, holdout_idx = clean_split(len(splits.train), fraction=clean_fraction if clean_count is None else None,
                                         count=clean_count, holdout_fraction=holdout_fraction, seed=config.seed)
    if len(clean_idx) < config.batch_size and not allow_small_clean:
        raise DataError(f"the clean set has {len(clean_idx)} images, fewer than one batch ({config.batch_size}): "
                        "give more (--clean-count/--clean-fraction), a smaller --batch-size, or pass "
                        "--sample-with-replacement to draw full batches from it anyway")
    pool = len(holdout_idx) + len(clean_idx)  # auto reads the accuracy on all the clean data
    if rule.get("auto") and 0 < len(holdout_idx) and 100.0 / pool > budget:
        log(f"warning: the clean data has {pool} images, so one image is {100.0 / pool:.1f} accuracy points, more "
            f"than the {budget:g}-point budget: auto pruning can only stop where no clean image is lost; give "
            "more clean data for a finer choice")
    clean = Subset(loaded.norm_train, clean_idx.tolist())
    holdout = Subset(loaded.norm_train, holdout_idx.tolist()) if len(holdout_idx) else None
    triggered = asr_dataset(splits, trigger, target)
    device = torch.device(config.device) if config.device else torch.device("cpu")
    model = loaded.model.to(device)
    evaluator = Evaluator(device, loaded.norm_test, holdout, triggered, target, workers, clean=clean)
    for note in loaded.notes:
        log(note)
    plausible = check_plausible(model, loaded, device, checkpoint, force, log, workers)
    make_out(out)  # every input checked: from here on files are written (each atomically)
    before = evaluator(model)
    log(f"{arch} on {splits.name} (normalisation {loaded.normalization.describe()}): {len(clean_idx)} clean images "
        f"for ANP, {len(holdout_idx)} held out, {len(splits.test)} test; before: " + _fmt(before))
    if rule.get("auto") and looks_memorized(before):
        log(f"warning: the held-out clean images look memorized (accuracy {100 * before['holdout_acc']:.1f}%, mean "
            f"loss {before['holdout_loss']:.4f}): they were probably part of the model's training data. Their "
            "accuracy then drops later than on unseen images and --prune auto over-prunes; give clean images the "
            "model has not seen (anp-fast attack --reserve-clean N keeps them out of training), or a smaller "
            "--budget")
    if command is not None:  # what `--resume DIR` needs to rerun this command (not a result file)
        atomic_write_text(os.path.join(out, COMMAND_FILE), json.dumps(command, indent=1))
    in_memory = getattr(splits, "in_memory", not data.startswith("imagefolder"))
    clean_data = tensors_of(clean) if in_memory else clean
    from .methods import learn_masks

    extra = {"options": method_options} if method_options is not None else {}
    stop_rule = None
    if stop_patience:
        from .selection import StopRule, choose

        fixed = {k: v for k, v in rule.items() if k in ("threshold", "number", "fraction")}
        # the stop rule checks the cheap mask-order rule ("most"; the walk costs a clean pass per neuron)
        stop_rule = StopRule((lambda m: choose(model, m, evaluator, budget, mode="most")["rule"])
                             if rule.get("auto") else (lambda m: fixed), stop_patience)
        extra.update(monitor=stop_rule, monitor_every=stop_every)
    try:
        result = learn_masks(method, model, clean_data, config, progress=progress, save_every=save_every,
                             state_dir=out, resume=resume, **extra)
    except Interrupted as stop:
        log(f"interrupted after {len(stop.result.loss_history)} iterations; the state is in {out}: "
            f"continue with --resume {out}")
        raise
    masks = result.masks
    save_masks(masks, os.path.join(out, "masks.txt"))
    rows, chosen, choice = _pruning_sweep(model, masks, evaluator, rule, progress)
    purified = prune(model, masks, **chosen)
    after = evaluator(purified)
    n_pruned = pruned_count(masks, **chosen)
    save_checkpoint(purified.state_dict(), os.path.join(out, "purified"), metadata=to_metadata(loaded.normalization))
    write_csv(os.path.join(out, "sweep.csv"), rows)
    from .report import plot_mask_histograms, plot_pruning_sweep
    cut = _cut_value(masks, chosen)
    plot_mask_histograms(os.path.join(out, "mask_histograms.png"), masks, cut,
                         title=f"ANP masks, {arch} on {splits.name}")
    plot_pruning_sweep(os.path.join(out, "pruning_sweep.png"), rows, n_pruned, chosen_label=_rule_text(chosen, choice),
                       extra={"pruned": n_pruned, **after}, title=f"pruning {arch} on {splits.name}")
    report = {
        "kind": "anp-fast purify", "arch": arch, "arch_args": arch_args or {}, "checkpoint": checkpoint,
        "data": data, "normalization": loaded.normalization.to_dict(), "plausibility": plausible, "sizes": {"clean": len(clean_idx), "holdout": len(holdout_idx), "test": len(splits.test)},
        "trigger": trigger, "target": target, "prune": prune_rule, "chosen": chosen, "choice": choice,
        "budget_points": budget,
        "before": before, "after": after, "pruned_neurons": n_pruned, "neurons": result.num_neurons,
        "method": method, "method_info": result.info,
        "stop_rule": None if stop_rule is None else {"patience": stop_patience, "every": stop_every,
                                                     "stopped_at": result.timings.get("stopped_at"),
                                                     "checks": stop_rule.checks},
        "anp": {"iters": result.timings["iters"], "resumed_at": result.timings["resumed_at"],
                "seconds": result.timings["total_s"], "per_iter_s": result.timings["per_iter_s"],
                "final_loss": result.loss_history[-1] if result.loss_history else None},
        "config": config.to_dict(), "seconds": time.perf_counter() - t_start,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "outputs": list(PURIFY_OUTPUTS),
    }
    write_json(os.path.join(out, "report.json"), report)
    log(f"after pruning {n_pruned}/{result.num_neurons} neurons ({_rule_text(chosen, choice)}): " + _fmt(after))
    log(f"wrote {', '.join(PURIFY_OUTPUTS)} to {out}")
    return report


MEMORIZED_LOSS = 0.01  # mean held-out cross-entropy below this (with >= 99% accuracy): memorized images


def looks_memorized(row: Dict) -> bool:
    """Whether held-out clean images look memorized (measured: 0.001-0.002 nats on training images of the
    quality matrix's models, 0.04 on unseen ones)."""
    return row.get("holdout_acc", 0.0) >= 0.99 and row.get("holdout_loss", 1.0) < MEMORIZED_LOSS


def _fmt(row: Dict) -> str:
    parts = [f"ACC {100 * row['acc']:.1f}%"]
    if "asr" in row:
        parts.append(f"ASR {100 * row['asr']:.1f}%")
    if "holdout_acc" in row:
        parts.append(f"held-out ACC {100 * row['holdout_acc']:.1f}%")
    return ", ".join(parts)


def _rule_text(chosen: Dict, choice: Optional[Dict] = None) -> str:
    (k, v), = chosen.items()
    if k == "neurons":
        found = (choice or {}).get("evidence") or {}
        evidence = (f" ({found['suspects_pruned']} of {found['suspects']} pre-activation suspects)"
                    if found.get("suspects") else "")
        if found.get("verified") and found.get("kept", 0) < found.get("walked", 0):
            evidence += f", {found['walked'] - found['kept']} undone by the held-out check"
        return f"clean walk, {sum(len(i) for i in v.values())} neurons{evidence}"
    return f"{k} {v:g}"


def _cut_value(masks, chosen: Dict) -> float:
    """The mask value at the pruning cut (for the histograms): the threshold, or the largest pruned mask."""
    if "threshold" in chosen:
        return chosen["threshold"]
    from .pruning import select_pruned
    picked = [masks[name].flatten()[idx] for name, idx in select_pruned(masks, **chosen).items() if idx.numel()]
    return float(torch.cat(picked).max()) if picked else 0.0


# ------------------------------------------------------------------------------------------------ prune
def run_prune(*, arch: str, checkpoint: str, masks_file: str, data: str, out: str, prune_rule: str = "threshold:0.2",
              arch_args: Optional[Dict] = None, budget: float = RUN.budget, holdout_fraction: float = RUN.holdout_fraction,
              clean_fraction: Optional[float] = None, clean_count: Optional[int] = None,
              trigger: Optional[str] = None, target: Optional[int] = None, seed: int = 0,
              device: Optional[str] = None, overwrite: bool = False, normalize: Optional[str] = None,
              force: bool = False, progress: bool = True, log=print) -> Dict:
    """Masks + checkpoint -> pruned checkpoint, sweep CSV and report. The held-out clean split (for auto) is the
    one ``purify`` drew with the same clean fraction/count, holdout fraction and seed."""
    from .checkpoint import save_checkpoint
    from .datasets import clean_split

    outputs = ("pruned.safetensors", "pruned.pt", "sweep.csv", "prune_report.json", "pruning_sweep.png")
    rule = parse_prune_rule(prune_rule)
    if rule.get("auto"):
        rule["budget"] = budget
    check_rule(rule, budget, holdout_fraction)
    check_device(device)
    check_out(out, outputs, overwrite)
    loaded = load_model_and_data(arch, checkpoint, data, arch_args or {}, normalize=normalize)
    for note in loaded.notes:
        log(note)
    masks = load_masks(masks_file)
    check_rule_fits(rule, sum(m.numel() for m in masks.values()))
    layers = [name for name, _ in perturbable_layers(loaded.model)]
    uncovered = [name for name in layers if name not in masks]
    if uncovered:
        log(f"warning: {masks_file} has masks for {len(layers) - len(uncovered)} of the model's {len(layers)} "
            f"perturbable layers; {', '.join(uncovered[:4])}{' ...' if len(uncovered) > 4 else ''} will never be "
            "pruned")
    splits = loaded.splits
    if clean_count is None and clean_fraction is None:
        clean_fraction = RUN.clean_fraction
    clean_idx, holdout_idx = clean_split(len(splits.train), fraction=None if clean_count is not None else
                                         clean_fraction, count=clean_count, holdout_fraction=holdout_fraction,
                                         seed=seed)
    holdout = Subset(loaded.norm_train, holdout_idx.tolist()) if len(holdout_idx) else None
    clean = Subset(loaded.norm_train, clean_idx.tolist())
    if trigger is not None and (target is None or not 0 <= target < splits.num_classes):
        raise ConfigError(f"--target must be a class of {splits.name} (0-{splits.num_classes - 1})")
    triggered = asr_dataset(splits, trigger, target)
    dev = torch.device(device) if device else torch.device("cpu")
    model = loaded.model.to(dev)
    evaluator = Evaluator(dev, loaded.norm_test, holdout, triggered, target, clean=clean)
    plausible = check_plausible(model, loaded, dev, checkpoint, force, log)
    rows, chosen, choice = _pruning_sweep(model, masks, evaluator, rule, progress)
    pruned = prune(model, masks, **chosen)
    after = evaluator(pruned)
    make_out(out)
    save_checkpoint(pruned.state_dict(), os.path.join(out, "pruned"), metadata=to_metadata(loaded.normalization))
    write_csv(os.path.join(out, "sweep.csv"), rows)
    from .report import plot_pruning_sweep
    n_pruned = pruned_count(masks, **chosen)
    plot_pruning_sweep(os.path.join(out, "pruning_sweep.png"), rows, n_pruned, chosen_label=_rule_text(chosen, choice),
                       extra={"pruned": n_pruned, **after}, title=f"pruning {arch} on {splits.name}")
    report = {"kind": "anp-fast prune", "arch": arch, "checkpoint": checkpoint, "masks": masks_file, "data": data,
              "normalization": loaded.normalization.to_dict(), "plausibility": plausible, "chosen": chosen, "choice": choice, "after": after, "pruned_neurons": pruned_count(masks, **chosen)}
    write_json(os.path.join(out, "prune_report.json"), report)
    log(f"pruned {report['pruned_neurons']} neurons ({_rule_text(chosen, choice)}; normalisation "
        f"{loaded.normalization.describe()}): " + _fmt(after))
    return report


# ------------------------------------------------------------------------------------------------ attack
def run_attack(*, arch: str, data: str, out: str, trigger: str = "badnets", target: int = 0,
               poison_rate: float = 0.1, epochs: int = 30, batch_size: int = 128, lr: float = 0.05,
               arch_args: Optional[Dict] = None, seed: int = 0, device: Optional[str] = None,
               reserve_clean: Optional[int] = None, overwrite: bool = False, progress: bool = True,
               normalize: Optional[str] = None, log=print) -> Dict:
    """Train a backdoored model (research and tests): poison ``poison_rate`` of the training images.
    ``reserve_clean`` N: leave out of training the N images that ``purify --clean-count N --seed SEED`` will
    take as the defender's clean data (a defender's own images, never seen by the model)."""
    from .attacks import triggered_test_set
    from .checkpoint import save_checkpoint
    from .train import accuracy, attack_success_rate, train_classifier

    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: must be >= 1")
    if not 0 <= poison_rate <= 1:
        raise ConfigError(f"--poison-rate {poison_rate}: must be in [0, 1]")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {lr}: must be a finite number > 0")
    check_device(device)
    check_out(out, ATTACK_OUTPUTS, overwrite)
    torch.manual_seed(seed)  # the model's initial weights too: the same seed gives the same checkpoint
    loaded = load_model_and_data(arch, None, data, arch_args or {}, normalize=normalize)
    splits = loaded.splits
    if not 0 <= target < splits.num_classes:
        raise ConfigError(f"--target {target}: {splits.name} has classes 0-{splits.num_classes - 1}")
    if not getattr(splits, "in_memory", not data.startswith("imagefolder")):
        raise ConfigError(f"attack trains on data held in memory (digits, cifar10, cifar100); {data} is not")
    trig = make_trigger_spec(trigger, (splits.in_channels, *splits.image_size))
    x, y = tensors_of(splits.train)
    xt, yt = tensors_of(splits.test)
    if reserve_clean is not None:
        from .datasets import clean_split

        if isinstance(reserve_clean, bool) or not isinstance(reserve_clean, int) or not 0 < reserve_clean < len(y):
            raise ConfigError(f"--reserve-clean {reserve_clean}: must be a whole number in [1, {len(y) - 1}]")
        reserved = torch.cat(clean_split(len(y), count=reserve_clean, holdout_fraction=0.0, seed=seed))
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[reserved] = False
        x, y = x[keep], y[keep]
    poisoned_set = trig.poison(x, y, target, poison_rate, seed=seed)
    xp, yp, poisoned = poisoned_set.x, poisoned_set.y, poisoned_set.poisoned
    x_asr, _ = triggered_test_set(xt, yt, trig, target)
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    torch.manual_seed(seed)
    model = loaded.model
    dev = torch.device(device) if device else torch.device("cpu")
    model.to(dev)
    t0 = time.perf_counter()
    train_classifier(model, ((xp - mean) / std).to(dev), yp.to(dev), epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed, progress=progress)
    report = {"kind": "anp-fast attack", "arch": arch, "arch_args": arch_args or {}, "data": data,
              "normalization": loaded.normalization.to_dict(),
              "trigger": trigger, "trigger_options": trig.describe(), "target": target, "poison_rate": poison_rate,
              "poisoned": len(poisoned), "noise_mode": len(poisoned_set.noise), "clean_label": trig.clean_label,
              "trained_on": len(y), "reserved_clean": reserve_clean,
              "epochs": epochs, "seconds": time.perf_counter() - t0,
              "acc": accuracy(model, ((xt - mean) / std).to(dev), yt.to(dev)),
              "asr": attack_success_rate(model, ((x_asr - mean) / std).to(dev), target)}
    make_out(out)
    save_checkpoint(model.state_dict(), os.path.join(out, "backdoored"), metadata=to_metadata(loaded.normalization))
    write_json(os.path.join(out, "attack.json"), report)
    log(f"backdoored {arch} on {splits.name}: ACC {100 * report['acc']:.1f}%, ASR {100 * report['asr']:.1f}% "
        f"({len(poisoned)} training images poisoned with {trigger}, target {target}; normalisation "
        f"{loaded.normalization.describe()}); wrote "
        f"{', '.join(ATTACK_OUTPUTS)} to {out}")
    return report


__all__ = ["run_purify", "run_prune", "run_attack", "parse_prune_rule", "check_out", "auto_number",
           "Normalized", "ANPError"]
