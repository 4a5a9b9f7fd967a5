"""``anp-fast demo``: backdoor a small ResNet on scikit-learn's digits with ``anp-fast attack``, purify it with
``anp-fast purify`` on clean images the attack never trained on, and report ACC/ASR before and after.

The demo IS those two commands (it calls them, and prints and records them so that a user can run them by
hand); it adds one summary and one picture. An interrupted demo continues with ``anp-fast purify --resume OUT``.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import time
from typing import Dict, List, Optional

import torch

from .commands import ATTACK_OUTPUTS, PURIFY_OUTPUTS, _cut_value, _rule_text
from .config import RUN, ANPConfig
from .errors import ANPError

DATA = "digits"  # 1 x 16 x 16, fixed 80% train / 20% test split (359 test images)
ARCH = "resnet18"
WIDTH = 16
CLEAN_COUNT = 360  # the defender's clean images: left out of the attack's training (--reserve-clean) ...
HOLDOUT_FRACTION = 0.5  # ... half for ANP, half held out to check the pruning choice
TRAIN_BATCH = 64
OUTPUTS = ("summary.json", "anp_demo.png") + ATTACK_OUTPUTS + PURIFY_OUTPUTS


def _prepare_out(out: str, overwrite: bool) -> None:
    from .inputs import check_out

    check_out(out, (), False)  # an existing non-directory
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


def demo_commands(out: str, trigger: str, target: int, poison_rate: float, epochs: int, seed: int, iters: int,
                  prune_rule: str, budget: float, config: ANPConfig) -> Dict[str, List[str]]:
    """The ``anp-fast attack`` and ``anp-fast purify`` argument lists the demo runs."""
    from .cli import config_argv

    arch = ["--arch", ARCH, "--arch-arg", f"width={WIDTH}", "--data", DATA]
    attack = ["attack", *arch, "--trigger", trigger, "--target", str(target), "--poison-rate", str(poison_rate),
              "--epochs", str(epochs), "--batch-size", str(TRAIN_BATCH), "--seed", str(seed),
              "--reserve-clean", str(CLEAN_COUNT), "--out", out]
    purify = ["purify", *arch, "--checkpoint", os.path.join(out, "backdoored.safetensors"),
              "--clean-count", str(CLEAN_COUNT), "--holdout-fraction", str(HOLDOUT_FRACTION),
              "--trigger", trigger, "--target", str(target), "--prune", prune_rule, "--budget", str(budget),
              "--iters", str(iters), "--seed", str(seed), *config_argv(config), "--force", "--out", out]
    # --force: the checkpoint is the one the demo just trained (a short --epochs run may fail the plausibility
    # check, which guards against loading an untrusted checkpoint wrongly); its result is still reported
    return {"attack": attack, "purify": purify}


def _read_sweep(path: str) -> List[Dict]:
    def value(text):
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def run_demo(out: str = "anp_demo_out", iters: int = 2000, prune_rule: str = RUN.prune, trigger: str = "badnets",
             target: int = 0, poison_rate: float = 0.1, epochs: int = 15, seed: int = 0,
             budget: float = RUN.budget, config: Optional[ANPConfig] = None, progress: bool = True,
             overwrite: bool = False, log=print) -> dict:
    """Run ``anp-fast attack`` then ``anp-fast purify`` (:func:`demo_commands`) into ``out``, then write
    summary.json (both reports in one) and anp_demo.png (mask histogram and pruning sweep). The pruning amount
    is chosen by ``prune_rule`` (``auto``: from clean data only, checked on a held-out split that neither the
    attack nor ANP ever sees; or ``threshold:T``, ``number:K``, ``fraction:F``). Returns the summary."""
    from .commands import run_attack, run_purify
    from .inputs import check_rule, parse_prune_rule
    from .maskfile import load_masks
    from .report import plot_masks_and_sweep, table, write_json

    config = (config or ANPConfig()).replace(iters=iters, seed=seed)  # validates before anything is written
    check_rule(parse_prune_rule(prune_rule), budget, HOLDOUT_FRACTION)
    _prepare_out(out, overwrite)
    commands = demo_commands(out, trigger, target, poison_rate, epochs, seed, iters, prune_rule, budget, config)
    for name in ("attack", "purify"):
        log(f"$ anp-fast {shlex.join(commands[name])}")
    t_start = time.perf_counter()
    arch_args = {"width": WIDTH}
    attack = run_attack(arch=ARCH, data=DATA, out=out, trigger=trigger, target=target, poison_rate=poison_rate,
                        epochs=epochs, batch_size=TRAIN_BATCH, arch_args=arch_args, seed=seed,
                        reserve_clean=CLEAN_COUNT, overwrite=True, progress=progress, log=log)
    report = run_purify(arch=ARCH, checkpoint=os.path.join(out, "backdoored.safetensors"), data=DATA, out=out,
                        config=config, arch_args=arch_args, clean_count=CLEAN_COUNT,
                        holdout_fraction=HOLDOUT_FRACTION, prune_rule=prune_rule, budget=budget, trigger=trigger,
                        target=target, overwrite=True, progress=progress, force=True,
                        command={"argv": commands["purify"], "cwd": os.getcwd()}, log=log)
    before, after, chosen, choice = report["before"], report["after"], report["chosen"], report["choice"]
    masks = load_masks(os.path.join(out, "masks.txt"))
    plot_masks_and_sweep(os.path.join(out, "anp_demo.png"), masks, _read_sweep(os.path.join(out, "sweep.csv")),
                         chosen=_cut_value(masks, chosen),
                         title=f"ANP on digits, {trigger} backdoor, {iters} iterations, {report['pruned_neurons']} "
                               f"pruned ({_rule_text(chosen, choice)})")
    summary = {**report, "kind": "anp-fast demo", "attack": attack,
               "commands": {k: ["anp-fast", *v] for k, v in commands.items()},
               "poison_rate": poison_rate, "poisoned": attack["poisoned"], "threads": torch.get_num_threads(),
               "timings_s": {"train": attack["seconds"], "anp": report["anp"]["seconds"],
                             "anp_per_iter": report["anp"]["per_iter_s"],
                             "total": time.perf_counter() - t_start}}
    write_json(os.path.join(out, "summary.json"), summary)
    log("")
    log(table([["", "ACC %", "ASR %", "pruned"],
               ["before ANP", f"{100 * before['acc']:.1f}", f"{100 * before['asr']:.1f}", "0"],
               [f"after ANP ({_rule_text(chosen, choice)})", f"{100 * after['acc']:.1f}", f"{100 * after['asr']:.1f}",
                f"{report['pruned_neurons']}/{report['neurons']}"]]))
    log(f"\ntraining {attack['seconds']:.1f}s, ANP {report['anp']['seconds']:.1f}s "
        f"({1000 * report['anp']['per_iter_s']:.1f} ms/iteration), total {summary['timings_s']['total']:.1f}s")
    log(f"wrote summary.json and anp_demo.png to {out}")
    return summary
