"""Pruning with the published semantics: a pruned neuron's scale is set to 0 in a copy of the ORIGINAL
model (its shift and running statistics stay)."""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .errors import ConfigError, MaskFileError
from .layers import gate_kind, norm_kind


def _check_layers(model: nn.Module, masks: Mapping[str, Tensor]) -> Dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [name for name in masks if name not in modules]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MaskFileError(f"the masks name {len(missing)} layer(s) that {type(model).__name__} does not have: "
                            f"{shown}")
    found = {}
    for name, mask in masks.items():
        module = modules[name]
        if norm_kind(module) is not None:
            expected = module.weight.numel()
        elif gate_kind(module) is not None:
            expected = module.weight.shape[0]
        else:
            raise MaskFileError(f"layer {name} ({type(module).__name__}) is neither a norm with an affine scale "
                                "nor a conv/linear layer: it cannot be pruned")
        if torch.as_tensor(mask).numel() != expected:
            raise MaskFileError(f"layer {name} has {expected} neurons but its mask has "
                                f"{torch.as_tensor(mask).numel()} values")
        found[name] = module
    return found


def _flat(masks: Mapping[str, Tensor]) -> Tuple[Tensor, List[Tuple[str, int, int]]]:
    spans, offset, values = [], 0, []
    for name, mask in masks.items():
        m = torch.as_tensor(mask).detach().float().flatten().cpu()
        spans.append((name, offset, m.numel()))
        values.append(m)
        offset += m.numel()
    return torch.cat(values) if values else torch.zeros(0), spans


def select_pruned(masks: Mapping[str, Tensor], threshold: Optional[float] = None,
                  number: Optional[int] = None, fraction: Optional[float] = None,
                  neurons: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Tensor]:
    """Which neurons to prune: ``{layer: indices}``. Exactly one rule: every neuron with mask <= threshold,
    the ``number`` lowest, the lowest ``fraction`` of all neurons (floor; ties go in layer order), or an
    explicit set ``neurons`` ``{layer: [index, ...]}`` (what ``selection.walk`` chooses)."""
    given = [k for k, v in (("threshold", threshold), ("number", number), ("fraction", fraction),
                            ("neurons", neurons)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of threshold, number, fraction, neurons "
                          f"(got {', '.join(given) or 'none'})")
    flat, spans = _flat(masks)
    n = flat.numel()
    if neurons is not None:
        unknown = sorted(set(neurons) - set(masks))
        if unknown:
            raise ConfigError(f"neurons: {', '.join(unknown[:3])} not among the masks' layers")
        out = {}
        for name, _, size in spans:
            idx = sorted({int(i) for i in neurons.get(name, ())})
            if idx and not (0 <= idx[0] and idx[-1] < size):
                raise ConfigError(f"neurons: {name} has {size} neurons, index {idx[-1] if idx[-1] >= size else idx[0]}")
            out[name] = torch.tensor(idx, dtype=torch.long)
        return out
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ConfigError(f"threshold={threshold!r}: must be a finite number")
        chosen = flat <= threshold
    else:
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
                raise ConfigError(f"fraction={fraction!r}: must be in [0, 1]")
            number = int(math.floor(fraction * n))
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= n:
            raise ConfigError(f"number={number!r}: must be an integer in [0, {n}]")
        order = torch.sort(flat, stable=True).indices[:number]
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[order] = True
    return {name: chosen[o:o + size].nonzero().flatten() for name, o, size in spans}


def scale_rows(module: nn.Module) -> Tensor:
    """``module``'s per-neuron scale, indexed by neuron on its first dimension (a view: writing to entry i
    prunes neuron i): a norm layer's weight, flattened; a gated conv/linear layer's weight itself, whose
    output-channel rows are the scale (any memory format)."""
    w = module.weight
    return w.view(-1) if norm_kind(module) is not None else w


def _zero_scale(module: nn.Module, idx: Tensor) -> None:
    rows = scale_rows(module)
    with torch.no_grad():
        rows[idx.to(rows.device)] = 0


def prune(model: nn.Module, masks: Mapping[str, Tensor], threshold: Optional[float] = None,
          number: Optional[int] = None, fraction: Optional[float] = None,
          neurons: Optional[Mapping[str, Sequence[int]]] = None) -> nn.Module:
    """A pruned copy of ``model``: the scale of every selected neuron set to 0. ``model`` is untouched.
    With no rule given, threshold 0.2 (published default)."""
    if threshold is None and number is None and fraction is None and neurons is None:
        threshold = 0.2
    _check_layers(model, masks)
    selected = select_pruned(masks, threshold, number, fraction, neurons)
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for name, idx in selected.items():
        if idx.numel():
            _zero_scale(modules[name], idx)
    return pruned


def pruned_count(masks: Mapping[str, Tensor], **rule) -> int:
    return sum(int(i.numel()) for i in select_pruned(masks, **rule).values())


def sweep(model: nn.Module, masks: Mapping[str, Tensor], evaluate: Callable[[nn.Module], Dict[str, float]],
          thresholds: Optional[Iterable[float]] = None, numbers: Optional[Iterable[int]] = None,
          fractions: Optional[Iterable[float]] = None, progress: bool = False) -> List[Dict[str, float]]:
    """Evaluate the model pruned at each value of ONE rule (default: thresholds 0, 0.05, ..., 0.9, as the
    published script). Works on a single copy whose scales are restored between values. ``progress``: a bar
    over the values."""
    rules = [(k, list(v)) for k, v in (("threshold", thresholds), ("number", numbers), ("fraction", fractions))
             if v is not None]
    if len(rules) > 1:
        raise ConfigError("sweep one rule at a time: thresholds, numbers or fractions")
    rule, values = rules[0] if rules else ("threshold", [round(0.05 * i, 2) for i in range(19)])
    found = _check_layers(model, masks)
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    saved = {name: modules[name].weight.detach().clone() for name in found}
    rows = []
    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(len(values), f"pruning sweep ({rule})", unit="cut")
    for value in values:
        selected = select_pruned(masks, **{rule: value})
        for name, idx in selected.items():
            with torch.no_grad():
                modules[name].weight.copy_(saved[name])
            if idx.numel():
                _zero_scale(modules[name], idx)
        row = {rule: value, "pruned": sum(int(i.numel()) for i in selected.values())}
        row.update(evaluate(work))
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows
