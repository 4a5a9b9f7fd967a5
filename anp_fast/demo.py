"""``anp-fast demo``: backdoor a small ResNet on scikit-learn's digits with BadNets, purify it with ANP on a
clean split the attack never touched, and report ACC/ASR before and after."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Optional

import torch

from .attacks import parse_trigger, poison, triggered_test_set
from .config import RUN, ANPConfig
from .datasets import load_digits
from .engine import Interrupted, optimize_masks
from .errors import ANPError
from .fileio import atomic_torch_save
from .maskfile import save_masks
from .models import resnet18
from .commands import _cut_value, _rule_text
from .pruning import prune, pruned_count, sweep
from .report import plot_masks_and_sweep, table, write_csv, write_json
from .train import train_classifier

OUTPUTS = ("masks.txt", "summary.json", "sweep.csv", "anp_demo.png", "purified.pt", "backdoored.pt")
DIGITS_SIZE = 16
HOLDOUT_FRACTION = 0.1  # of the digits: the held-out clean split (disjoint from training, ANP's clean set, test)


def _prepare_out(out: str, overwrite: bool) -> None:
    from .inputs import make_out

    make_out(out)
    present = [f for f in OUTPUTS if os.path.exists(os.path.join(out, f))]
    if not present or overwrite:
        return
    summary = os.path.join(out, "summary.json")
    try:
        with open(summary) as f:
            ours = json.load(f).get("kind") == "anp-fast demo"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ANPError(f"{out} already holds {', '.join(present)} not written by a previous demo; "
                       "choose another --out or pass --overwrite")


def run_demo(out: str = "anp_demo_out", iters: int = 2000, prune_rule: str = "auto", trigger: str = "badnets",
             target: int = 0, poison_rate: float = 0.1, epochs: int = 15, seed: int = 0, width: int = 16,
             budget: float = RUN.budget, config: Optional[ANPConfig] = None, progress: bool = True,
             overwrite: bool = False, log=print) -> dict:
    """Run the whole demo and write masks.txt, summary.json, sweep.csv, anp_demo.png, purified.pt and
    backdoored.pt into ``out``. The pruning amount is chosen by ``prune_rule`` (``auto``: from the held-out
    clean split, which neither the attack nor ANP ever sees; or ``threshold:T``, ``number:K``,
    ``fraction:F``). Returns the summary."""
    from .evaluation import Evaluator
    from .inputs import check_rule, parse_prune_rule
    from .selection import choose
    from torch.utils.data import TensorDataset

    config = (config or ANPConfig()).replace(iters=iters, seed=seed)  # validates before anything is written
    rule = parse_prune_rule(prune_rule)
    check_rule(rule, budget, HOLDOUT_FRACTION)
    _prepare_out(out, overwrite)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    splits = load_digits(seed=seed, holdout_fraction=HOLDOUT_FRACTION)
    trig = parse_trigger(trigger, (1, DIGITS_SIZE, DIGITS_SIZE))
    x_train, y_train, poisoned = poison(splits.train.x, splits.train.y, trig, target, poison_rate, seed=seed)
    x_asr, y_asr = triggered_test_set(splits.test.x, splits.test.y, trig, target)
    log(f"digits: {len(splits.train)} train ({len(poisoned)} poisoned with {trigger}, target {target}), "
        f"{len(splits.clean)} clean for ANP, {len(splits.holdout)} held out to check the pruning choice, "
        f"{len(splits.test)} test")

    model = resnet18(num_classes=10, in_channels=1, width=width)
    t0 = time.perf_counter()
    train_classifier(model, x_train, y_train, epochs=epochs, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0
    atomic_torch_save(model.state_dict(), os.path.join(out, "backdoored.pt"))
    evaluate = Evaluator(torch.device("cpu"), TensorDataset(splits.test.x, splits.test.y),
                         TensorDataset(splits.holdout.x, splits.holdout.y), TensorDataset(x_asr, y_asr), target,
                         clean=TensorDataset(splits.clean.x, splits.clean.y))
    before = evaluate(model)
    from .evaluation import plausibility

    plausible = plausibility(model, evaluate.test, 10, torch.device("cpu"))  # what purify checks a checkpoint by
    log(f"backdoored model: ACC {100 * before['acc']:.1f}%  ASR {100 * before['asr']:.1f}%")

    partial = os.path.join(out, "masks.partial.txt")
    try:
        result = optimize_masks(model, (splits.clean.x, splits.clean.y), config, progress=progress)
    except Interrupted as stop:
        save_masks(stop.result.masks, partial)
        log(f"interrupted after {len(stop.result.loss_history)} iterations; masks so far in {partial}")
        raise
    if os.path.exists(partial):  # left by an earlier interrupted demo: this run supersedes it
        os.remove(partial)
    save_masks(result.masks, os.path.join(out, "masks.txt"))
    choice = None
    if rule.get("auto"):
        choice = choose(model, result.masks, evaluate, budget_points=budget, mode=rule["mode"], progress=progress)
        chosen = choice.pop("rule")
    else:
        chosen = rule
    purified = prune(model, result.masks, **chosen)
    after = evaluate(purified)
    atomic_torch_save(purified.state_dict(), os.path.join(out, "purified.pt"))
    rows = sweep(model, result.masks, evaluate)
    write_csv(os.path.join(out, "sweep.csv"), rows)
    n_pruned = pruned_count(result.masks, **chosen)
    cut = _cut_value(result.masks, chosen)
    plot_masks_and_sweep(os.path.join(out, "anp_demo.png"), result.masks, rows, chosen=cut,
                         title=f"ANP on digits, {trigger} backdoor, {iters} iterations, {n_pruned} pruned "
                               f"({_rule_text(chosen, choice)})")
    summary = {
        "kind": "anp-fast demo", "plausibility": plausible,
        "normalization": {"name": "none", "mean": [0.0], "std": [1.0]},  # the demo's model sees pixels in [0, 1]
        "before": before, "after": after, "prune": prune_rule, "chosen": chosen, "choice": choice,
        "budget_points": budget,
        "pruned_neurons": n_pruned, "neurons": result.num_neurons,
        "trigger": trigger, "target": target, "poison_rate": poison_rate, "poisoned": len(poisoned),
        "sizes": {"train": len(splits.train), "clean": len(splits.clean), "holdout": len(splits.holdout),
                  "test": len(splits.test)},
        "timings_s": {"train": train_s, "anp": result.timings["total_s"],
                      "anp_per_iter": result.timings["per_iter_s"], "total": time.perf_counter() - t_start},
        "config": config.to_dict(), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    write_json(os.path.join(out, "summary.json"), summary)
    log("")
    log(table([["", "ACC %", "ASR %", "pruned"],
               ["before ANP", f"{100 * before['acc']:.1f}", f"{100 * before['asr']:.1f}", "0"],
               [f"after ANP ({_rule_text(chosen, choice)})", f"{100 * after['acc']:.1f}", f"{100 * after['asr']:.1f}",
                f"{n_pruned}/{result.num_neurons}"]]))
    log(f"\ntraining {train_s:.1f}s, ANP {result.timings['total_s']:.1f}s "
        f"({1000 * result.timings['per_iter_s']:.1f} ms/iteration), total {summary['timings_s']['total']:.1f}s")
    log(f"wrote {', '.join(OUTPUTS)} to {out}")
    return summary
