"""The perturbed batch norm with batch statistics over a process group (the global batch of a data-parallel
run): what the op layer runs when a layer passes ``sync``. The kernels know nothing of it.

Forward: each rank's per-channel count, mean and centred sum of squares (fp32; fp64 for fp64) are gathered and
combined in rank order (Chan et al.'s pairwise update: no E[x^2] - E[x]^2 cancellation), giving the global mean and
biased variance. Backward: the gradients reaching the global mean and variance are summed across ranks (the
two per-channel reductions of SyncBatchNorm's backward), then spread back over this rank's images; the rest of
the normalisation is differentiated by autograd as in the eager op, or runs in a fused backend's kernels
(``with_statistics``: normalise with the given global statistics, return the gradients reaching them), which
know nothing of the process group.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .eager import _chunks, _join


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for fp32 and narrower inputs (bf16, fp16), fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


class GlobalMoments(torch.autograd.Function):
    """(mean, biased variance, count) per channel (dim 1) over the images of every rank of ``group``, in
    fp32 (fp64 for fp64 input)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> tuple:
        import torch.distributed as dist

        xf = x.to(_compute_dtype(x))
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        mean = xf.mean(dims)
        m2 = (xf - _channel_view(mean, x)).square().sum(dims)
        packed = torch.cat([mean.new_tensor([float(count)]), mean, m2])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        channels = x.shape[1]
        n_all, mean_all, m2_all = gathered[0][0], gathered[0][1:1 + channels], gathered[0][1 + channels:]
        for part in gathered[1:]:  # rank order: the same result on every rank
            n, mu, m2 = part[0], part[1:1 + channels], part[1 + channels:]
            total = n_all + n
            delta = mu - mean_all
            mean_all = mean_all + delta * (n / total)
            m2_all = m2_all + m2 + delta.square() * (n_all * n / total)
            n_all = total
        var = m2_all / n_all
        ctx.save_for_backward(x, mean_all)
        ctx.total, ctx.group = n_all, group
        ctx.mark_non_differentiable(n_all)
        return mean_all, var, n_all

    @staticmethod
    def backward(ctx, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], _grad_count=None):
        import torch.distributed as dist

        x, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.to(mean.dtype)
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var.to(mean.dtype)
        packed = torch.cat([grad_mean, grad_var])
        dist.all_reduce(packed, group=ctx.group)
        channels = mean.numel()
        g_mean, g_var = packed[:channels], packed[channels:]
        dx = _channel_view(g_mean / ctx.total, x) + (x.to(mean.dtype) - _channel_view(mean, x)) * _channel_view(
            g_var * (2.0 / ctx.total), x)
        return dx.to(x.dtype), None


def perturbed_batch_norm(x: Tensor, scale: Tensor, shift: Optional[Tensor], coef_w: Tensor, coef_b: Tensor,
                         running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                         momentum: float, eps: float, residual: Optional[Tensor] = None, relu: bool = False,
                         group=None, normalise: Optional[Callable] = None) -> Tensor:
    """:func:`anp_fast.ops.eager.perturbed_batch_norm` with each coefficient group's batch statistics taken
    over the same group of every rank of the process ``group`` (running statistics, when given, are updated
    with the global ones, unbiased as torch does). ``normalise``: a fused backend's ``with_statistics`` (the
    kernels normalise with the global statistics and return the gradients reaching them); None, or where it
    declines the input: eager."""
    chunks = _chunks(x, coef_w.shape[0])
    stats = [GlobalMoments.apply(xg, group) for xg in chunks]
    y = None
    if normalise is not None:
        y = normalise(x, scale, shift, coef_w, coef_b, torch.stack([s[0] for s in stats]),
                      torch.stack([s[1] for s in stats]), eps, residual, relu)
    if y is None:
        parts = []
        for g, (xg, (mean, var, _)) in enumerate(zip(chunks, stats)):
            dtype = mean.dtype
            xh = (xg.to(dtype) - _channel_view(mean, xg)) * _channel_view(torch.rsqrt(var + eps), xg)
            w = scale.to(dtype) * coef_w[g] if scale is not None else coef_w[g].to(dtype)
            yg = xh * _channel_view(w, xg)
            if shift is not None:
                yg = yg + _channel_view(shift.to(dtype) * coef_b[g], xg)
            parts.append(yg.to(x.dtype))
        y = _join(parts)
        if residual is not None:
            y = y + residual
        y = torch.relu(y) if relu else y
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            for mean, var, n in stats:
                n = float(n)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (n / max(n - 1, 1))).to(running_var.dtype),
                                                    alpha=momentum)
    return y
