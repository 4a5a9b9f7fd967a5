"""Triton kernels of the perturbed batch norm with G coefficient groups, fused residual add and ReLU:

    y = (x - mean) * rstd * a[g] + b[g]  [+ residual]  [then ReLU]      a = scale * coef_w, b = shift * coef_b

The input is read as (N, C, S) with any strides (NCHW and channels_last alike). Reductions are split: a
program owns a tile of BLOCK_C channels by a slice of one group's N/G * S elements, so even a handful of
channels fills the device; per-program partial sums (fp32, of values shifted by a sample of the channel so
sum-of-squares does not cancel) are finished on the host in fp64. Backward recomputes xh from x, reads the
ReLU mask off the saved output, and reduces sum(dy') and sum(dy' * (x - mean)) per (group, channel), the two
sums batch norm backward needs anyway; the coefficient gradients are read off them by the caller.

Same contract as the C++ and CUDA kernels in csrc/: forward -> (y, mean, rstd, var_unbiased), backward ->
(dx, dy' or empty, sum_dy, sum_dyxc). This module knows nothing of the engine.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to


@triton.jit
def _tile(pid_m, start, chunk, g, Ng, HW, M_g, c, cm, sN, sC, sS, BLOCK_M: tl.constexpr):
    """Sample/spatial indices, mask and offsets of one (BLOCK_M, BLOCK_C) tile: elements start.. of this
    program's slice [pid_m * chunk, (pid_m + 1) * chunk) of group g, channels c."""
    m = pid_m * chunk + start + tl.arange(0, BLOCK_M)
    n = g * Ng + m // HW
    s = m % HW
    msk = ((m < M_g) & (m < (pid_m + 1) * chunk))[:, None] & cm[None, :]
    off = (n * sN + s * sS)[:, None] + (c * sC)[None, :]
    return n, s, msk, off


@triton.jit
def _stats_kernel(x_ptr, k_ptr, p1_ptr, p2_ptr, C, HW, M_g, Ng, chunk, SPLITS, sN, sC, sS,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c, pid_m, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    k = tl.load(k_ptr + g * C + c, mask=cm, other=0.0)
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, chunk, BLOCK_M):
        n, s, msk, off = _tile(pid_m, start, chunk, g, Ng, HW, M_g, c, cm, sN, sC, sS, BLOCK_M)
        v = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32) - k[None, :]
        v = tl.where(msk, v, 0.0)
        acc1 += tl.sum(v, 0)
        acc2 += tl.sum(v * v, 0)
    out = (g * SPLITS + pid_m) * C + c
    tl.store(p1_ptr + out, acc1, mask=cm)
    tl.store(p2_ptr + out, acc2, mask=cm)


@triton.jit
def _normalize_kernel(x_ptr, res_ptr, y_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, C, HW, M_g, Ng, chunk,
                      sN, sC, sS, rN, rC, rS, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c, pid_m, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    gc = g * C + c
    mean = tl.load(mean_ptr + gc, mask=cm, other=0.0)
    rstd = tl.load(rstd_ptr + gc, mask=cm, other=0.0)
    a = tl.load(a_ptr + gc, mask=cm, other=0.0)
    b = tl.load(b_ptr + gc, mask=cm, other=0.0)
    for start in range(0, chunk, BLOCK_M):
        n, s, msk, off = _tile(pid_m, start, chunk, g, Ng, HW, M_g, c, cm, sN, sC, sS, BLOCK_M)
        x = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * rstd[None, :] * a[None, :] + b[None, :]
        if HAS_RES:
            roff = (n * rN + s * rS)[:, None] + (c * rC)[None, :]
            y += tl.load(res_ptr + roff, mask=msk, other=0.0).to(tl.float32)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # NaN passes, as in torch
        tl.store(y_ptr + off, cast_to(y, y_ptr), mask=msk)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, y_ptr, gbuf_ptr, mean_ptr, p1_ptr, p2_ptr, C, HW, M_g, Ng, chunk, SPLITS,
                      sN, sC, sS, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c, pid_m, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.load(mean_ptr + g * C + c, mask=cm, other=0.0)
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, chunk, BLOCK_M):
        n, s, msk, off = _tile(pid_m, start, chunk, g, Ng, HW, M_g, c, cm, sN, sC, sS, BLOCK_M)
        d = tl.load(dy_ptr + off, mask=msk, other=0.0).to(tl.float32)
        if RELU:  # the ReLU mask read off the saved output; dy' kept for the second pass (and the residual)
            y = tl.load(y_ptr + off, mask=msk, other=0.0).to(tl.float32)
            d = tl.where(y <= 0, 0.0, d)
            tl.store(gbuf_ptr + off, cast_to(d, gbuf_ptr), mask=msk)
        xc = tl.where(msk, tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32) - mean[None, :], 0.0)
        acc1 += tl.sum(d, 0)
        acc2 += tl.sum(d * xc, 0)
    out = (g * SPLITS + pid_m) * C + c
    tl.store(p1_ptr + out, acc1, mask=cm)
    tl.store(p2_ptr + out, acc2, mask=cm)


@triton.jit
def _input_grad_kernel(src_ptr, x_ptr, dx_ptr, mean_ptr, ardstd_ptr, mdy_ptr, proj_ptr, C, HW, M_g, Ng, chunk,
                       sN, sC, sS, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c, pid_m, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    gc = g * C + c
    mean = tl.load(mean_ptr + gc, mask=cm, other=0.0)[None, :]
    k = tl.load(ardstd_ptr + gc, mask=cm, other=0.0)[None, :]
    mdy = tl.load(mdy_ptr + gc, mask=cm, other=0.0)[None, :]
    proj = tl.load(proj_ptr + gc, mask=cm, other=0.0)[None, :]
    for start in range(0, chunk, BLOCK_M):
        n, s, msk, off = _tile(pid_m, start, chunk, g, Ng, HW, M_g, c, cm, sN, sC, sS, BLOCK_M)
        d = tl.load(src_ptr + off, mask=msk, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32)
        dx = k * (d - mdy - (x - mean) * proj)
        tl.store(dx_ptr + off, cast_to(dx, dx_ptr), mask=msk)


# ------------------------------------------------------------------------------------------------ host side

def _strides3(t: torch.Tensor):
    """(sN, sC, sS) of t read as (N, C, S): the trailing dims must collapse into one index."""
    n, c = t.shape[:2]
    rest = t.shape[2:]
    if len(rest) == 0:
        return t.stride(0), t.stride(1), 1
    # the spatial dims collapse when each one's stride is the next one's stride times its size
    strides = [st for st, sz in zip(t.stride()[2:], rest) if sz > 1]
    sizes = [sz for sz in rest if sz > 1]
    for i in range(len(sizes) - 1):
        if strides[i] != strides[i + 1] * sizes[i + 1]:
            raise ValueError("the spatial dims of the input do not collapse into one index")
    return t.stride(0), t.stride(1), (strides[-1] if strides else 1)


def _launch_shape(N, C, S, G, rows_major):
    M_g = N // G * S
    block_c = min(triton.next_power_of_2(C), 32 if rows_major else 4)
    block_m = max(16, 2048 // block_c)
    n_c = triton.cdiv(C, block_c)
    splits = max(1, min(triton.cdiv(M_g, block_m), 1024 // max(1, n_c * G)))
    chunk = triton.cdiv(triton.cdiv(M_g, splits), block_m) * block_m
    splits = triton.cdiv(M_g, chunk)
    return M_g, block_c, block_m, n_c, splits, chunk


def _prepare(x):
    N, C = x.shape[:2]
    S = x.numel() // max(1, N * C)
    sN, sC, sS = _strides3(x)
    return N, C, S, (sN, sC, sS), sC == 1 and S > 1


def forward(x, a, b, residual=None, mean_in=None, rstd_in=None, relu=False, training=True, eps=1e-5):
    """Launch the forward. a, b: fp32 (G, C) composed coefficients. Training: batch statistics per group
    (mean_in/rstd_in ignored); eval: the given (G, C) mean and rstd. Returns y (x's strides) and fp32 (G, C)
    mean, rstd and unbiased batch variance (zeros in eval)."""
    G = a.shape[0]
    N, C, S, sx, rows_major = _prepare(x)
    M_g, block_c, block_m, n_c, splits, chunk = _launch_shape(N, C, S, G, rows_major)
    y = torch.empty_like(x)
    if y.stride() != x.stride():
        raise ValueError("the input must be dense (contiguous or channels_last)")
    grid = (n_c, splits, G)
    a = a.float().contiguous()
    b = b.float().contiguous()
    if training:
        k = torch.as_strided(x, (N, C), (sx[0], sx[1]))[::N // G].float().contiguous()  # (G, C) shifts
        p1 = torch.empty(G, splits, C, device=x.device, dtype=torch.float32)
        p2 = torch.empty_like(p1)
        _stats_kernel[grid](x, k, p1, p2, C, S, M_g, N // G, chunk, splits, *sx, BLOCK_M=block_m, BLOCK_C=block_c)
        s1 = p1.double().sum(1) / M_g
        var = (p2.double().sum(1) / M_g - s1 * s1).clamp_min(0)
        mean = (k.double() + s1).float()
        rstd = torch.rsqrt(var + eps).float()
        var_unbiased = (var * (M_g / max(M_g - 1, 1))).float()
    else:
        mean = torch.empty(G, C, device=x.device).copy_(mean_in.reshape(-1, C).expand(G, C))  # never an alias
        rstd = torch.empty(G, C, device=x.device).copy_(rstd_in.reshape(-1, C).expand(G, C))
        var_unbiased = torch.zeros_like(mean)
    if residual is not None and residual.stride() != x.stride():
        residual = torch.empty_like(x).copy_(residual)
    sr = _strides3(residual) if residual is not None else (0, 0, 0)
    _normalize_kernel[grid](x, residual if residual is not None else x, y, a, b, mean, rstd, C, S, M_g, N // G,
                            chunk, *sx, *sr, HAS_RES=residual is not None, RELU=relu, BLOCK_M=block_m,
                            BLOCK_C=block_c)
    return y, mean, rstd, var_unbiased


def backward(dy, x, y, a, mean, rstd, has_residual=False, relu=False, training=True):
    """Launch the backward. y: the forward output (read for the ReLU mask only). Returns dx, dy' (the
    residual's gradient when has_residual and relu, else an empty tensor) and fp32 (G, C) sum_dy and
    sum_dyxc = sum(dy' * (x - mean))."""
    G = a.shape[0]
    N, C, S, sx, rows_major = _prepare(x)
    M_g, block_c, block_m, n_c, splits, chunk = _launch_shape(N, C, S, G, rows_major)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    if relu and y.stride() != x.stride():
        y = torch.empty_like(x).copy_(y)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if (has_residual and relu) else x.new_empty((0,))
    gbuf = (dres if has_residual else dx) if relu else dx
    grid = (n_c, splits, G)
    p1 = torch.empty(G, splits, C, device=x.device, dtype=torch.float32)
    p2 = torch.empty_like(p1)
    mean = mean.float().contiguous()
    rstd = rstd.float().contiguous()
    _grad_sums_kernel[grid](dy, x, y if relu else x, gbuf, mean, p1, p2, C, S, M_g, N // G, chunk, splits, *sx,
                            RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    sum_dy = p1.double().sum(1)
    sum_dyxc = p2.double().sum(1)
    a_rstd = (a.float() * rstd).contiguous()
    if training:
        mdy = (sum_dy / M_g).float()
        proj = ((sum_dyxc / M_g) * rstd.double() * rstd.double()).float()
    else:
        mdy = torch.zeros_like(rstd)
        proj = torch.zeros_like(rstd)
    _input_grad_kernel[grid](gbuf if relu else dy, x, dx, mean, a_rstd, mdy.contiguous(), proj.contiguous(), C, S,
                             M_g, N // G, chunk, *sx, BLOCK_M=block_m, BLOCK_C=block_c)
    return dx, dres, sum_dy.float(), sum_dyxc.float()
