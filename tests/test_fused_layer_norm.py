"""The Triton perturbed layer norm (under the interpreter on the CPU) against the eager op: output and the
input / coefficient / affine gradients, odd feature counts, several trailing shapes, G = 1 and 2, fp32 and
bf16, plus opcheck of its custom ops."""
import os

import pytest
import torch

from anp_fast import ops
from anp_fast.ops import eager

OP = "perturbed_layer_norm"
pytestmark = pytest.mark.skipif("triton" not in ops.backends(OP), reason="Triton is not installed")
# under the interpreter (conftest, on machines without a GPU) Triton reads CPU tensors; compiled, GPU ones
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def _run(fn, x, shape, scale, shift, cw, cb, dy):
    leaves = [x.clone().requires_grad_(), scale.clone().requires_grad_(), shift.clone().requires_grad_(),
              cw.clone().requires_grad_(), cb.clone().requires_grad_()]
    y = fn(leaves[0], shape, leaves[1], leaves[2], leaves[3], leaves[4], 1e-5)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xshape,shape,groups", [
    ((4, 5, 17), (17,), 2), ((6, 3), (3,), 1), ((2, 7, 64), (64,), 2), ((4, 3, 5, 6), (5, 6), 2),
])
def test_triton_layer_norm_matches_eager(dtype, xshape, shape, groups):
    gen = torch.Generator().manual_seed(sum(xshape))
    feats = 1
    for s in shape:
        feats *= s
    x = torch.randn(xshape, generator=gen, dtype=torch.float64) * 2 + 0.3
    scale = torch.randn(shape, generator=gen, dtype=torch.float64)
    shift = torch.randn(shape, generator=gen, dtype=torch.float64)
    cw = torch.rand(groups, feats, generator=gen, dtype=torch.float64) + 0.5
    cb = torch.rand(groups, feats, generator=gen, dtype=torch.float64) + 0.5
    dy = torch.randn(xshape, generator=gen, dtype=torch.float64)
    xq, dyq = x.to(dtype), dy.to(dtype)
    params = [t.float() for t in (scale, shift, cw, cb)]
    on = lambda ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    ref64 = _run(eager.perturbed_layer_norm, xq.double(), shape, *[p.double() for p in params], dyq.double())
    ref = _run(eager.perturbed_layer_norm, xq, shape, *params, dyq)
    got = [t.cpu() for t in _run(ops.implementation(OP, "triton"), *on([xq]), shape, *on(params), *on([dyq]))]
    floor = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    for name, r64, r, g in zip(["y", "dx", "dscale", "dshift", "dcoef_w", "dcoef_b"], ref64, ref, got):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        eager_err = float((r.double() - r64).abs().max())
        err = float((g.double() - r64).abs().max())
        tol = max(2 * eager_err, floor * max(1.0, float(r64.abs().max())))
        assert err <= tol, f"{name}: error {err:.3g}, eager's {eager_err:.3g}, allowed {tol:.3g}"


def test_layer_norm_opcheck():
    fwd, bwd = ops.custom_ops("triton", OP)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=gen).to(DEVICE).requires_grad_()
    a = (torch.rand(2, 9, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(2, 9, generator=gen).to(DEVICE).requires_grad_()
    torch.library.opcheck(fwd, (x, a, b, 1e-5, "triton"))
    y, mean, rstd = fwd(x.detach(), a.detach(), b.detach(), 1e-5, "triton")
    torch.library.opcheck(bwd, (torch.randn(6, 9, generator=gen).to(DEVICE), x.detach(), a.detach(), mean, rstd,
                                "triton"))
