"""Clean-data evidence of backdoor neurons beside the masks: pre-activation statistics.

A model's BatchNorm running statistics were accumulated on its training data, poisoned images included. A
neuron that responds to the trigger therefore has, on clean images, a pre-activation distribution far from
its running statistics (Zheng et al., "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022).
:func:`divergence` measures that per channel from clean data alone: KL(N(clean mean, clean var) || N(running
mean, running var)). :func:`suspects` are the channels whose divergence lies more than ``z`` standard
deviations above the mean of their layer. Layers without running statistics (LayerNorm, GroupNorm, gates,
BatchNorm with ``track_running_stats=False``) give no evidence.

Limits: the evidence is only as good as the running statistics; a checkpoint whose statistics were
re-estimated on clean data (an adaptive attacker, or a user who recalibrated BN) carries none.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

SUSPECT_Z = 3.0          # standard deviations above the layer's mean divergence
MIN_CHANNELS = 8         # a z-score over fewer channels says nothing


def _has_running_stats(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
            and module.running_var is not None)


@torch.no_grad()
def divergence(model: nn.Module, layers: Iterable[str], x: Tensor, batch_size: int = 256,
               device=None) -> Dict[str, Tensor]:
    """``{layer: KL per channel}`` for each of ``layers`` that is a BatchNorm with running statistics: the
    clean pre-activation distribution of ``x`` (moments over the batch and every position, in float64)
    against the layer's running statistics, both as normal distributions. ``model`` is run in eval mode and
    left in the mode it was in."""
    modules = dict(model.named_modules())
    wanted = [name for name in layers if name in modules and _has_running_stats(modules[name])]
    sums: Dict[str, List] = {}

    def hook(name):
        def record(module, inputs):
            v = inputs[0].detach().double()
            dims = [d for d in range(v.dim()) if d != 1]
            count = v.numel() // v.shape[1]
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += count
            s[1] = s[1] + v.sum(dims)
            s[2] = s[2] + (v * v).sum(dims)
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in wanted]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device) if device is not None else x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name in wanted:
        m = modules[name]
        n, s1, s2 = sums[name]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0) + m.eps
        run_mean, run_var = m.running_mean.double(), m.running_var.double() + m.eps
        out[name] = (0.5 * (torch.log(run_var / var) + (var + (mean - run_mean) ** 2) / run_var - 1)).float().cpu()
    return out


def suspects(model: nn.Module, masks: Mapping[str, Tensor], x: Tensor, z: Optional[float] = None,
             device=None) -> List[Tuple[str, int, float]]:
    """The neurons of ``masks``' layers whose pre-activation divergence on clean ``x`` is more than ``z``
    standard deviations above their layer's mean (layers with at least MIN_CHANNELS channels), as
    ``(layer, index, z-score)``, strongest first. ``z`` None: SUSPECT_Z at call time."""
    z = SUSPECT_Z if z is None else z
    found = []
    for name, kl in divergence(model, masks.keys(), x, device=device).items():
        if kl.numel() < MIN_CHANNELS or kl.numel() != torch.as_tensor(masks[name]).numel():
            continue
        std = kl.std()
        if not std > 0:
            continue
        scores = (kl - kl.mean()) / std
        found.extend((name, int(i), float(scores[i])) for i in (scores > z).nonzero().flatten().tolist())
    return sorted(found, key=lambda t: -t[2])
