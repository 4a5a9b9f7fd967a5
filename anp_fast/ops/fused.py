"""Fused perturbed norms as ``torch.library`` custom ops: ONE op per fused op (``anp_fast::perturbed_batch_norm``,
``anp_fast::perturbed_layer_norm``, each with its ``_backward``), schema, fake and autograd defined here once;
the compiled backends (C++ CPU, CUDA, Triton) register their kernels to it (:func:`define_batch_norm`,
:func:`define_layer_norm`) and the op's ``backend`` argument names the one that runs (``ops.resolve`` chooses
it; a compiled graph shows it). The eager op (``ops.eager``) is the specification and is not routed through
these ops.

Every batch-norm backend's kernels keep one contract (csrc/ and kernels/ document it):

    forward(x, a, b, residual, mean_in, rstd_in, relu, training, eps) -> y, mean, rstd, var_unbiased
    backward(dy, x, y, a, mean, rstd, has_residual, relu, training) -> dx, dy' (or empty), sum_dy, sum_dyxc

with a = scale * coef_w and b = shift * coef_b, fp32 (G, C). The composition of a and b, the coefficient
gradients (d a = rstd * sum_dyxc, d b = sum_dy, the rest by autograd through the composition) and the
running-statistics update are plain torch around the op, shared by every backend. The ops are functional
(no input is mutated), carry fake implementations and autograd, so ``torch.compile`` keeps them in one graph.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import eager, verify

# op -> {backend name: its kernels}: what the custom ops below dispatch to
KERNELS: Dict[str, Dict[str, object]] = {"perturbed_batch_norm": {}, "perturbed_layer_norm": {}}


def _kernels(op: str, backend: str):
    try:
        return KERNELS[op][backend]
    except KeyError:
        raise ValueError(f"anp_fast::{op}: no backend {backend!r} registered (registered: "
                         f"{', '.join(KERNELS[op]) or 'none'})") from None


def _stats_like(a: Tensor) -> Tensor:
    return a.new_empty(a.shape, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- batch norm
@torch.library.custom_op("anp_fast::perturbed_batch_norm", mutates_args=())
def batch_norm_op(x: Tensor, a: Tensor, b: Tensor, residual: Optional[Tensor], mean_in: Optional[Tensor],
                  rstd_in: Optional[Tensor], relu: bool, training: bool, eps: float,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, rstd, var = _kernels("perturbed_batch_norm", backend).forward(x, a, b, residual, mean_in, rstd_in,
                                                                          relu, training, eps)
    return y, mean, rstd, var


@batch_norm_op.register_fake
def _(x, a, b, residual, mean_in, rstd_in, relu, training, eps, backend):
    return torch.empty_like(x), _stats_like(a), _stats_like(a), _stats_like(a)


@torch.library.custom_op("anp_fast::perturbed_batch_norm_backward", mutates_args=())
def batch_norm_backward_op(dy: Tensor, x: Tensor, y: Optional[Tensor], a: Tensor, mean: Tensor, rstd: Tensor,
                           has_residual: bool, relu: bool, training: bool,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dres, sum_dy, sum_dyxc = _kernels("perturbed_batch_norm", backend).backward(dy, x, y, a, mean, rstd,
                                                                                   has_residual, relu, training)
    return dx, dres, sum_dy, sum_dyxc


@batch_norm_backward_op.register_fake
def _(dy, x, y, a, mean, rstd, has_residual, relu, training, backend):
    dres = torch.empty_like(x) if (has_residual and relu) else x.new_empty((0,))
    return torch.empty_like(x), dres, _stats_like(a), _stats_like(a)


def _bn_setup_context(ctx, inputs, output):
    x, a, b, residual, mean_in, rstd_in, relu, training, eps, backend = inputs
    y, mean, rstd, _ = output
    ctx.save_for_backward(x, y if relu else None, a, mean, rstd)
    ctx.flags = (residual is not None, relu, training, backend)
    ctx.dtypes = (a.dtype, b.dtype)


def _bn_backward(ctx, dy, _dmean, _drstd, _dvar):
    x, y, a, mean, rstd = ctx.saved_tensors
    has_residual, relu, training, backend = ctx.flags
    dx, dres, sum_dy, sum_dyxc = batch_norm_backward_op(dy, x, y, a, mean, rstd, has_residual, relu, training,
                                                        backend)
    da = (sum_dyxc * rstd).to(ctx.dtypes[0])
    db = sum_dy.to(ctx.dtypes[1])
    dresidual = (dres if relu else dy) if has_residual else None
    # given statistics (eval mode) may be a function of the batch (a process group's global statistics): y = a *
    # (x - mean) * rstd + b, so d mean = -a * rstd * sum(dy'), d rstd = a * sum(dy' (x - mean)): the same sums
    dmean = -(a * rstd) * sum_dy if not training and ctx.needs_input_grad[4] else None
    drstd = a * sum_dyxc if not training and ctx.needs_input_grad[5] else None
    return dx, da, db, dresidual, dmean, drstd, None, None, None, None


batch_norm_op.register_autograd(_bn_backward, setup_context=_bn_setup_context)


def define_batch_norm(backend: str, kernels) -> Callable:
    """Register ``kernels`` (an object with ``supports``, and ``forward`` and ``backward`` of the contract above)
    as ``backend`` of ``anp_fast::perturbed_batch_norm``; returns the op-level function (the eager op's
    signature plus ``residual``/``relu``)."""
    KERNELS["perturbed_batch_norm"][backend] = kernels

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
        y, mean, _, var = batch_norm_op(x, a, b, residual, mean_in, rstd_in, relu, use_batch_stats, eps, backend)
        if use_batch_stats and running_mean is not None and running_var is not None:
            with torch.no_grad():  # torch's batch_norm updates once per call: here once per group, in turn
                for g in range(groups):
                    running_mean.mul_(1 - momentum).add_(mean[g].to(running_mean.dtype), alpha=momentum)
                    running_var.mul_(1 - momentum).add_(var[g].to(running_var.dtype), alpha=momentum)
        return y

    def with_statistics(x: Tensor, scale: Tensor, shift: Optional[Tensor], coef_w: Tensor, coef_b: Tensor,
                        mean: Tensor, var: Tensor, eps: float, residual: Optional[Tensor] = None,
                        relu: bool = False) -> Optional[Tensor]:
        """The op normalising with GIVEN batch statistics: ``mean`` and biased ``var``, fp32 (G, C), computed
        elsewhere (over a process group: ``ops.synced``) and differentiable (their gradients come from the
        backward kernel's per-channel sums). Running statistics are the caller's. None where these kernels do
        not take ``x`` (the caller then normalises eagerly)."""
        if not kernels.supports(x) or (residual is not None and residual.dtype != x.dtype) \
                or x.shape[0] % coef_w.shape[0]:
            return None
        if not torch.compiler.is_compiling() and not verify.usable(
                "perturbed_batch_norm", backend, sig := verify.batch_norm_signature(x, residual, relu, "given"),
                lambda: verify.batch_norm_check(perturbed_batch_norm, sig, x.device, with_statistics)()):
            return None
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        a = scale.to(torch.float32) * coef_w if scale is not None else coef_w.to(torch.float32)
        b = shift.to(torch.float32) * coef_b if shift is not None else torch.zeros_like(a)
        return batch_norm_op(x, a, b, residual, mean.float(), torch.rsqrt(var.float() + eps), relu, False, eps,
                             backend)[0]

    perturbed_batch_norm.__doc__ = eager.perturbed_batch_norm.__doc__
    perturbed_batch_norm.with_statistics = with_statistics
    return perturbed_batch_norm


# ------------------------------------------------------------------------------------------- layer norm
@torch.library.custom_op("anp_fast::perturbed_layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, a: Tensor, b: Tensor, eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _kernels("perturbed_layer_norm", backend).forward(x, a, b, eps)
    return y, mean, rstd


@layer_norm_op.register_fake
def _(x, a, b, eps, backend):
    stats = x.new_empty(x.shape[:1], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("anp_fast::perturbed_layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: Tensor, x: Tensor, a: Tensor, mean: Tensor, rstd: Tensor,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dx, sum_dyxh, sum_dy = _kernels("perturbed_layer_norm", backend).backward(dy, x, a, mean, rstd)
    return dx, sum_dyxh, sum_dy


@layer_norm_backward_op.register_fake
def _(dy, x, a, mean, rstd, backend):
    return torch.empty_like(x), _stats_like(a), _stats_like(a)


def _ln_setup_context(ctx, inputs, output):
    x, a, b, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, a, mean, rstd)
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.backend = backend


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, a, mean, rstd = ctx.saved_tensors
    dx, sum_dyxh, sum_dy = layer_norm_backward_op(dy.contiguous(), x, a, mean, rstd, ctx.backend)
    return dx, sum_dyxh.to(ctx.dtypes[0]), sum_dy.to(ctx.dtypes[1]), None, None


layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)

# op -> its (forward, backward) custom ops, shared by every backend registered to it (opcheck: backend last)
CUSTOM_OPS = {"perturbed_batch_norm": (batch_norm_op, batch_norm_backward_op),
              "perturbed_layer_norm": (layer_norm_op, layer_norm_backward_op)}


def define_layer_norm(backend: str, kernels) -> Callable:
    """Register ``kernels`` (``supports``, ``forward(x2d, a, b, eps) -> (y, mean, rstd)`` and ``backward(dy, x2d,
    a, mean, rstd) -> (dx, sum_dyxh, sum_dy)``) as ``backend`` of ``anp_fast::perturbed_layer_norm``; returns
    the op-level function (the eager op's signature)."""
    KERNELS["perturbed_layer_norm"][backend] = kernels

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
        y, _, _ = layer_norm_op(x.reshape(-1, features).contiguous(), a, b, eps, backend)
        return y.view(x.shape)

    perturbed_layer_norm.__doc__ = eager.perturbed_layer_norm.__doc__
    return perturbed_layer_norm
