"""The quality matrix: attacks x data sets x seeds x methods, purified with the oracle-free rule.

    python -m anp_fast_bench.quality --work DIR [--data digits-cifar,mnist5k] [--attacks badnets,blend,...]
        [--rates 0.1,0.05] [--seeds 0,1,2] [--methods anp,rnp] [--jobs 2] [--threads 1] [--report OUT]

Each cell (data set, attack, poisoning rate, seed) is trained with the pipeline of ``anp-fast attack``, with
the defender's ``--clean-count`` images reserved (``--reserve-clean``: a defender's own data, never seen by
the model); each method learns masks on them as ``anp-fast purify --clean-count`` does (four fifths for the
method, one fifth held out, drawn with the cell's seed), then the pruning amount is chosen by the rule of
:mod:`anp_fast.selection` from the held-out clean split alone. Triggered data is only measured: the table
also gives the oracle (the lowest test ASR within a 2-point test-ACC drop) as a reference, never as a choice.

Everything a stage makes is written atomically into ``DIR/<data>/<attack>@<rate>/s<seed>/`` and a stage whose
output exists is skipped, so an interrupted run continues where it stopped (``--jobs`` cells at a time, each in
its own process with ``--threads`` threads); inside the masks stage, from the last snapshot (the run state is
saved with each), and inside the evaluation stage from the rule it was measuring. Masks are kept every
``--snapshot-every`` iterations, so the stop rule (:mod:`anp_fast.selection`) is measured from the same runs:
the iteration it would stop at and the outcome it would have given. ``--report OUT`` writes quality.md,
quality.csv, cells.json and quality.png from whatever cells are done; ``--status`` says where each selected cell
stands (a masks stage: the iteration it resumes from; an evaluation: the rules measured) and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

# The trigger spec of `anp-fast attack` for each scenario; benign: no poisoning (ASR measured with BadNets).
# Published defaults, except SIG: at BackdoorBench's delta 40/255 it reached ASR 34% (digits-cifar, 10%) and
# 16% (mnist5k, 5%) in these small models (20 epochs); trained at 0.2 and tested at 0.3 (a stronger test
# signal, as Barni et al. test) it reached 100% / 49%. WaNet's reference field (s=0.5) implants on mnist5k
# (99.8%) but not on the upsampled 8x8 digits: 18% (s=1: 26%, s=2: 27%, s=4: 32%, s=1 and 40 epochs: 41%).
# What keeps it out there is WaNet's noise mode (cross_ratio=2: twice as many randomly warped images keep their
# labels; benchmarks/results/wanet_20261207): without it, s=1.0 implants (ASR 99.1%). digits-cifar's WaNet cells
# therefore use `wanet:s=1.0,cross_ratio=0`, a named deviation from the published attack.
ATTACKS = {"badnets": "badnets", "blend": "blend", "sig": "sig:delta=0.2,test_delta=0.3", "wanet": "wanet",
           "patch": "patch", "benign": "badnets"}
ATTACKS_BY_DATA: Dict = {("digits-cifar", "wanet"): "wanet:s=1.0,cross_ratio=0"}  # (data, attack) -> own spec


def attack_spec(data: str, attack: str) -> str:
    return ATTACKS_BY_DATA.get((data, attack), ATTACKS[attack])
DATASETS = ("digits-cifar", "mnist5k")
TARGET = 0
ORACLE_ACC_DROP = 0.02
# --prune auto (the walk with pre-activation evidence), then the walk on the masks alone and the evidence alone
REFERENCE_RULES = ("walk", "masks", "evidence")


@dataclass(frozen=True)
class Cell:
    data: str
    attack: str
    rate: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.data}/{self.attack}@{self.rate:g}/s{self.seed}"


@dataclass
class Settings:
    work: str
    arch: str = "resnet18"
    width: int = 16
    epochs: int = 20
    clean_count: int = 500
    holdout_fraction: float = 0.2
    iters: int = 2000
    precision: str = "bf16"
    rnp_precision: str = "fp32"
    snapshot_every: int = 100
    threads: int = 1
    budget: float = 2.0
    rules: tuple = REFERENCE_RULES  # the default rule ("walk") first, then the references to measure too
    dense_step: int = 2

    def data_spec(self, data: str) -> str:
        if data == "digits-cifar":  # the README flow: export-digits, then cifar10:DIR
            return f"cifar10:{os.path.join(self.work, 'data', 'digits-cifar')}"
        return data


def _write_json(path: str, obj) -> None:
    from anp_fast.report import write_json

    write_json(path, obj)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- stages
def attack_stage(cell: Cell, s: Settings, log) -> str:
    from anp_fast.commands import run_attack

    folder = os.path.join(s.work, cell.key)
    if not os.path.exists(os.path.join(folder, "attack.json")):
        # a new model: whatever the methods learned or evaluated here belonged to an earlier one (a lost model,
        # or a report's cells seeded back into a work folder) and must not be taken over
        for method in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if os.path.isdir(os.path.join(folder, method)):
                log(f"{cell.key}: a new model; removing {method}/ of the earlier one")
                shutil.rmtree(os.path.join(folder, method))
        rate = 0.0 if cell.attack == "benign" else cell.rate
        run_attack(arch=s.arch, data=s.data_spec(cell.data), out=folder, trigger=attack_spec(cell.data, cell.attack),
                   target=TARGET,
                   poison_rate=rate, epochs=s.epochs, arch_args={"width": s.width}, seed=cell.seed, progress=False,
                   reserve_clean=s.clean_count, overwrite=True, log=log)
    return folder


def _setup(cell: Cell, s: Settings):
    """Model, clean tensors and the evaluator, as ``anp-fast purify`` builds them."""
    import torch
    from torch.utils.data import Subset

    from anp_fast.datasets import clean_split
    from anp_fast.evaluation import Evaluator, tensors_of
    from anp_fast.inputs import asr_dataset, load_model_and_data

    folder = os.path.join(s.work, cell.key)
    loaded = load_model_and_data(s.arch, os.path.join(folder, "backdoored.safetensors"), s.data_spec(cell.data),
                                 {"width": s.width})
    clean_idx, holdout_idx = clean_split(len(loaded.splits.train), count=s.clean_count,
                                         holdout_fraction=s.holdout_fraction, seed=cell.seed)
    clean_set = Subset(loaded.norm_train, clean_idx.tolist())
    clean = tensors_of(clean_set)
    holdout = Subset(loaded.norm_train, holdout_idx.tolist())
    triggered = asr_dataset(loaded.splits, attack_spec(cell.data, cell.attack), TARGET)
    evaluator = Evaluator(torch.device("cpu"), loaded.norm_test, holdout, triggered, TARGET, clean=clean_set)
    return loaded.model, clean, evaluator


def masks_stage(cell: Cell, method: str, s: Settings, log) -> str:
    """Learn ``method``'s masks on ``cell`` (nothing when ``learn.json`` is there). Resumable: the run state is
    saved at every snapshot (``s.snapshot_every`` iterations) and the snapshots so far beside it, so a runner
    killed mid-run goes on from the last snapshot with the masks and snapshots of an uninterrupted run."""
    import torch

    from anp_fast import ANPConfig, save_masks
    from anp_fast.fileio import atomic_torch_save
    from anp_fast.methods import learn_masks, state_file, state_files

    folder = os.path.join(s.work, cell.key, method)
    done = os.path.join(folder, "learn.json")
    if os.path.exists(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    model, clean, _ = _setup(cell, s)
    config = ANPConfig(iters=s.iters, seed=cell.seed,
                       precision=s.precision if method == "anp" else s.rnp_precision)
    partial = os.path.join(folder, "snapshots_partial.pt")
    snapshots = _partial_snapshots(os.path.join(folder, state_file(method)), partial, s.snapshot_every)

    def keep(iteration, engine):
        snapshots[iteration] = engine.state.mask.detach().cpu().clone()
        atomic_torch_save({"iterations": list(snapshots), "masks": list(snapshots.values())}, partial)
        return False

    result = learn_masks(method, model, clean, config, progress=False, monitor=keep,
                         monitor_every=s.snapshot_every, state_dir=folder, resume=True,
                         save_every=s.snapshot_every)
    if result.timings.get("resumed_at"):
        log(f"{cell.key} {method}: resumed at iteration {result.timings['resumed_at']}")
    save_masks(result.masks, os.path.join(folder, "masks.txt"))
    its = list(snapshots)  # in order: the earlier run's (up to its state) and this run's, which go on from there
    atomic_torch_save({"iterations": its, "masks": torch.stack([snapshots[i] for i in its]) if its else torch.zeros(0),
                       "layers": result.layers}, os.path.join(folder, "snapshots.pt"))
    _write_json(done, {"method": method, "seconds": result.timings["total_s"], "iters": result.timings["iters"],
                       "per_iter_s": result.timings["per_iter_s"], "resumed_at": result.timings.get("resumed_at", 0),
                       "config": config.to_dict(), "info": result.info, "threads": torch.get_num_threads()})
    for name in (*state_files(method), os.path.basename(partial)):
        _remove(os.path.join(folder, name))
    return folder


def _partial_snapshots(state: str, partial: str, every: int) -> Dict[int, "object"]:
    """The snapshots an interrupted masks stage took up to the iteration its saved run ``state`` holds ({} when
    there is none: the run starts over). The state is saved just before the snapshot of the same iteration, so
    a run killed between the two lacks that snapshot: it is the state's own mask."""
    import torch

    if not os.path.exists(state):
        return {}
    saved = torch.load(state, weights_only=True)
    upto = int(saved["iteration"])
    taken = torch.load(partial, weights_only=True) if os.path.exists(partial) else {"iterations": [], "masks": []}
    snapshots = {int(i): m for i, m in zip(taken["iterations"], taken["masks"]) if int(i) <= upto}
    if upto % every == 0 and upto not in snapshots:
        snapshots[upto] = saved["engine"]["mask"].clone()
    return dict(sorted(snapshots.items()))


def _oracle(rows: List[Dict], before: Dict) -> Dict:
    ok = [r for r in rows if before["acc"] - r["acc"] <= ORACLE_ACC_DROP + 1e-9]
    best = min(ok, key=lambda r: (r.get("asr", 0.0), r["number"]))
    return {"number": best["number"], "acc": best["acc"], "asr": best.get("asr")}


def dense_sweep(model, masks, evaluator, step: int = 2, stop_drop: float = 0.2) -> List[Dict]:
    """Every ``step``-th pruning count from 0, every column, until the held-out accuracy has fallen by more than
    ``stop_drop`` (nothing past that is of interest to any rule)."""
    from anp_fast.pruning import sweep

    total = sum(int(m.numel()) for m in masks.values())
    rows, k, base = [], 0, None
    while k <= total:
        (row,) = sweep(model, masks, evaluator, numbers=[k])
        rows.append(row)
        base = row["holdout_acc"] if base is None else base
        if base - row["holdout_acc"] > stop_drop:
            break
        k += step
    return rows


def _kept_replay(folder: str, key: str, old: Optional[Dict]) -> tuple:
    """The kept replay ``key`` of a cell-method: its file, else the one an earlier eval.json holds; and the
    file's content (None: no file)."""
    path = os.path.join(folder, STOP_REPLAYS[key][0])
    on_file = _read_json(path) if os.path.exists(path) else None
    return (on_file if on_file is not None else (old or {}).get(key)), on_file


def _replay_needed(replay: Optional[Dict], key: str) -> bool:
    """Whether the replay ``key`` must be run (again): none kept, other options, or, where it stopped, its outcome
    judged by another rule (the mask-order rule before 2026-12-07, or the walk with other settings). Where a
    replay stops depends on the masks and its options only."""
    if replay is None or replay.get("options", LEGACY_REPLAY_OPTIONS) != STOP_REPLAYS[key][1]:
        return True
    return replay.get("stopped_at") is not None and (replay.get("outcome_mode") != "walk"
                                                     or replay.get("walk_rule") != current_rule())


def _stop_replays(model, masks, evaluator, final_rule: Dict, folder: str, old: Optional[Dict], s: Settings,
                  force: bool = False) -> Dict:
    """The stop rule's variants (STOP_REPLAYS) replayed on an ANP run's snapshots: where each would have stopped
    and what the default rule (the walk) prunes from the masks there. Each kept in its own file next to
    eval.json, and taken over from there (or from an earlier eval.json of the same masks) unless it must be run
    again (:func:`_replay_needed`; ``force``, as ``--force-eval``: also every replay that stopped, whose outcome
    is the walk's)."""
    import torch

    from anp_fast import selection

    replays, snaps = {}, None
    for key, (name, options) in STOP_REPLAYS.items():
        replay, on_file = _kept_replay(folder, key, old)
        if _replay_needed(replay, key) or (force and replay.get("stopped_at") is not None):
            if snaps is None:
                snaps = torch.load(os.path.join(folder, "snapshots.pt"), weights_only=True)
            replay = selection.simulate_stop(model, masks, snaps, evaluator, budget_points=s.budget,
                                             outcome_mode="walk", final_rule=final_rule, **options)
            if replay is None:  # no snapshots (a run shorter than --snapshot-every): nothing to replay
                replay = {"stopped_at": None, "iters": 0, "saved": 0, "checks": []}
            replay.update(options=options, walk_rule=current_rule())
        if replay != on_file:
            _write_json(os.path.join(folder, name), replay)
        replays[key] = replay
    return replays


def eval_stage(cell: Cell, method: str, s: Settings, log, force: bool = False) -> Dict:
    import torch

    from anp_fast import load_masks
    from anp_fast.pruning import prune, pruned_count
    from anp_fast import selection

    folder = os.path.join(s.work, cell.key, method)
    out = os.path.join(folder, "eval.json")
    partial_path = os.path.join(folder, RULES_PARTIAL)
    old = _read_json(out) if os.path.exists(out) else None
    if old is not None and not force:
        if rule_of(old) == current_rule():
            _remove(partial_path)  # what a killed --force-eval run had measured: this evaluation stands
            if method != "anp":
                return old
            kept = {k: _kept_replay(folder, k, old)[0] for k in STOP_REPLAYS}
            if any(_replay_needed(r, k) for k, r in kept.items()):
                # an evaluation from before a replay existed (or with a stale one): only the replays are added
                model, _, evaluator = _setup(cell, s)
                masks = load_masks(os.path.join(folder, "masks.txt"))
                kept = _stop_replays(model, masks, evaluator, old["chosen"]["rule"], folder, old, s)
            if any(old.get(k) != r for k, r in kept.items()):  # e.g. a replay written, then the run stopped
                old.update(kept)
                _write_json(out, old)
            return old
        log(f"{cell.key} {method}: evaluated under {rule_of(old)}, re-evaluating under {current_rule()}")
    model, _, evaluator = _setup(cell, s)
    masks = load_masks(os.path.join(folder, "masks.txt"))
    before = evaluator(model)
    dense_path = os.path.join(folder, "dense.json")
    if os.path.exists(dense_path):
        rows = _read_json(dense_path)
    else:
        rows = dense_sweep(model, masks, evaluator, step=s.dense_step)
        _write_json(dense_path, rows)
    # each rule's outcome is kept as it is measured (a walk takes minutes): a run killed in this stage goes on
    # with the next rule. Taken over only when measured under the same default rule to replace the same
    # evaluation (none, an earlier rule's, or the one --force-eval replaces).
    replaces = _fingerprint(out)
    partial = _read_json(partial_path) if os.path.exists(partial_path) else None
    if partial is None or partial.get("rule") != current_rule() or partial.get("replaces") != replaces:
        partial = {"rule": current_rule(), "replaces": replaces}
    done = partial.setdefault("rules", {})
    for mode in s.rules:  # the default rule first, then each signal alone (a reference)
        if mode not in done:
            picked = selection.choose(model, masks, evaluator, budget_points=s.budget, mode=mode)
            done[mode] = {"picked": picked, "outcome": {
                "name": picked["name"], "evidence": picked.get("evidence"),
                "pruned": pruned_count(masks, **picked["rule"]),
                "after": evaluator(prune(model, masks, **picked["rule"]))}}
            _write_json(partial_path, partial)
    outcomes = {mode: done[mode]["outcome"] for mode in s.rules}
    chosen = done["walk"]["picked"]
    after, n = outcomes["walk"]["after"], outcomes["walk"]["pruned"]
    replays = _stop_replays(model, masks, evaluator, chosen["rule"], folder, old, s, force) if method == "anp" else {}
    result = {"cell": cell.key, "data": cell.data, "attack": cell.attack, "rate": cell.rate, "seed": cell.seed,
              "method": method, "before": before, "after": after, "pruned": n, "chosen": chosen, "rules": outcomes,
              "oracle": _oracle(rows, before), "neurons": sum(int(m.numel()) for m in masks.values()),
              "learn": _read_json(os.path.join(folder, "learn.json")), **{k: replays.get(k) for k in STOP_REPLAYS},
              **current_rule()}
    _write_json(out, result)
    _remove(partial_path)
    return result


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fingerprint(path: str) -> Optional[str]:
    """A file's content hash (None: no file)."""
    import hashlib

    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


RULES_PARTIAL = "rules_partial.json"  # the evaluation stage's rules measured so far (removed when it is done)
# the stop rule's variants replayed on every ANP cell: eval.json key -> (file, simulate_stop options)
STOP_REPLAYS = {"stop": ("stop.json", {"patience": 3}),  # purify --stop-patience 3 (the mask-order rule's set)
                # purify --stop-patience 3 --stop-threshold 0.2 --stop-overlap 0.8
                "stop_overlap": ("stop_overlap.json", {"patience": 3, "threshold": 0.2, "overlap": 0.8})}
LEGACY_REPLAY_OPTIONS = {"patience": 3}  # the options of every replay from before they were recorded


def stop_flags(options: Dict) -> str:
    """The purify flags of a replay's ``options`` (checks at the kept snapshots: --stop-every = --snapshot-every)."""
    flags = f"--stop-patience {options['patience']}"
    if options.get("threshold") is not None:
        flags += f" --stop-threshold {options['threshold']:g}"
    if options.get("overlap", 1.0) != 1.0:
        flags += f" --stop-overlap {options['overlap']:g}"
    return flags


# the default rule's settings an evaluation records, with their values for cells from before they were recorded
RULE_SETTINGS = {"walk_floor": 0.2, "walk_decide_fraction": 1.0, "walk_tau": 0.002, "walk_patience": 20,
                 "walk_max_fraction": 0.6, "suspect_z": 3.0}


def current_rule() -> Dict:
    from anp_fast import evidence, selection

    return {"walk_floor": selection.WALK_FLOOR, "walk_decide_fraction": selection.WALK_DECIDE_FRACTION,
            "walk_tau": selection.WALK_TAU, "walk_patience": selection.WALK_PATIENCE,
            "walk_max_fraction": selection.WALK_MAX_FRACTION, "suspect_z": evidence.SUSPECT_Z}


def rule_of(result: Dict) -> Dict:
    """The default rule's settings ``result`` was evaluated with."""
    return {k: result.get(k, v) for k, v in RULE_SETTINGS.items()}


def run_cell(cell: Cell, methods: List[str], s: Settings, evaluate: bool = True, force_eval: bool = False) -> Dict:
    import torch

    torch.set_num_threads(s.threads)
    lines = []
    log = lines.append
    t0 = time.perf_counter()
    attack_stage(cell, s, log)
    results = {}
    for method in methods:
        masks_stage(cell, method, s, log)
        if evaluate:
            results[method] = eval_stage(cell, method, s, log, force=force_eval)
    return {"cell": cell.key, "seconds": time.perf_counter() - t0, "results": results, "log": lines}


def cell_status(cell: Cell, methods: List[str], s: Settings) -> Tuple[str, bool]:
    """Where ``cell`` stands, from its folder alone (nothing is run): the model, then each method's masks (the
    iteration an interrupted run would resume from) and evaluation; and whether every method is evaluated under
    the current default rule."""
    import torch

    from anp_fast.methods import state_file

    folder = os.path.join(s.work, cell.key)
    if not os.path.exists(os.path.join(folder, "attack.json")):
        return f"{cell.key}: no model yet", False
    parts, done = [], True
    for method in methods:
        sub = os.path.join(folder, method)
        out, state = os.path.join(sub, "eval.json"), os.path.join(sub, state_file(method))
        r = _read_json(out) if os.path.exists(out) else None
        current = r is not None and rule_of(r) == current_rule()
        done = done and current
        if r is not None:
            parts.append(f"{method}: ACC {_pct(r['before']['acc'])}->{_pct(r['after']['acc'])} ASR "
                         f"{_pct(r['before'].get('asr'))}->{_pct(r['after'].get('asr'))}"
                         + ("" if current else " (an earlier rule: re-evaluated on the next run)"))
        elif os.path.exists(os.path.join(sub, "learn.json")):
            partial = os.path.join(sub, RULES_PARTIAL)
            measured = ", ".join(_read_json(partial).get("rules", {})) if os.path.exists(partial) else ""
            parts.append(f"{method}: masks learned, " + (f"evaluation under way (measured: {measured})" if measured
                                                          else "not evaluated"))
        elif os.path.exists(state):
            try:
                at = int(torch.load(state, map_location="cpu", weights_only=True)["iteration"])
                parts.append(f"{method}: masks at iteration {at} (resumes there)")
            except Exception as exc:  # a state file being written, or damaged: the run says which
                parts.append(f"{method}: unreadable run state ({type(exc).__name__})")
        else:
            parts.append(f"{method}: no masks yet")
    return f"{cell.key}: model trained; " + "; ".join(parts), done


# --------------------------------------------------------------------------------------------- report
def collect(work: str) -> List[Dict]:
    found = []
    for root, _, files in os.walk(work):
        if "eval.json" in files:
            found.append(_read_json(os.path.join(root, "eval.json")))
    return sorted(found, key=lambda r: (r["data"], r["attack"], -r["rate"], r["method"], r["seed"]))


def _pct(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def summarise(results: List[Dict]) -> List[Dict]:
    """One row per (data, attack, rate, method): median and worst seed of the oracle-free outcome."""
    groups: Dict = {}
    for r in results:
        groups.setdefault((r["data"], r["attack"], r["rate"], r["method"]), []).append(r)
    rows = []
    for (data, attack, rate, method), rs in groups.items():
        drop = [r["before"]["acc"] - r["after"]["acc"] for r in rs]
        asr = [r["after"].get("asr", float("nan")) for r in rs]
        worst = max(rs, key=lambda r: (r["after"].get("asr", 0), r["before"]["acc"] - r["after"]["acc"]))
        rows.append({
            "data": data, "attack": attack, "rate": rate, "method": method, "seeds": len(rs),
            "acc_before": statistics.median(r["before"]["acc"] for r in rs),
            "asr_before": statistics.median(r["before"].get("asr", float("nan")) for r in rs),
            "acc_after": statistics.median(r["after"]["acc"] for r in rs),
            "asr_after": statistics.median(asr), "asr_after_worst": max(asr),
            "acc_drop_median": statistics.median(drop), "acc_drop_worst": max(drop),
            "pruned_median": statistics.median(r["pruned"] for r in rs),
            "oracle_asr_median": statistics.median(r["oracle"]["asr"] for r in rs),
            "oracle_acc_median": statistics.median(r["oracle"]["acc"] for r in rs),
            "worst_seed": worst["seed"],
        })
        for mode in REFERENCE_RULES[1:]:  # each signal alone: worst seed
            outs = [r["rules"][mode] for r in rs if mode in r.get("rules", {})]
            if len(outs) == len(rs):
                rows[-1][f"{mode}_asr_worst"] = max(o["after"].get("asr", float("nan")) for o in outs)
                rows[-1][f"{mode}_drop_worst"] = max(r["before"]["acc"] - o["after"]["acc"] for r, o in zip(rs, outs))
    return rows


def passes(row: Dict) -> Optional[bool]:
    """The acceptance bar of a row: benign loses <= 1 point; BadNets, SIG, WaNet and patch reach ASR <= 5% with
    <= 2 points lost, in the worst seed; Blend is reported as it is (None)."""
    if row["attack"] == "benign":
        return row["acc_drop_worst"] <= 0.01 + 1e-9
    if row["attack"] == "blend":
        return None
    return row["asr_after_worst"] <= 0.05 + 1e-9 and row["acc_drop_worst"] <= 0.02 + 1e-9


def write_report(results: List[Dict], out: str, stale: Optional[List[Dict]] = None) -> List[Dict]:
    """The table, CSV, cells.json and plot of ``results``; ``stale``: cells evaluated under an earlier default
    rule, listed below the table and counted nowhere."""
    from anp_fast.report import write_csv

    os.makedirs(out, exist_ok=True)
    rows = summarise(results)
    for row in rows:
        row["passes"] = passes(row)
    _write_json(os.path.join(out, "cells.json"), results)
    write_csv(os.path.join(out, "quality.csv"), rows)
    lines = ["| data | attack | rate | method | seeds | ACC/ASR before | ACC/ASR after (median) | worst seed: ASR, "
             "ACC drop | pruned | masks alone: worst ASR, drop | evidence alone: worst ASR, drop | oracle ACC/ASR "
             "(reference) | bar |", "|" + "---|" * 13]
    for r in rows:
        bar = {True: "met", False: "MISSED", None: "as is"}[r["passes"]]
        attack = r["attack"] + ("*" if (r["data"], r["attack"]) in ATTACKS_BY_DATA else "")
        lines.append(f"| {r['data']} | {attack} | {r['rate']:g} | {r['method']} | {r['seeds']} | "
                     f"{_pct(r['acc_before'])}/{_pct(r['asr_before'])} | {_pct(r['acc_after'])}/{_pct(r['asr_after'])} | "
                     f"{_pct(r['asr_after_worst'])}, {100 * r['acc_drop_worst']:.1f} | {r['pruned_median']:g} | "
                     + "".join(f"{_pct(r.get(m + '_asr_worst'))}, {_pct(r.get(m + '_drop_worst'))} | "
                               for m in REFERENCE_RULES[1:]) +
                     f"{_pct(r['oracle_acc_median'])}/{_pct(r['oracle_asr_median'])} | {bar} |")
    own = sorted({(r["data"], r["attack"]) for r in rows} & set(ATTACKS_BY_DATA))
    if own:
        lines += ["", "\\* " + "; ".join(f"{d} {a}: `{ATTACKS_BY_DATA[(d, a)]}` (not the published "
                                         f"`{ATTACKS[a]}`, see the runner's ATTACKS comment)" for d, a in own)]
    stops = [r for r in results if any(r.get(key) for key in STOP_REPLAYS)]
    if stops:  # the opt-in stop rule's variants replayed on each ANP run's snapshots (checks every 100)
        lines += ["", "Stop rule (opt-in), replayed on each ANP run's mask snapshots (a check at every snapshot: "
                  "`--stop-every` = the runner's `--snapshot-every`); at the stop, the default rule (the clean walk) "
                  "prunes from the masks there:", "",
                  "| cell | method | flags | stopped at | iterations saved | same pruned set as at the end | "
                  "ACC/ASR at the stop | ACC/ASR at the end | bar at the stop / at the end |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in stops:
            for key in STOP_REPLAYS:
                st = r.get(key)
                if not st:
                    continue
                flags = stop_flags(st.get("options", LEGACY_REPLAY_OPTIONS))
                at = st.get("after") if st["stopped_at"] is not None and st.get("outcome_mode") == "walk" else None
                bar = "-"
                if at:
                    verdicts = [passes({"attack": r["attack"], "asr_after_worst": row.get("asr"),
                                        "acc_drop_worst": r["before"]["acc"] - row["acc"]})
                                for row in (at, r["after"])]
                    bar = " / ".join({True: "met", False: "MISSED", None: "as is"}[v] for v in verdicts)
                lines.append(f"| {r['cell']} | {r['method']} | `{flags}` | {st['stopped_at'] or 'never'} | "
                             f"{st['saved']} | "
                             f"{'-' if st['stopped_at'] is None else ('yes' if st.get('same_set') else 'no')} | "
                             f"{_pct(at['acc']) if at else '-'}/{_pct(at.get('asr')) if at else '-'} | "
                             f"{_pct(r['after']['acc'])}/{_pct(r['after'].get('asr'))} | {bar} |")
    if stale:
        lines += ["", f"Cells evaluated under an earlier default rule (not in the table; the runner re-evaluates them, "
                      f"current rule {current_rule()}):", "",
                  "| cell | method | rule | ACC/ASR before | ACC/ASR after |", "|---|---|---|---|---|"]
        for r in stale:
            lines.append(f"| {r['cell']} | {r['method']} | {rule_of(r)} | {_pct(r['before']['acc'])}/"
                         f"{_pct(r['before'].get('asr'))} | {_pct(r['after']['acc'])}/{_pct(r['after'].get('asr'))} |")
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, os.path.join(out, "quality.png"))
    return rows


def plot(results: List[Dict], path: str) -> None:
    """ASR after against ACC drop for every (cell, method, seed): one panel per data set, a marker per
    attack, ANP filled and RNP open; the acceptance box (ASR <= 5%, drop <= 2 points) shaded."""
    from anp_fast.report import _pyplot, _save_png

    plt = _pyplot()
    datas = sorted({r["data"] for r in results}) or ["-"]
    fig, axes = plt.subplots(1, len(datas), figsize=(6.2 * len(datas), 4.6), squeeze=False)
    markers = {"badnets": "s", "patch": "P", "blend": "o", "sig": "^", "wanet": "D", "benign": "*"}
    colors = {"badnets": "#4477aa", "patch": "#228833", "blend": "#ccbb44", "sig": "#ee6677", "wanet": "#aa3377",
              "benign": "#666666"}
    for ax, data in zip(axes[0], datas):
        ax.axhspan(-1, 5, xmin=0, xmax=1, color="#dddddd", zorder=0)
        ax.axvline(2, color="k", lw=0.8, ls="--")
        for r in (r for r in results if r["data"] == data):
            drop = 100 * (r["before"]["acc"] - r["after"]["acc"])
            asr = 100 * r["after"].get("asr", float("nan"))
            filled = r["method"] == "anp"
            ax.scatter([drop], [asr], marker=markers.get(r["attack"], "x"), s=46, zorder=3,
                       facecolors=colors.get(r["attack"], "k") if filled else "none",
                       edgecolors=colors.get(r["attack"], "k"))
        ax.set_title(f"{data}: ASR after vs ACC lost (filled: ANP, open: RNP)", fontsize=9)
        ax.set_xlabel("test ACC lost by pruning (points)")
        ax.set_ylabel("ASR after (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, ls="", color=colors[a], label=a) for a, m in markers.items()]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper right")
    _save_png(fig, path)


# --------------------------------------------------------------------------------------------- CLI
def _csv(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anp_fast_bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="working folder (checkpoints, masks, per-cell results)")
    p.add_argument("--data", default=",".join(DATASETS))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--rates", default="0.1,0.05", help="poisoning rates (benign cells ignore them)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="anp,rnp")
    p.add_argument("--jobs", type=int, default=1, help="cells at a time, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=20, help="training epochs of each attacked model")
    p.add_argument("--precision", default="bf16", help="ANP's precision (RNP runs in --rnp-precision)")
    p.add_argument("--rnp-precision", default="fp32")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width of the attacked models")
    p.add_argument("--clean-count", type=int, default=500, help="clean images per cell (a fifth held out)")
    p.add_argument("--snapshot-every", type=int, default=100, help="iterations between kept masks")
    p.add_argument("--dense-step", type=int, default=2, help="pruning counts between rows of the analysis sweep")
    p.add_argument("--rules", default=",".join(REFERENCE_RULES),
                   help="rules the evaluation measures: walk (the default rule, always) and any of masks (the walk "
                        "on the masks alone), evidence (the suspects alone)")
    p.add_argument("--no-eval", action="store_true", help="train and learn masks only")
    p.add_argument("--force-eval", action="store_true", help="re-run the evaluation stage (a new rule)")
    p.add_argument("--report", default=None, help="write the table, CSV and plot of the finished cells here")
    p.add_argument("--status", action="store_true", help="say where each selected cell stands and run nothing")
    args = p.parse_args(argv)
    s = Settings(work=os.path.abspath(args.work), iters=args.iters, epochs=args.epochs, precision=args.precision,
                 rnp_precision=args.rnp_precision, threads=args.threads, width=args.width,
                 clean_count=args.clean_count, snapshot_every=args.snapshot_every, dense_step=args.dense_step,
                 rules=("walk",) + tuple(r for r in _csv(args.rules) if r != "walk"))
    if set(s.rules) - set(REFERENCE_RULES):
        p.error(f"--rules: unknown {', '.join(sorted(set(s.rules) - set(REFERENCE_RULES)))}; valid: "
                f"{', '.join(REFERENCE_RULES)}")
    datas, attacks = _csv(args.data), _csv(args.attacks)
    unknown = [d for d in datas if d not in DATASETS] + [a for a in attacks if a not in ATTACKS]
    if unknown:
        p.error(f"unknown data set or attack: {', '.join(unknown)}")
    cells = []
    for data in datas:
        for attack in attacks:
            for rate in ([0.0] if attack == "benign" else _csv(args.rates, float)):
                cells.extend(Cell(data, attack, rate, seed) for seed in _csv(args.seeds, int))
    methods = _csv(args.methods)
    if args.status:  # before anything is written
        found = [cell_status(c, methods, s) for c in cells]
        print("\n".join(line for line, _ in found))
        print(f"{sum(done for _, done in found)} of {len(cells)} cells evaluated under the current rule", flush=True)
        return 0
    if "digits-cifar" in datas:
        folder = os.path.join(s.work, "data", "digits-cifar")
        if not os.path.exists(os.path.join(folder, "cifar-10-batches-py", "test_batch")):
            from anp_fast.datasets import digits_as_cifar

            os.makedirs(folder, exist_ok=True)
            digits_as_cifar(folder)
    if cells:
        print(f"{len(cells)} cells x {len(methods)} methods, {args.jobs} at a time, {args.threads} thread(s) each",
              flush=True)
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_cell, c, methods, s, not args.no_eval, args.force_eval): c for c in cells}
            for fut in as_completed(futures):
                cell = futures[fut]
                try:
                    done = fut.result()
                except Exception as exc:  # one failed cell is reported, the others go on
                    print(f"FAILED {cell.key}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                for line in done["log"]:  # the runner's own notes (the attack's training log is not repeated)
                    if line.startswith(cell.key):
                        print(line, flush=True)
                parts = [f"{m}: ACC {_pct(r['before']['acc'])}->{_pct(r['after']['acc'])} ASR "
                         f"{_pct(r['before'].get('asr'))}->{_pct(r['after'].get('asr'))} ({r['pruned']} pruned)"
                         for m, r in done["results"].items()]
                print(f"{cell.key} ({done['seconds']:.0f}s): " + "; ".join(parts), flush=True)
    if args.report:
        results, rule = collect(s.work), current_rule()
        rows = write_report([r for r in results if rule_of(r) == rule], args.report,
                            stale=[r for r in results if rule_of(r) != rule])
        print(f"wrote quality.md, quality.csv, cells.json, quality.png ({len(rows)} rows) to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
