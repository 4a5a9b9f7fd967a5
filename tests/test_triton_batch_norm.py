"""The Triton perturbed batch norm (run by the interpreter on the CPU) against the eager op: output,
input/residual/coefficient gradients, over odd shapes, both memory formats, groups, residual and ReLU."""
import itertools

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from anp_fast.ops import eager  # noqa: E402
from anp_fast_kernels import perturbed_batch_norm as tbn  # noqa: E402


def _eager(x, scale, shift, cw, cb, residual, relu, eps):
    y = eager.perturbed_batch_norm(x, scale, shift, cw, cb, None, None, True, 0.0, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


CASES = [(n, c, hw, g, fmt, res, relu)
         for (n, c, hw, g), fmt, (res, relu) in itertools.product(
             [(2, 3, (1, 1), 1), (6, 17, (5, 13), 2), (2, 64, (7, 7), 2), (6, 3, (7, 7), 1)],
             ["nchw", "channels_last"], [(False, False), (True, True), (False, True)])]


@pytest.mark.parametrize("n,c,hw,g,fmt,res,relu", CASES)
def test_triton_matches_eager(n, c, hw, g, fmt, res, relu):
    gen = torch.Generator().manual_seed(n * 1000 + c)
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = (torch.randn(n, c, *hw, generator=gen) * 2 + 0.5).to(memory_format=mf)
    scale, shift = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    cw = torch.rand(g, c, generator=gen) + 0.5
    cb = torch.rand(g, c, generator=gen) + 0.5
    residual = torch.randn(n, c, *hw, generator=gen).to(memory_format=mf) if res else None
    dy = torch.randn(n, c, *hw, generator=gen).to(memory_format=mf)
    eps = 1e-5

    leaves = [t.clone().requires_grad_() for t in (x, cw, cb)] + (
        [residual.clone().requires_grad_()] if res else [])
    y_ref = _eager(leaves[0], scale, shift, leaves[1], leaves[2], leaves[3] if res else None, relu, eps)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)

    y, mean, rstd = tbn.forward(x, scale, shift, cw, cb, residual, relu, eps)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5)
    dx, dres, dcw, dcb = tbn.backward(dy, x, scale, shift, cw, cb, mean, rstd, residual, relu)
    torch.testing.assert_close(dx, grads_ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dcw, grads_ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dcb, grads_ref[2], rtol=1e-5, atol=1e-4)
    if res:
        torch.testing.assert_close(dres, grads_ref[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("g", [1, 2])
def test_triton_running_stats_and_eval(fmt, g):
    gen = torch.Generator().manual_seed(7)
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = (torch.randn(6, 5, 3, 4, generator=gen) * 3 + 1).to(memory_format=mf)
    scale, shift = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    cw, cb = torch.rand(g, 5, generator=gen) + 0.5, torch.rand(g, 5, generator=gen) + 0.5
    rm, rv = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, _, _ = tbn.forward(x, scale, shift, cw, cb, training=True, running_mean=rm, running_var=rv, momentum=0.1)
    y_ref = eager.perturbed_batch_norm(x, scale, shift, cw, cb, rm_ref, rv_ref, True, 0.1, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-5, atol=1e-6)  # updated group after group, like torch
    torch.testing.assert_close(rv, rv_ref, rtol=1e-5, atol=1e-6)
    y_eval, _, _ = tbn.forward(x, scale, shift, cw, cb, training=False, running_mean=rm, running_var=rv)
    ref_eval = eager.perturbed_batch_norm(x, scale, shift, cw, cb, rm, rv, False, 0.1, 1e-5)
    torch.testing.assert_close(y_eval, ref_eval, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_eval, y)  # eval really used the running statistics
