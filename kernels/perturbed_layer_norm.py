"""Triton kernels of the perturbed layer norm over the last dimension (D features), G coefficient groups:

    y = (x - mean) * rstd * a[g] + b[g]         a = scale * coef_w, b = shift * coef_b   (per feature)

x is read as R rows of D (R / G consecutive rows per group). Forward: one program per row, statistics in
fp32 over the row (mean, then the centred second moment), fp32 mean/rstd saved per row. Backward: programs
own a slice of one group's rows; each gives its rows' input gradient and its partial per-feature sums
sum(dy * xh) and sum(dy), finished on the host. Contract:
forward(x, a, b, eps) -> (y, mean, rstd); backward(dy, x, a, mean, rstd) -> (dx, sum_dyxh, sum_dy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to


@triton.jit
def _forward_kernel(x_ptr, y_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, D, rows_per_group, eps,
                    BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    g = r // rows_per_group
    d = tl.arange(0, BLOCK_D)
    m = d < D
    x = tl.load(x_ptr + r * D + d, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / D
    xc = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
    a = tl.load(a_ptr + g * D + d, mask=m, other=0.0)
    b = tl.load(b_ptr + g * D + d, mask=m, other=0.0)
    tl.store(y_ptr + r * D + d, cast_to(xc * rstd * a + b, y_ptr), mask=m)
    tl.store(mean_ptr + r, mean)
    tl.store(rstd_ptr + r, rstd)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, dx_ptr, a_ptr, mean_ptr, rstd_ptr, pa_ptr, pb_ptr, D, rows_per_group,
                     rows_per_prog, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    p = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    a = tl.load(a_ptr + g * D + d, mask=m, other=0.0)
    acc_a = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = g * rows_per_group + p * rows_per_prog
    end = tl.minimum(start + rows_per_prog, (g + 1) * rows_per_group)
    for r in range(start, end):
        x = tl.load(x_ptr + r * D + d, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * D + d, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + r)
        rstd = tl.load(rstd_ptr + r)
        xh = tl.where(m, (x - mean) * rstd, 0.0)
        gxh = dy * a
        c1 = tl.sum(gxh * xh, 0) / D
        c2 = tl.sum(gxh, 0) / D
        dx = (gxh - xh * c1 - c2) * rstd
        tl.store(dx_ptr + r * D + d, cast_to(dx, dx_ptr), mask=m)
        acc_a += dy * xh
        acc_b += dy
    n_prog = tl.num_programs(1)
    tl.store(pa_ptr + (g * n_prog + p) * D + d, acc_a, mask=m)
    tl.store(pb_ptr + (g * n_prog + p) * D + d, acc_b, mask=m)


MAX_D = 8192  # wider rows go to the eager op: a row lives in registers, and past this the backward spills


def _warps(block_d: int) -> int:
    """Warps for a program holding rows of block_d: one per 512 features (4 to 16), so that no thread keeps
    more than a few arrays of 16 values in registers (checked for spills by tests/triton_aot.py)."""
    return min(16, max(4, block_d // 512))


def forward(x, a, b, eps):
    """x: (R, D) contiguous; a, b: fp32 (G, D). Returns y, fp32 mean and rstd (R,)."""
    R, D = x.shape
    G = a.shape[0]
    y = torch.empty_like(x)
    mean = torch.empty(R, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if R:
        block_d = triton.next_power_of_2(D)
        _forward_kernel[(R,)](x, y, a.float().contiguous(), b.float().contiguous(), mean, rstd, D, R // G, eps,
                              BLOCK_D=block_d, num_warps=_warps(block_d))
    return y, mean, rstd


def backward(dy, x, a, mean, rstd):
    """Returns dx and fp32 (G, D) sum(dy * xh), sum(dy) per group."""
    R, D = x.shape
    G = a.shape[0]
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    rows_per_group = R // G
    progs = max(1, min(rows_per_group, 256 // G))
    rows_per_prog = triton.cdiv(rows_per_group, progs)
    progs = triton.cdiv(rows_per_group, rows_per_prog)
    pa = torch.zeros(G, progs, D, device=x.device, dtype=torch.float32)
    pb = torch.zeros_like(pa)
    if R:
        block_d = triton.next_power_of_2(D)
        _backward_kernel[(G, progs)](dy, x, dx, a.float().contiguous(), mean, rstd, pa, pb, D, rows_per_group,
                                     rows_per_prog, BLOCK_D=block_d, num_warps=_warps(block_d))
    return dx, pa.sum(1), pb.sum(1)
