"""How much to prune, from held-out CLEAN data only (a defender has no triggered data), and when to stop.

``choose`` is the oracle-free rule ``--prune auto`` applies. ``simulate_stop`` replays the stop rule on mask
snapshots of a finished run.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import torch.nn as nn
from torch import Tensor

from .pruning import sweep

THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


def _total(masks: Mapping[str, Tensor]) -> int:
    return sum(int(m.numel()) for m in masks.values())


def auto_number(model, masks, evaluator, budget_points: float, grid: int = 32) -> Dict:
    """How many neurons (lowest masks first) to prune: the most whose held-out clean accuracy stays within the
    budget -- a grid over 0..all, then bisection between the last good and the first bad grid point. Only the
    held-out CLEAN split is looked at (``evaluator(model, holdout_only=True)``)."""
    total = _total(masks)
    holdout = lambda m: evaluator(m, holdout_only=True)  # noqa: E731
    numbers = sorted({round(total * i / grid) for i in range(grid + 1)})
    rows = sweep(model, masks, holdout, numbers=numbers)
    base = rows[0]["holdout_acc"]
    ok = lambda r: 100 * (base - r["holdout_acc"]) <= budget_points + 1e-9  # noqa: E731
    best = max((r for r in rows if ok(r)), key=lambda r: r["number"])
    above = [r["number"] for r in rows if r["number"] > best["number"]]
    lo, hi = best["number"], (min(above) if above else best["number"])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        (row,) = sweep(model, masks, holdout, numbers=[mid])
        if ok(row):
            lo = mid
        else:
            hi = mid
    return {"number": lo}


def choose(model: nn.Module, masks: Mapping[str, Tensor], evaluator, budget_points: float = 2.0) -> Dict:
    """The oracle-free pruning amount: ``{"rule": {"number": K}, ...}`` (what it looked at alongside)."""
    return {"rule": auto_number(model, masks, evaluator, budget_points), "name": "holdout-budget"}


def pruned_set(masks: Mapping[str, Tensor], rule: Dict) -> frozenset:
    """The neurons ``rule`` prunes, as (layer, index) pairs."""
    from .pruning import select_pruned

    return frozenset((name, int(i)) for name, idx in select_pruned(masks, **rule).items() for i in idx.tolist())


class StopRule:
    """An early stop for the mask loop (``optimize_masks(monitor=...)``): at every check the pruning rule is
    applied to the current masks, and the run stops once the set it would prune has been the same at
    ``patience`` + 1 consecutive checks. ``choose_rule(masks) -> {"number": K}`` (or any pruning rule)."""

    def __init__(self, choose_rule: Callable[[Dict[str, Tensor]], Dict], patience: int = 3):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            from .errors import ConfigError

            raise ConfigError(f"stop rule patience={patience!r}: must be an integer >= 1")
        self.choose_rule, self.patience = choose_rule, patience
        self.sets: List[frozenset] = []
        self.checks: List[Dict] = []

    def __call__(self, iteration: int, engine) -> bool:
        return self.observe(iteration, engine.masks())

    def observe(self, iteration: int, masks: Dict[str, Tensor]) -> bool:
        rule = self.choose_rule(masks)
        current = pruned_set(masks, rule)
        self.sets.append(current)
        self.checks.append({"iteration": iteration, "rule": rule, "pruned": len(current)})
        last = self.sets[-(self.patience + 1):]
        return len(last) == self.patience + 1 and all(x == last[0] for x in last)


def simulate_stop(model, masks, snapshots: Dict, evaluator, budget_points: float = 2.0,
                  patience: int = 3) -> Optional[Dict]:
    """Replay :class:`StopRule` on a finished run's mask ``snapshots`` ({"iterations", "masks" (S, N) flat,
    "layers"}): where it would have stopped, and the pruned model it would have given (``evaluator`` row)."""
    import torch

    from .pruning import prune

    its = list(snapshots["iterations"])
    if not its:
        return None
    sizes = [int(masks[name].numel()) for name in snapshots["layers"]]

    def as_masks(flat):
        return dict(zip(snapshots["layers"], torch.split(flat, sizes)))

    rule = StopRule(lambda m: choose(model, m, evaluator, budget_points)["rule"], patience)
    for it, flat in zip(its, snapshots["masks"]):
        if rule.observe(it, as_masks(flat)):
            stopped = as_masks(flat)
            chosen = rule.checks[-1]["rule"]
            final_rule = choose(model, masks, evaluator, budget_points)["rule"]
            return {"stopped_at": it, "iters": its[-1], "saved": its[-1] - it, "rule": chosen,
                    "same_set": pruned_set(stopped, chosen) == pruned_set(masks, final_rule),
                    "after": evaluator(prune(model, stopped, **chosen)), "checks": rule.checks}
    return {"stopped_at": None, "iters": its[-1], "saved": 0, "checks": rule.checks}
