"""Perturbable layers: a norm (or a conv/linear with no norm) whose forward reads its mask and noise
from a shared :class:`~anp_fast.state.MaskState` and calls the perturbed op of :mod:`anp_fast.ops`.

A layer is made perturbable in place on a COPY of the user's model by swapping its class for a cached
subclass that overrides ``forward`` only: parameters, buffers, attributes, hooks and state_dict keys stay
as they were, so model code that touches ``bn.weight`` keeps working.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .state import MaskState, Slot

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _coefficients(self) -> Tuple[Tensor, Tensor]:
    return self._anp_state.coefficients(self._anp_slot)


def _batch_norm_forward(self, x: Tensor, residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """The perturbed batch norm; ``residual``/``relu`` fold a following ``+ residual`` and ReLU into it (the
    fused residual blocks of :mod:`anp_fast.fusion` pass them)."""
    self._check_input_dim(x)
    coef_w, coef_b = _coefficients(self)
    # Batch statistics whenever the module trains (ANP's train mode); running statistics are left alone
    # there, since they do not change any output of the loop.
    use_batch_stats = self.training or self.running_mean is None
    return ops.perturbed_batch_norm(
        x, self.weight, self.bias, coef_w, coef_b,
        None if use_batch_stats else self.running_mean, None if use_batch_stats else self.running_var,
        use_batch_stats, 0.0, self.eps, residual=residual, relu=relu, fused=self._anp_state.fused,
        sync=self._anp_state.sync if use_batch_stats else None)


def _layer_norm_forward(self, x: Tensor) -> Tensor:
    coef_w, coef_b = _coefficients(self)
    return ops.perturbed_layer_norm(x, self.normalized_shape, self.weight, self.bias, coef_w, coef_b, self.eps,
                                    fused=self._anp_state.fused)


def _group_norm_forward(self, x: Tensor) -> Tensor:
    coef_w, coef_b = _coefficients(self)
    return ops.perturbed_group_norm(x, self.num_groups, self.weight, self.bias, coef_w, coef_b, self.eps,
                                    fused=self._anp_state.fused)


def _generic_norm_forward(self, x: Tensor) -> Tensor:
    """A norm subclass with a forward of its own (torchvision's LayerNorm2d, ...): run that forward with
    its weight and bias replaced by the perturbed ones, chunk by chunk when there are several groups."""
    coef_w, coef_b = _coefficients(self)
    params = self._parameters
    weight, bias = params["weight"], params.get("bias")
    chunks = x.chunk(coef_w.shape[0], dim=0) if coef_w.shape[0] > 1 else (x,)
    outs = []
    try:
        for g, xg in enumerate(chunks):
            params["weight"] = weight * coef_w[g].view(weight.shape)
            if bias is not None:
                params["bias"] = bias * coef_b[g].view(bias.shape)
            outs.append(self._anp_base.forward(self, xg))
    finally:
        params["weight"] = weight
        if bias is not None:
            params["bias"] = bias
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _conv_gate_forward(self, x: Tensor) -> Tensor:
    coef_w, coef_b = _coefficients(self)
    return ops.perturbed_channel_gate(self._conv_forward(x, self.weight, None), self.bias, coef_w, coef_b, 1,
                                      fused=self._anp_state.fused)


def _linear_gate_forward(self, x: Tensor) -> Tensor:
    coef_w, coef_b = _coefficients(self)
    return ops.perturbed_channel_gate(F.linear(x, self.weight), self.bias, coef_w, coef_b, -1,
                                      fused=self._anp_state.fused)


def _channel_shape(out: Tensor, dim: int) -> Tuple[int, ...]:
    shape = [1] * out.dim()
    shape[dim] = out.shape[dim]
    return tuple(shape)


def _subclass_gate_forward(self, x: Tensor, dim: int) -> Tensor:
    """A conv/linear subclass with its own forward (weight standardisation, 'same' padding, ...): its output,
    minus its bias, is gated like a plain layer's (the bias perturbed separately, as everywhere)."""
    out = self._anp_base.forward(self, x)
    bias = self.bias
    if bias is not None:
        out = out - bias.view(_channel_shape(out, dim))
    coef_w, coef_b = _coefficients(self)
    return ops.perturbed_channel_gate(out, bias, coef_w, coef_b, dim, fused=self._anp_state.fused)


def _conv_subclass_gate_forward(self, x: Tensor) -> Tensor:
    return _subclass_gate_forward(self, x, 1)


def _linear_subclass_gate_forward(self, x: Tensor) -> Tensor:
    return _subclass_gate_forward(self, x, -1)


_FORWARDS: Dict[str, Callable] = {
    "batch_norm": _batch_norm_forward,
    "layer_norm": _layer_norm_forward,
    "group_norm": _group_norm_forward,
    "norm": _generic_norm_forward,
    "conv_gate": _conv_gate_forward,
    "linear_gate": _linear_gate_forward,
    "conv_subclass_gate": _conv_subclass_gate_forward,
    "linear_subclass_gate": _linear_subclass_gate_forward,
}
_CLASSES: Dict[Tuple[type, str], type] = {}


def norm_kind(module: nn.Module) -> Optional[str]:
    """The perturbable kind of a norm layer, or None if it is not one (or has no affine scale)."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return None  # no affine scale: nothing to mask or prune
    if isinstance(module, _BN):
        own_forward = cls.forward in (_BN.forward, nn.SyncBatchNorm.forward)
        return "batch_norm" if own_forward else "norm"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm" if cls.forward is nn.LayerNorm.forward else "norm"
    if isinstance(module, nn.GroupNorm):
        return "group_norm" if cls.forward is nn.GroupNorm.forward else "norm"
    return None


def gate_kind(module: nn.Module) -> Optional[str]:
    """'conv_gate' / 'linear_gate' for a conv/linear layer with the standard forward; 'conv_subclass_gate' /
    'linear_subclass_gate' for a subclass with its own (timm's ScaledStdConv2d, Conv2dSame, ...): its output is
    gated; else None."""
    cls = type(module)
    if isinstance(module, _CONV):
        standard = cls.forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
        return "conv_gate" if standard else "conv_subclass_gate"
    if isinstance(module, nn.Linear):
        return "linear_gate" if cls.forward is nn.Linear.forward else "linear_subclass_gate"
    return None


def neuron_count(module: nn.Module, kind: str) -> int:
    if kind.endswith("gate"):
        return module.weight.shape[0]
    return module.weight.numel()


def make_perturbable(module: nn.Module, kind: str, state: MaskState, slot: Slot) -> None:
    """Turn ``module`` (already a copy) into its perturbable version reading ``slot`` of ``state``."""
    base = type(module)
    cls = _CLASSES.get((base, kind))
    if cls is None:
        cls = type(f"Perturbable{base.__name__}", (base,),
                    {"forward": _FORWARDS[kind], "_anp_base": base, "_anp_kind": kind,
                     "__module__": __name__})
        _CLASSES[(base, kind)] = cls
    module.__class__ = cls
    module._anp_state = state
    module._anp_slot = slot


def is_perturbable(module: nn.Module) -> bool:
    return hasattr(type(module), "_anp_kind")
