"""Triton kernels of the perturbed batch norm (training mode, batch statistics), with G groups:

    y = xh * scale * coef_w[g] + shift * coef_b[g]  [+ residual]  [then ReLU]

one program per (group, channel), two passes over the group's (N/G, H*W) elements in fp32 (sum and sum of
squares, then normalise). Backward recomputes xh (and the ReLU mask) from x, reduces sum(dy) and
sum(dy * xh) per (group, channel) -- the same reductions batch norm backward needs -- and from them gives the
input gradient and the coefficient gradients. Any strides: NCHW and channels_last alike. This module knows
nothing of the engine; the ops layer decides when it runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _offsets(i, HW, sN, sS):
    n = i // HW
    s = i - n * HW
    return n * sN + s * sS


@triton.jit
def _forward_kernel(x_ptr, res_ptr, y_ptr, scale_ptr, shift_ptr, cw_ptr, cb_ptr, mean_ptr, rstd_ptr,
                    C, HW, M, sN, sC, sS, rN, rC, rS, eps,
                    HAS_RES: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, GIVEN_STATS: tl.constexpr,
                    BLOCK: tl.constexpr):
    g = tl.program_id(0)
    c = tl.program_id(1)
    base = g * M // HW * sN + c * sC  # group g starts at sample g * (N / G)
    rbase = g * M // HW * rN + c * rC
    if GIVEN_STATS:  # eval mode: mean and rstd come from the running statistics
        mean = tl.load(mean_ptr + c)
        rstd = tl.load(rstd_ptr + c)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            i = start + tl.arange(0, BLOCK)
            m = i < M
            x = tl.load(x_ptr + base + _offsets(i, HW, sN, sS), mask=m, other=0.0).to(tl.float32)
            acc += x
            acc2 += x * x
        mean = tl.sum(acc, 0) / M
        var = tl.maximum(tl.sum(acc2, 0) / M - mean * mean, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + g * C + c, mean)
        tl.store(rstd_ptr + g * C + c, rstd)
    a = tl.load(scale_ptr + c).to(tl.float32) * tl.load(cw_ptr + g * C + c).to(tl.float32)
    b = 0.0
    if HAS_SHIFT:
        b = tl.load(shift_ptr + c).to(tl.float32) * tl.load(cb_ptr + g * C + c).to(tl.float32)
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < M
        off = base + _offsets(i, HW, sN, sS)
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * a + b
        if HAS_RES:
            y += tl.load(res_ptr + rbase + _offsets(i, HW, rN, rS), mask=m, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _xh_and_dy(x_ptr, dy_ptr, res_ptr, off, roff, m, mean, rstd, a, b, HAS_RES: tl.constexpr,
               RELU: tl.constexpr):
    """Normalised input and the gradient reaching the affine output (the ReLU mask recomputed, not stored)."""
    xh = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean) * rstd
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    if RELU:
        y = xh * a + b
        if HAS_RES:
            y += tl.load(res_ptr + roff, mask=m, other=0.0).to(tl.float32)
        dy = tl.where(y > 0, dy, 0.0)
    return xh, dy


@triton.jit
def _backward_kernel(x_ptr, res_ptr, dy_ptr, dx_ptr, dres_ptr, scale_ptr, shift_ptr, cw_ptr, cb_ptr,
                     mean_ptr, rstd_ptr, dcw_ptr, dcb_ptr,
                     C, HW, M, sN, sC, sS, rN, rC, rS,
                     HAS_RES: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    c = tl.program_id(1)
    base = g * M // HW * sN + c * sC
    rbase = g * M // HW * rN + c * rC
    mean = tl.load(mean_ptr + g * C + c)
    rstd = tl.load(rstd_ptr + g * C + c)
    scale = tl.load(scale_ptr + c).to(tl.float32)
    a = scale * tl.load(cw_ptr + g * C + c).to(tl.float32)
    shift = 0.0
    b = 0.0
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c).to(tl.float32)
        b = shift * tl.load(cb_ptr + g * C + c).to(tl.float32)
    s_dy = tl.zeros([BLOCK], dtype=tl.float32)
    s_dyxh = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < M
        xh, dy = _xh_and_dy(x_ptr, dy_ptr, res_ptr, base + _offsets(i, HW, sN, sS),
                            rbase + _offsets(i, HW, rN, rS), m, mean, rstd, a, b, HAS_RES, RELU)
        s_dy += dy
        s_dyxh += dy * xh
    sum_dy = tl.sum(s_dy, 0)
    sum_dyxh = tl.sum(s_dyxh, 0)
    tl.store(dcw_ptr + g * C + c, sum_dyxh * scale)
    tl.store(dcb_ptr + g * C + c, sum_dy * shift)
    k = a * rstd / M
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < M
        off = base + _offsets(i, HW, sN, sS)
        xh, dy = _xh_and_dy(x_ptr, dy_ptr, res_ptr, off, rbase + _offsets(i, HW, rN, rS), m, mean, rstd, a, b,
                            HAS_RES, RELU)
        dx = k * (M * dy - sum_dy - xh * sum_dyxh)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_RES:
            tl.store(dres_ptr + rbase + _offsets(i, HW, rN, rS), dy.to(dres_ptr.dtype.element_ty), mask=m)


def _spatial_strides(t: torch.Tensor):
    """(sN, sC, sS) of a 4-D tensor whose H and W collapse into one spatial index (NCHW or channels_last)."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if h > 1 and w > 1 and sh != w * sw:
        raise ValueError("H and W of the input do not collapse into one index; make it contiguous")
    return sn, sc, (sw if w > 1 else sh)


BLOCK = 256


def forward(x, scale, shift, coef_w, coef_b, residual=None, relu=False, eps=1e-5, training=True,
            running_mean=None, running_var=None, momentum=0.1):
    """Launch the forward kernel; returns (y, mean, rstd), mean/rstd of shape (G, C), fp32.

    training: batch statistics per group; running statistics, when given, are then updated group after
    group exactly as torch's batch_norm would (unbiased variance). Otherwise (eval) the running statistics
    normalise every group."""
    N, C, H, W = x.shape
    G = coef_w.shape[0]
    if N % G:
        raise ValueError(f"batch {N} is not divisible into {G} groups")
    M = (N // G) * H * W
    y = torch.empty_like(x)
    if training:
        mean = torch.empty(G, C, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("eval mode needs running statistics")
        mean = running_mean.float().expand(G, C).contiguous()
        rstd = torch.rsqrt(running_var.float() + eps).expand(G, C).contiguous()
    sx = _spatial_strides(x)
    sr = _spatial_strides(residual) if residual is not None else (0, 0, 0)
    if y.stride() != x.stride():
        raise ValueError("output must share the input's strides")
    _forward_kernel[(G, C)](
        x, residual if residual is not None else x, y, scale, shift if shift is not None else scale,
        coef_w.contiguous(), coef_b.contiguous(), mean, rstd, C, H * W, M, *sx, *sr, eps,
        HAS_RES=residual is not None, HAS_SHIFT=shift is not None, RELU=relu, GIVEN_STATS=not training,
        BLOCK=BLOCK)
    if training and running_mean is not None:
        with torch.no_grad():
            var = (1.0 / (rstd * rstd) - eps).clamp_min(0) * (M / max(M - 1, 1))
            for g in range(G):  # torch updates the running statistics once per batch_norm call, in turn
                running_mean.mul_(1 - momentum).add_(mean[g].to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var[g].to(running_var.dtype), alpha=momentum)
    return y, mean, rstd


def backward(dy, x, scale, shift, coef_w, coef_b, mean, rstd, residual=None, relu=False):
    """Launch the backward kernel of a TRAINING-mode forward (batch statistics ``mean``/``rstd`` from it);
    returns (dx, dresidual or None, dcoef_w, dcoef_b). Eval-mode backward is not implemented here."""
    N, C, H, W = x.shape
    G = coef_w.shape[0]
    M = (N // G) * H * W
    dy = dy.contiguous(memory_format=torch.channels_last if x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    dx = torch.empty_like(x)
    dres = torch.empty_like(residual) if residual is not None else None
    dcw = torch.empty(G, C, device=x.device, dtype=torch.float32)
    dcb = torch.empty_like(dcw)
    sx = _spatial_strides(x)
    sr = _spatial_strides(residual) if residual is not None else (0, 0, 0)
    _backward_kernel[(G, C)](
        x, residual if residual is not None else x, dy, dx, dres if dres is not None else dx, scale,
        shift if shift is not None else scale, coef_w.contiguous(), coef_b.contiguous(), mean, rstd, dcw, dcb,
        C, H * W, M, *sx, *sr,
        HAS_RES=residual is not None, HAS_SHIFT=shift is not None, RELU=relu, BLOCK=BLOCK)
    return dx, dres, dcw, dcb
