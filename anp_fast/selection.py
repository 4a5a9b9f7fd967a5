"""How much to prune, from CLEAN data only (a defender has no triggered data), and when to stop.

``choose`` is the oracle-free rule ``--prune auto`` applies: ``walk`` (default) or a pruning amount in mask
order (``auto_number``, modes ``most``/``first``). ``simulate_stop`` replays the stop rule on mask snapshots of
a finished run.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .config import RUN
from .pruning import sweep

THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


def _total(masks: Mapping[str, Tensor]) -> int:
    return sum(int(m.numel()) for m in masks.values())


def auto_number(model, masks, evaluator, budget_points: float, grid: int = 32, mode: str = "most") -> Dict:
    """How many neurons (lowest masks first) to prune, from clean data only
    (``evaluator(model, holdout_only=True)``: ``select_acc``, the held-out split and the method's clean set
    together, where the evaluator has both, else ``holdout_acc``), within ``budget_points`` of that accuracy.

    ``mode="most"``: the most neurons whose clean accuracy is within the budget (a grid over 0..all, then
    bisection between the last good and the next grid point); ``mode="first"``: stop before the FIRST count
    whose accuracy falls below the budget (the grid is walked up to it, then bisected), so a later recovery
    of the noisy curve cannot pull the choice past an accuracy drop."""
    if mode not in ("most", "first"):
        from .errors import ConfigError

        raise ConfigError(f"auto mode {mode!r}: 'most' or 'first'")
    total = _total(masks)
    holdout = lambda m: evaluator(m, holdout_only=True)  # noqa: E731
    numbers = sorted({round(total * i / grid) for i in range(grid + 1)})
    (base_row,) = sweep(model, masks, holdout, numbers=[0])
    key = "select_acc" if "select_acc" in base_row else "holdout_acc"
    base = base_row[key]
    ok = lambda r: 100 * (base - r[key]) <= budget_points + 1e-9  # noqa: E731
    if mode == "most":
        rows = [base_row] + sweep(model, masks, holdout, numbers=numbers[1:])
        lo = max(r["number"] for r in rows if ok(r))
        above = [n for n in numbers if n > lo]
    else:
        lo, above = 0, []
        for n in numbers[1:]:
            (row,) = sweep(model, masks, holdout, numbers=[n])
            if not ok(row):
                above = [n]
                break
            lo = n
    hi = min(above) if above else lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        (row,) = sweep(model, masks, holdout, numbers=[mid])
        if ok(row):
            lo = mid
        else:
            hi = mid
    return {"number": lo}


WALK_TAU = 0.002      # nats of mean clean cross-entropy one neuron may add and still be pruned
WALK_FLOOR = 0.0      # masks below this are pruned without the loss test (0: every neuron is tested)
WALK_PATIENCE = 20    # the walk ends after this many neurons in a row were kept
WALK_MAX_FRACTION = 0.6  # ... or after the lowest 60% of the neurons (the demo's walks ended at 43-59%)
SUSPECT_TAU = None     # loss rise a pre-activation suspect may cause (None: only the accuracy budget)
WALK_DECIDE_FRACTION = 1.0  # the share of the budget the walk's decisions may spend on the deciding set


def _tensors(sets):
    from torch.utils.data import ConcatDataset, DataLoader

    xs, ys = zip(*DataLoader(ConcatDataset(sets), batch_size=512))
    return torch.cat(xs), torch.cat(ys).long()


def _clean_tensors(evaluator, split: bool = False):
    """The defender's clean images, materialised once: ``(decide, verify)`` where ``verify`` is the held-out
    split and ``decide`` the method's clean set when ``split`` and both exist; otherwise all of them decide and
    ``verify`` is None."""
    holdout, clean = getattr(evaluator, "holdout", None), getattr(evaluator, "clean", None)
    sets = [ds for ds in (holdout, clean) if ds is not None and len(ds) > 0]
    if not sets:
        from .errors import ConfigError

        raise ConfigError("--prune auto needs clean data to choose on (a held-out split or the clean set)")
    if split and len(sets) == 2:
        return _tensors([clean]), _tensors([holdout])
    return _tensors(sets), None


def walk(model: nn.Module, masks: Mapping[str, Tensor], evaluator, budget_points: float = RUN.budget,
         tau: float = WALK_TAU, floor: Optional[float] = None, patience: int = WALK_PATIENCE,
         max_fraction: float = WALK_MAX_FRACTION, evidence: bool = True, suspect_tau: Optional[float] = SUSPECT_TAU,
         verify: bool = True, decide_fraction: Optional[float] = None, progress: bool = False,
         incremental: bool = True, gain_tau: Optional[float] = None) -> Dict:
    """Which neurons to prune, from clean data only: walk the neurons from the lowest mask up and prune each
    one unless pruning it (on top of those already pruned) raises the mean clean cross-entropy by more than
    ``tau`` nats (tested for masks >= ``floor``: all of them by default) or takes the clean accuracy more than
    ``budget_points`` below the unpruned model's; such a neuron is kept and the walk goes on; it ends after
    ``patience`` consecutive kept neurons, or after the lowest ``max_fraction`` of all neurons (0: no mask is
    walked). Clean data: the method's clean set (``evaluator.clean``) decides and the held-out split checks
    (``verify``).

    ``floor``: masks below it skip the loss test (only the budget stops them). The default 0 tests every
    neuron: the accuracy budget is then spent only on neurons whose pruning costs no clean loss, the backdoor
    neurons' signature, not on low-mask neurons that visibly carry clean accuracy. With 0.2 (the published
    threshold, the default until 2026-12-07) such neurons used up the budget and the held-out check backed off
    to a few neurons: on mnist5k BadNets seed 0 both methods kept 17 neurons, ASR 9.8%; with 0 ANP pruned 258,
    ASR 3.1%, RNP 172, ASR 2.8%. Over 16 matrix cell-methods floor 0 passes three that 0.2 misses and misses
    one that 0.2 passes (digits-cifar WaNet seed 1, ANP: 30.7% against 4.6%); ten demo draws pass either way:
    ``benchmarks/results/walk_floor_20261207``.

    ``evidence``: before the masks, walk the pre-activation suspects (:func:`anp_fast.evidence.suspects`:
    BatchNorm channels whose clean statistics lie far from the checkpoint's running statistics), strongest
    first, each pruned unless it raises the clean loss by more than ``suspect_tau`` (None: no loss test) or
    breaks the budget.

    Why: pruning in mask order alone is a single cut; on the demo's models, the neurons that carry the
    backdoor and the low-mask neurons that carry clean accuracy interleave, and for 2 of 4 seeds no cut gave
    ASR <= 5% within 2 points of ACC (not even the oracle's); the walk keeps the latter. Some draws keep part
    of the backdoor in neurons ANP leaves at mask 1 (early trigger detectors); the pre-activation evidence
    names them.

    ``verify`` (default): the walk decides on the method's clean set alone and the held-out split, which no
    decision has seen, checks the result: if the pruned set costs more than ``budget_points`` of held-out
    accuracy, the walk backs off to the longest prefix of its prunings (in the order they were accepted:
    suspects first) that stays within the budget. Why: hundreds of accept/reject decisions on a few hundred
    images overfit them (a winner's curse): on a BadNets cell the RNP walk judged on the pooled clean data
    cost 2.0 points there and 5.0 on the test set; verified, it kept 35 neurons, 1.1 points, ASR 0. Without
    both splits (or ``verify=False``) all clean data decides and nothing verifies.

    ``decide_fraction`` (with a held-out check only): the walk's decisions may spend that share of the budget
    on the deciding set; the check keeps the whole budget. Default 1. Measured with floor 0.2: on 12 matrix
    cell-methods 0.5 turned mnist5k BadNets seed 0 from ASR 9.8% into 0.4% (ANP) / 4.7% (RNP) and mnist5k
    WaNet RNP from 4.4% into 72.9%; on ten demo draws both pass 10/10, 0.5 with the lower median drop (0.42
    against 0.84 points) and the worse worst case (1.95 against 1.39):
    ``benchmarks/results/walk_budget_20261207``.

    ``gain_tau`` (research knob, default None: off): a neuron the mask walk would prune (whatever its mask) is
    also kept when pruning it LOWERS the mean clean cross-entropy by more than ``gain_tau`` nats; such neurons
    do not count toward ``patience``; the suspects are not affected. Why it exists: on a SIG cell the ASR climbs
    back along the walk while its prunings raise the clean accuracy 10 points. Measured and found worse, so not
    a default: on 8 matrix cell-methods (0.002 nats, with the gain-kept neurons then counting toward patience)
    it met the bar on no SIG cell, made digits-cifar WaNet seed 1 worse and broke mnist5k BadNets seed 0
    (``benchmarks/results/walk_trace_20261207``).

    ``incremental`` (default): each of the walk's forwards over the deciding set starts at the last cut point
    before the changed layer (:class:`anp_fast.suffix.SuffixRunner`; the same outputs bit for bit; a model
    ``torch.fx`` cannot trace runs whole).

    Cost: one forward over the clean data per neuron walked (on the demo about 650 of 1,200 neurons, 30-65 s
    on one core with whole forwards; suffix forwards made matrix walks 2.3-2.5x faster) and about 20 over the
    held-out split; for models with many thousand neurons ``auto:most`` is the cheap choice. Returns the rule
    ``{"neurons": {layer: [index, ...]}}`` for :func:`anp_fast.pruning.prune` and a report ``{"suspects":
    found, "suspects_pruned": pruned, "walked": accepted by the walk, "verified": whether a held-out check ran,
    "kept": pruned after it}``."""
    from .evidence import suspects as find_suspects
    from .pruning import _check_layers, _flat, scale_rows
    from .suffix import SuffixRunner
    import torch.nn.functional as F

    floor = WALK_FLOOR if floor is None else floor  # None: the module's setting at call time
    decide_fraction = WALK_DECIDE_FRACTION if decide_fraction is None else decide_fraction

    if not (tau >= 0 and isinstance(patience, int) and patience >= 1 and 0 <= max_fraction <= 1
            and (suspect_tau is None or suspect_tau >= 0) and 0 < decide_fraction <= 1
            and (gain_tau is None or gain_tau >= 0)):
        from .errors import ConfigError

        raise ConfigError(f"walk: tau={tau}, suspect_tau={suspect_tau} and gain_tau={gain_tau} must be >= 0 (the "
                          f"last two or None), patience={patience} an integer >= 1, max_fraction={max_fraction} "
                          f"in [0, 1] and decide_fraction={decide_fraction} in (0, 1]")
    (x, y), held = _clean_tensors(evaluator, split=verify)
    device = getattr(evaluator, "device", torch.device("cpu"))
    found = _check_layers(model, masks)
    flat, spans = _flat(masks)
    owner = [(name, i) for name, _, size in spans for i in range(size)]
    offset = {name: start for name, start, _ in spans}
    work = __import__("copy").deepcopy(model).eval()
    modules = dict(work.named_modules())
    scales = {name: scale_rows(modules[name]) for name in found}  # row i: neuron i's scale

    def scores(out, y=y):
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())

    def clean_eval(x=x, y=y):
        with torch.no_grad():
            out = torch.cat([work(x[i:i + 256].to(device)).float().cpu() for i in range(0, len(x), 256)])
        return scores(out, y)

    # the deciding set's forwards start at the changed layer (bit for bit the whole forward's results)
    runner = SuffixRunner(work, x, chunk=256, device=device) if incremental else None

    def decide_eval(name: str):
        return clean_eval() if runner is None else scores(runner([name]))

    base_loss, base_acc = clean_eval()
    prev = base_loss
    decide_points = budget_points * decide_fraction if held is not None else budget_points
    chosen = set()
    accepted: List[tuple] = []  # (neuron, its scale before pruning), in the order the walk pruned them

    def attempt(j: int, limit: Optional[float], gain: Optional[float] = None) -> Optional[bool]:
        """Prune neuron j (True) unless it raises the loss by more than ``limit`` or breaks the budget (False),
        or lowers the loss by more than ``gain`` (None)."""
        nonlocal prev
        name, i = owner[j]
        w = scales[name]
        with torch.no_grad():
            saved = w[i].clone()
            w[i] = 0
        loss, acc = decide_eval(name)
        costly = (limit is not None and loss - prev > limit) or 100 * (base_acc - acc) > decide_points + 1e-9
        if costly or (gain is not None and prev - loss > gain):
            with torch.no_grad():
                w[i] = saved
            return False if costly else None
        if runner is not None:
            runner.commit([name])
        chosen.add(j)
        accepted.append((j, saved))
        prev = loss
        return True

    found_suspects = find_suspects(work, masks, x, device=device) if evidence else []
    walked = max(1, int(max_fraction * len(owner))) if max_fraction > 0 else 0  # 0: the suspects alone
    order = torch.sort(flat, stable=True).indices.tolist()[:walked]
    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(len(found_suspects) + len(order), "choosing neurons (clean walk)", unit="neuron")
    suspects_pruned = sum(bool(attempt(offset[name] + i, suspect_tau)) for name, i, _ in found_suspects)
    if bar is not None:
        bar.update(len(found_suspects))
    kept_in_row = 0
    for j in order:
        if bar is not None:
            bar.update(1)
        if j in chosen:
            continue
        pruned = attempt(j, tau if float(flat[j]) >= floor else None, gain_tau)
        if pruned:
            kept_in_row = 0
        elif pruned is False:  # kept for its cost (None: kept by the gain test, not counted)
            kept_in_row += 1
            if kept_in_row >= patience:
                break
    if bar is not None:
        bar.close()
    walked_n = len(accepted)
    if held is not None and accepted:
        accepted = _back_off(accepted, owner, scales, lambda: clean_eval(*held)[1], budget_points)
    neurons: Dict[str, List[int]] = {}
    for j, _ in sorted(accepted, key=lambda a: a[0]):
        name, i = owner[j]
        neurons.setdefault(name, []).append(i)
    return {"neurons": neurons}, {"suspects": len(found_suspects), "suspects_pruned": suspects_pruned,
                                  "walked": walked_n, "verified": held is not None, "kept": len(accepted)}


def _back_off(accepted: List[tuple], owner, scales, held_acc: Callable[[], float], budget_points: float) -> List:
    """The longest prefix of ``accepted`` whose held-out accuracy is within ``budget_points`` of the unpruned
    model's (all of it when it is): a grid of 16 prefixes, then bisection above the longest one that passes.
    ``scales`` hold the walk's pruned state on entry and the chosen prefix's on return."""
    def set_prefix(k: int) -> None:
        with torch.no_grad():
            for n, (j, saved) in enumerate(accepted):
                name, i = owner[j]
                scales[name][i] = 0 if n < k else saved

    def ok(k: int) -> bool:
        set_prefix(k)
        return 100 * (base - held_acc()) <= budget_points + 1e-9

    total = len(accepted)
    set_prefix(0)
    base = held_acc()
    if ok(total):
        return accepted
    grid = sorted({round(total * g / 16) for g in range(16)})
    lo = max(k for k in grid if k == 0 or ok(k))
    hi = min([k for k in grid if k > lo], default=total)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    set_prefix(lo)
    return accepted[:lo]


AUTO_MODES = ("walk", "masks", "evidence", "most", "first")
_WALKS = {"walk": ("clean-walk+evidence", dict(evidence=True)), "masks": ("clean-walk", dict(evidence=False)),
          "evidence": ("evidence-walk", dict(evidence=True, max_fraction=0.0))}


def choose(model: nn.Module, masks: Mapping[str, Tensor], evaluator, budget_points: float = RUN.budget,
           mode: str = "walk", progress: bool = False) -> Dict:
    """The oracle-free pruning choice: ``{"rule": {...}, "name": ...}`` (and ``"evidence"``, the walk's
    report); ``mode`` ``walk`` (default: the clean walk with pre-activation evidence, see :func:`walk`),
    ``masks`` (the walk on the masks alone), ``evidence`` (the pre-activation suspects alone: the masks are not
    read; a reference for what the masks add) or ``most``/``first`` (a number in mask order:
    :func:`auto_number`)."""
    if mode in _WALKS:
        name, options = _WALKS[mode]
        rule, report = walk(model, masks, evaluator, budget_points, progress=progress, **options)
        return {"rule": rule, "name": name, "evidence": report}
    return {"rule": auto_number(model, masks, evaluator, budget_points, mode=mode), "name": f"holdout-{mode}"}


def pruned_set(masks: Mapping[str, Tensor], rule: Dict) -> frozenset:
    """The neurons ``rule`` prunes, as (layer, index) pairs."""
    from .pruning import select_pruned

    return frozenset((name, int(i)) for name, idx in select_pruned(masks, **rule).items() for i in idx.tolist())


def overlap_of(a: frozenset, b: frozenset) -> float:
    """Jaccard overlap of two pruned sets: |a & b| / |a | b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if (a or b) else 1.0


class StopRule:
    """An early stop for the mask loop (``optimize_masks(monitor=...)``): at every check the pruning rule is
    applied to the current masks, and the run stops once the set it would prune has been the same, and not
    empty, at ``patience`` + 1 consecutive checks. ``choose_rule(masks) -> {"number": K}`` (or any pruning rule).

    ``overlap`` < 1 relaxes "the same" to: each check's set overlaps the previous one's by at least ``overlap``
    (Jaccard). Why: on the quality matrix's 31 ANP cells the masks never settle within 2000 iterations: the set
    at or below 0.2 keeps changing by 10-30% from one check (100 iterations) to the next up to the last one, and
    the exact rule stopped 1 of the 31 runs (``benchmarks/results/stop_churn_20261207``)."""

    def __init__(self, choose_rule: Callable[[Dict[str, Tensor]], Dict], patience: int = 3, overlap: float = 1.0):
        from .errors import ConfigError

        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"stop rule patience={patience!r}: must be an integer >= 1")
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 < overlap <= 1:
            raise ConfigError(f"stop rule overlap={overlap!r}: must be a number in (0, 1] (1: the same set)")
        self.choose_rule, self.patience, self.overlap = choose_rule, patience, float(overlap)
        self.sets: List[frozenset] = []
        self.overlaps: List[float] = []  # each check's overlap with the previous one (from the second check)
        self.checks: List[Dict] = []

    def __call__(self, iteration: int, engine) -> bool:
        return self.observe(iteration, engine.masks())

    def observe(self, iteration: int, masks: Dict[str, Tensor]) -> bool:
        rule = self.choose_rule(masks)
        current = pruned_set(masks, rule)
        check = {"iteration": iteration, "rule": rule, "pruned": len(current)}
        if self.sets:
            self.overlaps.append(overlap_of(self.sets[-1], current))
            check["overlap"] = round(self.overlaps[-1], 4)
        self.sets.append(current)
        self.checks.append(check)
        # an empty set is not a converged one: early in a run the rule often finds nothing to prune yet (on a
        # BadNets matrix cell it chose 0 neurons at iterations 1000-1300 and would have stopped there, ASR 100%).
        # Two non-empty sets overlap by 1 exactly when they are the same set: overlap 1 is the exact rule.
        last = self.sets[-(self.patience + 1):]
        return (len(last) == self.patience + 1 and all(last)
                and all(o >= self.overlap for o in self.overlaps[-self.patience:]))


def stop_checked_rule(model: nn.Module, evaluator, budget_points: float, threshold: Optional[float] = None,
                      fixed: Optional[Dict] = None) -> Callable[[Dict[str, Tensor]], Dict]:
    """The rule whose pruned set :class:`StopRule` compares between checks, as ``purify --stop-patience`` builds
    it: the masks at or below ``threshold`` (``--stop-threshold``), else the ``fixed`` rule of ``--prune
    threshold|number|fraction``, else the mask-order rule ``auto:most`` (the cheap stand-in for the clean walk,
    which costs a clean pass per neuron)."""
    if threshold is not None:
        fixed = {"threshold": float(threshold)}
    if fixed is not None:
        return lambda masks: fixed
    return lambda masks: choose(model, masks, evaluator, budget_points, mode="most")["rule"]


def simulate_stop(model, masks, snapshots: Dict, evaluator, budget_points: float = RUN.budget,
                  patience: int = 3, overlap: float = 1.0, threshold: Optional[float] = None,
                  outcome_mode: str = "most", final_rule: Optional[Dict] = None) -> Optional[Dict]:
    """Replay :class:`StopRule` (checking the mask-order rule ``most``, as ``purify --stop-patience`` does, or
    the masks at or below ``threshold``, as ``--stop-threshold``; ``overlap`` as ``--stop-overlap``) on a finished
    run's mask ``snapshots`` ({"iterations", "masks" (S, N) flat, "layers"}): where it would have stopped, and
    the model that ``auto:<outcome_mode>`` prunes from the masks there (``evaluator`` row; ``walk``: what
    ``purify`` with the default rule would have given). ``same_set``: whether it prunes the set that rule
    prunes from the final ``masks`` (``final_rule``, when known, saves choosing it again)."""
    import torch

    from .pruning import prune

    its = list(snapshots["iterations"])
    if not its:
        return None
    sizes = [int(masks[name].numel()) for name in snapshots["layers"]]

    def as_masks(flat):
        return dict(zip(snapshots["layers"], torch.split(flat, sizes)))

    rule = StopRule(stop_checked_rule(model, evaluator, budget_points, threshold), patience, overlap=overlap)
    for it, flat in zip(its, snapshots["masks"]):
        if rule.observe(it, as_masks(flat)):
            stopped = as_masks(flat)
            if outcome_mode == "most" and threshold is None:
                chosen = rule.checks[-1]["rule"]
            else:
                chosen = choose(model, stopped, evaluator, budget_points, mode=outcome_mode)["rule"]
            if final_rule is None:
                final_rule = choose(model, masks, evaluator, budget_points, mode=outcome_mode)["rule"]
            return {"stopped_at": it, "iters": its[-1], "saved": its[-1] - it, "rule": chosen,
                    "outcome_mode": outcome_mode,
                    "same_set": pruned_set(stopped, chosen) == pruned_set(masks, final_rule),
                    "after": evaluator(prune(model, stopped, **chosen)), "checks": rule.checks}
    return {"stopped_at": None, "iters": its[-1], "saved": 0, "checks": rule.checks}
