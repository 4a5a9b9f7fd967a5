"""Eager PyTorch reference of the perturbed normalisation ops: the specification every backend is tested
against, and the fallback of last resort.

Shared conventions:
- ``coef_w`` and ``coef_b`` have shape (G, C): G groups of coefficient rows. The batch (dimension 0) is
  split into G equal chunks; chunk g uses row g and, for batch norm, its own batch statistics.
  G = 1 is the plain case.
- The perturbed neuron is ``y = xh * scale * coef_w + shift * coef_b`` with coef_w = mask (+ noise_w) and
  coef_b = 1 (+ noise_b) (ANP.md); scale and shift are the frozen affine parameters of the layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunks(x: Tensor, groups: int):
    return x.chunk(groups, dim=0) if groups > 1 else (x,)


def _join(parts):
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def _shift(shift: Optional[Tensor], coef_b_row: Tensor) -> Optional[Tensor]:
    return None if shift is None else shift * coef_b_row


def perturbed_batch_norm(x: Tensor, scale: Tensor, shift: Optional[Tensor], coef_w: Tensor, coef_b: Tensor,
                         running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                         momentum: float, eps: float, residual: Optional[Tensor] = None,
                         relu: bool = False) -> Tensor:
    """Batch norm over dim 1 of ``x`` (N, C, *) with per-group coefficients, then ``+ residual`` and ReLU
    when asked. In training mode each group is normalised with its own batch statistics and, when running
    statistics are given, updates them in turn exactly as ``torch.nn.functional.batch_norm`` does."""
    parts = [
        F.batch_norm(xg, running_mean, running_var, scale * coef_w[g], _shift(shift, coef_b[g]),
                     training, momentum, eps)
        for g, xg in enumerate(_chunks(x, coef_w.shape[0]))
    ]
    y = _join(parts)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def perturbed_layer_norm(x: Tensor, normalized_shape: Sequence[int], scale: Tensor, shift: Optional[Tensor],
                         coef_w: Tensor, coef_b: Tensor, eps: float) -> Tensor:
    """Layer norm over the trailing ``normalized_shape``; one coefficient per normalised feature
    (coef rows are flat, of length prod(normalized_shape))."""
    shape = tuple(normalized_shape)
    parts = [
        F.layer_norm(xg, shape, scale * coef_w[g].view(shape),
                     None if shift is None else shift * coef_b[g].view(shape), eps)
        for g, xg in enumerate(_chunks(x, coef_w.shape[0]))
    ]
    return _join(parts)


def perturbed_group_norm(x: Tensor, num_groups: int, scale: Tensor, shift: Optional[Tensor],
                         coef_w: Tensor, coef_b: Tensor, eps: float) -> Tensor:
    """Group norm over dim 1 with per-channel coefficients."""
    parts = [
        F.group_norm(xg, num_groups, scale * coef_w[g], _shift(shift, coef_b[g]), eps)
        for g, xg in enumerate(_chunks(x, coef_w.shape[0]))
    ]
    return _join(parts)


def perturbed_channel_gate(z: Tensor, shift: Optional[Tensor], coef_w: Tensor, coef_b: Tensor,
                           channel_dim: int) -> Tensor:
    """Gate on a layer with no norm: ``z`` is the bias-free output of a conv (channel_dim 1) or linear
    (channel_dim -1) layer and plays the part of ``xh * scale``: y = z * coef_w + shift * coef_b."""
    ndim = z.dim()
    dim = channel_dim % ndim
    view = [1] * ndim
    view[dim] = -1
    parts = []
    for g, zg in enumerate(_chunks(z, coef_w.shape[0])):
        y = zg * coef_w[g].view(view)
        if shift is not None:
            y = y + (shift * coef_b[g]).view(view)
        parts.append(y)
    return _join(parts)
