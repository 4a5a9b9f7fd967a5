"""Fused perturbed batch norm as ``torch.library`` custom ops, one pair (forward, backward) per backend.

Every backend's kernels keep one contract (csrc/ and kernels/ document it):

    forward(x, a, b, residual, mean_in, rstd_in, relu, training, eps) -> y, mean, rstd, var_unbiased
    backward(dy, x, y, a, mean, rstd, has_residual, relu, training) -> dx, dy' (or empty), sum_dy, sum_dyxc

with a = scale * coef_w and b = shift * coef_b, fp32 (G, C). The composition of a and b, the coefficient
gradients (d a = rstd * sum_dyxc, d b = sum_dy, the rest by autograd through the composition) and the
running-statistics update are plain torch around the op, shared by every backend. The ops are functional
(no input is mutated), carry fake implementations and autograd, so ``torch.compile`` keeps them in one graph.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import eager, verify


def _stats_like(a: Tensor) -> Tensor:
    return a.new_empty(a.shape, dtype=torch.float32)


def define_batch_norm(backend: str, kernels) -> Tuple[Callable, object, object]:
    """Register ``anp_fast::perturbed_batch_norm_<backend>`` (+ ``_backward``) over ``kernels`` (an object with
    ``forward`` and ``backward`` of the contract above); returns the op-level function (the eager op's
    signature plus ``residual``/``relu``), and the two custom ops (for opcheck)."""
    name = f"anp_fast::perturbed_batch_norm_{backend}"

    @torch.library.custom_op(name, mutates_args=())
    def forward_op(x: Tensor, a: Tensor, b: Tensor, residual: Optional[Tensor], mean_in: Optional[Tensor],
                   rstd_in: Optional[Tensor], relu: bool, training: bool,
                   eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        y, mean, rstd, var = kernels.forward(x, a, b, residual, mean_in, rstd_in, relu, training, eps)
        return y, mean, rstd, var

    @forward_op.register_fake
    def _(x, a, b, residual, mean_in, rstd_in, relu, training, eps):
        return torch.empty_like(x), _stats_like(a), _stats_like(a), _stats_like(a)

    @torch.library.custom_op(name + "_backward", mutates_args=())
    def backward_op(dy: Tensor, x: Tensor, y: Optional[Tensor], a: Tensor, mean: Tensor, rstd: Tensor,
                    has_residual: bool, relu: bool, training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        dx, dres, sum_dy, sum_dyxc = kernels.backward(dy, x, y, a, mean, rstd, has_residual, relu, training)
        return dx, dres, sum_dy, sum_dyxc

    @backward_op.register_fake
    def _(dy, x, y, a, mean, rstd, has_residual, relu, training):
        dres = torch.empty_like(x) if (has_residual and relu) else x.new_empty((0,))
        return torch.empty_like(x), dres, _stats_like(a), _stats_like(a)

    def setup_context(ctx, inputs, output):
        x, a, b, residual, mean_in, rstd_in, relu, training, eps = inputs
        y, mean, rstd, _ = output
        ctx.save_for_backward(x, y if relu else None, a, mean, rstd)
        ctx.flags = (residual is not None, relu, training)
        ctx.dtypes = (a.dtype, b.dtype)

    def backward(ctx, dy, _dmean, _drstd, _dvar):
        x, y, a, mean, rstd = ctx.saved_tensors
        has_residual, relu, training = ctx.flags
        dx, dres, sum_dy, sum_dyxc = backward_op(dy, x, y, a, mean, rstd, has_residual, relu, training)
        da = (sum_dyxc * rstd).to(ctx.dtypes[0])
        db = sum_dy.to(ctx.dtypes[1])
        dresidual = (dres if relu else dy) if has_residual else None
        return dx, da, db, dresidual, None, None, None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)

    def perturbed_batch_norm(x: Tensor, scale: Tensor, shift: Optional[Tensor], coef_w: Tensor, coef_b: Tensor,
                             running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                             momentum: float, eps: float, residual: Optional[Tensor] = None,
                             relu: bool = False) -> Tensor:
        if not kernels.supports(x) or (residual is not None and residual.dtype != x.dtype):
            return eager.perturbed_batch_norm(x, scale, shift, coef_w, coef_b, running_mean, running_var, training,
                                              momentum, eps, residual=residual, relu=relu)
        if not torch.compiler.is_compiling() and not verify.usable(
                "perturbed_batch_norm", backend, sig := verify.batch_norm_signature(x, residual, relu, training),
                lambda: verify.batch_norm_check(perturbed_batch_norm, sig, x.device)()):
            return eager.perturbed_batch_norm(x, scale, shift, coef_w, coef_b, running_mean, running_var, training,
                                              momentum, eps, residual=residual, relu=relu)
        groups, channels = coef_w.shape
        n = x.shape[0]
        if n % groups:
            raise ValueError(f"batch {n} is not divisible into {groups} coefficient groups")
        if training and x.numel() // channels // groups <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}"
                             f" in {groups} group(s)")
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        a = scale.to(torch.float32) * coef_w if scale is not None else coef_w.to(torch.float32)
        b = shift.to(torch.float32) * coef_b if shift is not None else torch.zeros_like(a)
        use_batch_stats = training
        mean_in = rstd_in = None
        if not use_batch_stats:
            mean_in = running_mean.to(torch.float32)
            rstd_in = torch.rsqrt(running_var.to(torch.float32) + eps)
        y, mean, _, var = forward_op(x, a, b, residual, mean_in, rstd_in, relu, use_batch_stats, eps)
        if use_batch_stats and running_mean is not None and running_var is not None:
            with torch.no_grad():  # torch's batch_norm updates once per call: here once per group, in turn
                for g in range(groups):
                    running_mean.mul_(1 - momentum).add_(mean[g].to(running_mean.dtype), alpha=momentum)
                    running_var.mul_(1 - momentum).add_(var[g].to(running_var.dtype), alpha=momentum)
        return y

    perturbed_batch_norm.__doc__ = eager.perturbed_batch_norm.__doc__
    return perturbed_batch_norm, forward_op, backward_op


def define_layer_norm(backend: str, kernels) -> Tuple[Callable, object, object]:
    """Register ``anp_fast::perturbed_layer_norm_<backend>`` (+ ``_backward``) over ``kernels`` with
    ``forward(x2d, a, b, eps) -> (y, mean, rstd)`` and ``backward(dy, x2d, a, mean, rstd) -> (dx, sum_dyxh,
    sum_dy)``; returns the op-level function (the eager op's signature) and the two custom ops."""
    name = f"anp_fast::perturbed_layer_norm_{backend}"

    @torch.library.custom_op(name, mutates_args=())
    def forward_op(x: Tensor, a: Tensor, b: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        y, mean, rstd = kernels.forward(x, a, b, eps)
        return y, mean, rstd

    @forward_op.register_fake
    def _(x, a, b, eps):
        stats = x.new_empty(x.shape[:1], dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.custom_op(name + "_backward", mutates_args=())
    def backward_op(dy: Tensor, x: Tensor, a: Tensor, mean: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        dx, sum_dyxh, sum_dy = kernels.backward(dy, x, a, mean, rstd)
        return dx, sum_dyxh, sum_dy

    @backward_op.register_fake
    def _(dy, x, a, mean, rstd):
        return torch.empty_like(x), _stats_like(a), _stats_like(a)

    def setup_context(ctx, inputs, output):
        x, a, b, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, a, mean, rstd)
        ctx.dtypes = (a.dtype, b.dtype)

    def backward(ctx, dy, _dmean, _drstd):
        x, a, mean, rstd = ctx.saved_tensors
        dx, sum_dyxh, sum_dy = backward_op(dy.contiguous(), x, a, mean, rstd)
        return dx, sum_dyxh.to(ctx.dtypes[0]), sum_dy.to(ctx.dtypes[1]), None

    forward_op.register_autograd(backward, setup_context=setup_context)

    def perturbed_layer_norm(x: Tensor, normalized_shape, scale: Optional[Tensor], shift: Optional[Tensor],
                             coef_w: Tensor, coef_b: Tensor, eps: float) -> Tensor:
        shape = tuple(normalized_shape)
        features = 1
        for s in shape:
            features *= s
        groups = coef_w.shape[0]
        if not kernels.supports(x, features) or x.shape[0] % groups:
            return eager.perturbed_layer_norm(x, normalized_shape, scale, shift, coef_w, coef_b, eps)
        if not torch.compiler.is_compiling() and not verify.usable(
                "perturbed_layer_norm", backend, sig := verify.layer_norm_signature(x),
                lambda: verify.layer_norm_check(perturbed_layer_norm, sig, features, x.device)()):
            return eager.perturbed_layer_norm(x, normalized_shape, scale, shift, coef_w, coef_b, eps)
        a = scale.reshape(-1).to(torch.float32) * coef_w if scale is not None else coef_w.to(torch.float32)
        b = shift.reshape(-1).to(torch.float32) * coef_b if shift is not None else torch.zeros_like(a)
        y, _, _ = forward_op(x.reshape(-1, features).contiguous(), a, b, eps)
        return y.view(x.shape)

    perturbed_layer_norm.__doc__ = eager.perturbed_layer_norm.__doc__
    return perturbed_layer_norm, forward_op, backward_op
