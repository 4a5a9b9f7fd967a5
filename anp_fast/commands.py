"""The commands behind ``anp-fast purify / prune / attack``: from a checkpoint file and a data spec to a
purified checkpoint and a report, safely (no arbitrary unpickling), resumably and with one clear error line for
every bad input (:mod:`anp_fast.inputs` checks them, :mod:`anp_fast.evaluation` measures).

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
from typing import Dict, Optional

import torch
from torch.utils.data import Subset

from .config import RUN, ANPConfig
from .config import check_device as _check_device
from .errors import ConfigError, DataError, Interrupted
from .evaluation import Evaluator, check_plausible, format_row, memorization, tensors_of
from .fileio import atomic_write_text
from .inputs import (asr_dataset, check_out, check_rule, check_rule_fits, load_model_and_data, make_out,
                     make_trigger_spec, parse_prune_rule)
from .maskfile import load_masks, save_masks
from .methods import state_file, state_files
from .normalization import to_metadata
from .outputs import ATTACK_OUTPUTS, COMMAND_FILE, PURIFY_OUTPUTS  # noqa: F401  (imported from here too)
from .pruning import pruned_count, prune, sweep
from .report import write_csv, write_json
from .selection import THRESHOLDS
from .surgery import perturbable_layers

# the built-in methods' state files, for front ends that imported them from here (purify asks every method's)
STATE_FILE = state_file("anp")
STATE_FILES = state_files("anp") + state_files("rnp")


def check_device(device: Optional[str], cuda_graphs: bool = False) -> None:
    _check_device(device, cuda_graphs, name="--device")


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
               stop_patience: int = 0, stop_every: int = 100, stop_overlap: float = 1.0,
               stop_threshold: Optional[float] = None, normalize: Optional[str] = None,
               force: bool = False, image_cache=None, log=print) -> Dict:
    """Load, learn masks with ``method`` (``anp``, ``rnp`` or a registered front end's; ``method_options``:
    its own settings, e.g. an RNPConfig), prune, and write every output into ``out``; returns the report.
    ``command``: the arguments to record in ``out/command.json`` for a later ``--resume``. ``stop_patience``
    K > 0: the opt-in stop rule (:class:`anp_fast.selection.StopRule`): every ``stop_every`` iterations the
    pruning rule is applied to the current masks, and the loop ends once the set it would prune has not changed
    over K checks; ``stop_overlap`` < 1: once each check's set overlaps the previous one's by that much (Jaccard);
    ``stop_threshold`` T: the checks compare the sets of masks at or below T instead of the pruning rule's (no
    evaluation per check). ``normalize``: the input normalisation (:mod:`anp_fast.normalization`; default: the
    checkpoint's recorded one, else the data set's). ``force``: go on when the loaded checkpoint fails the
    plausibility check (:func:`check_plausible`). ``image_cache``: where an ImageFolder's clean and held-out
    images are decoded once and memory-mapped by later runs (:mod:`anp_fast.image_cache`; None: its default
    folder; False: decode at every draw).

    Under a process group of several processes (torchrun, ``--nproc``) every process runs this with the same
    arguments: they learn the masks together (:mod:`anp_fast.distributed`) and each evaluates its part of every
    data set for the pruning sweep and the choice (the counts are summed); rank 0 alone logs, writes the
    outputs and the run state, and returns the report; the other ranks return None."""
    from .methods import METHODS, all_state_files
    from .checkpoint import save_checkpoint
    from .datasets import ImageFolderDataset, clean_split
    from .distributed import current, rank

    t_start = time.perf_counter()
    lead = rank() == 0
    if not lead:
        log, progress = (lambda *args, **kwargs: None), False
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
    if isinstance(stop_overlap, bool) or not isinstance(stop_overlap, (int, float)) or not 0 < stop_overlap <= 1:
        raise ConfigError(f"--stop-overlap {stop_overlap}: must be in (0, 1] (1: the same set at every check)")
    if not stop_patience and (stop_overlap != 1.0 or stop_threshold is not None):
        raise ConfigError("--stop-overlap and --stop-threshold set the early stop: give --stop-patience K as well")
    if stop_threshold is not None and (isinstance(stop_threshold, bool)
                                       or not isinstance(stop_threshold, (int, float)) or not 0 < stop_threshold < 1):
        raise ConfigError(f"--stop-threshold {stop_threshold}: must be in (0, 1) (the masks at or below it are "
                          "compared; masks lie in [0, 1], so 1 would take every neuron)")
    if (clean_fraction is None) == (clean_count is None):
        clean_fraction = RUN.clean_fraction if clean_count is None else clean_fraction
    check_device(config.device, config.cuda_graphs)
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: known methods are {', '.join(METHODS)}")
    # any registered method's: a front end's method may save under another's name (a wrapper of anp saves
    # anp_state.pt), and --resume reruns the saved command, so its method finds its own files
    saved = [os.path.join(out, f) for f in all_state_files() if os.path.exists(os.path.join(out, f))]
    saved_state = bool(saved)
    finished = os.path.join(out, "report.json")
    if resume and os.path.exists(finished) and all(
            os.path.getmtime(finished) >= os.path.getmtime(f) for f in saved):
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
    collective = current(config.local_statistics) if config.distributed is not False else None
    norm_train = loaded.norm_train
    if image_cache is not False and isinstance(splits.train, ImageFolderDataset):
        from .evaluation import Normalized
        from .image_cache import cached_images

        used = sorted(set(clean_idx.tolist()) | set(holdout_idx.tolist()))
        train = cached_images(splits.train, used, image_cache or None, workers, progress, log, collective)
        norm_train = Normalized(train, splits.mean, splits.std)
    clean = Subset(norm_train, clean_idx.tolist())
    holdout = Subset(norm_train, holdout_idx.tolist()) if len(holdout_idx) else None
    triggered = asr_dataset(splits, trigger, target)
    device = torch.device(config.device) if config.device else torch.device("cpu")
    model = loaded.model.to(device)
    evaluator = Evaluator(device, loaded.norm_test, holdout, triggered, target, workers, clean=clean,
                          collective=collective)  # several processes: each evaluates its part
    for note in loaded.notes:
        log(note)
    plausible = check_plausible(model, loaded, device, checkpoint, force, log, workers)
    if lead:
        make_out(out)  # every input checked: from here on files are written (each atomically)
    before = evaluator(model)
    log(f"{arch} on {splits.name} (normalisation {loaded.normalization.describe()}): {len(clean_idx)} clean images "
        f"for ANP, {len(holdout_idx)} held out, {len(splits.test)} test; before: " + format_row(before))
    memorized = memorization(model, evaluator, before) if rule.get("auto") and lead else None
    if memorized and memorized["memorized"]:
        log(f"warning: the held-out clean images look memorized (accuracy {100 * before['holdout_acc']:.1f}%, mean "
            f"loss of the right ones {memorized['holdout_fit']:.4f} against {memorized['test_fit']:.4f} on the test "
            "split): they were probably part of the model's training data. Their accuracy then drops later than on "
            "unseen images and --prune auto over-prunes; give clean images the model has not seen (anp-fast attack "
            "--reserve-clean N keeps them out of training), or a smaller --budget")
    if command is not None and lead:  # what `--resume DIR` needs to rerun this command (not a result file)
        atomic_write_text(os.path.join(out, COMMAND_FILE), json.dumps(command, indent=1))
    in_memory = getattr(splits, "in_memory", not data.startswith("imagefolder"))
    clean_data = tensors_of(clean) if in_memory else clean
    from .methods import learn_masks

    extra = {"options": method_options} if method_options is not None else {}
    stop_rule = None
    if stop_patience:
        from .selection import StopRule, stop_checked_rule

        fixed = None if rule.get("auto") else {k: v for k, v in rule.items()
                                               if k in ("threshold", "number", "fraction")}
        stop_rule = StopRule(stop_checked_rule(model, evaluator, budget, stop_threshold, fixed), stop_patience,
                             overlap=stop_overlap)
        extra.update(monitor=stop_rule, monitor_every=stop_every)
    try:
        result = learn_masks(method, model, clean_data, config, progress=progress, save_every=save_every,
                             state_dir=out, resume=resume, **extra)
    except Interrupted as stop:
        log(f"interrupted after {len(stop.result.loss_history)} iterations; the state is in {out}: "
            f"continue with --resume {out}")
        raise
    masks = result.masks
    if lead:
        save_masks(masks, os.path.join(out, "masks.txt"))
    rows, chosen, choice = _pruning_sweep(model, masks, evaluator, rule, progress)  # every process evaluates a part
    if collective is not None:  # the clean walk runs in each process: rank 0's choice is the one
        import torch.distributed as dist

        shared = [chosen, choice]
        dist.broadcast_object_list(shared, src=0, group=collective.group)
        chosen, choice = shared
    purified = prune(model, masks, **chosen)
    after = evaluator(purified)
    if not lead:
        return None
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
        "data": data, "normalization": loaded.normalization.to_dict(), "plausibility": plausible, "memorization": memorized, "sizes": {"clean": len(clean_idx), "holdout": len(holdout_idx), "test": len(splits.test)},
        "trigger": trigger, "target": target, "prune": prune_rule, "chosen": chosen, "choice": choice,
        "budget_points": budget,
        "before": before, "after": after, "pruned_neurons": n_pruned, "neurons": result.num_neurons,
        "method": method, "method_info": result.info,
        "stop_rule": None if stop_rule is None else {"patience": stop_patience, "every": stop_every,
                                                     "overlap": stop_overlap, "threshold": stop_threshold,
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
    log(f"after pruning {n_pruned}/{result.num_neurons} neurons ({_rule_text(chosen, choice)}): " + format_row(after))
    log(f"wrote {', '.join(PURIFY_OUTPUTS)} to {out}")
    return report


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
        f"{loaded.normalization.describe()}): " + format_row(after))
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
    from .evaluation import accuracy, attack_success_rate
    from .train import train_classifier

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
