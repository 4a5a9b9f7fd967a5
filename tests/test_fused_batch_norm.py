"""Every fused backend of the perturbed batch norm against the eager op (the specification): output, input /
residual / coefficient / affine gradients and running statistics, over odd shapes, both memory formats, train
and eval, with and without residual and ReLU; plus torch.library.opcheck of each custom op.

Tolerance (issue 4): a backend's error against an fp64 eager run may be at most twice eager's own error at the
test dtype, or a floor relative to the tensor's scale (itself floored at 1) -- whichever is larger. The floor
is 1e-5 in fp32 and one bf16 rounding step (2^-8) in bf16, where eager's own error on a few elements can be
luckily small. The C++ CPU backend runs the full
grid; Triton runs under the interpreter (conftest sets TRITON_INTERPRET=1), so on a thinner grid.
"""
import itertools

import pytest
import torch

from anp_fast import ops
from anp_fast.ops import eager

OP = "perturbed_batch_norm"
AVAILABLE = ops.backends(OP)
ON_CPU = [b for b in ("cpp", "triton") if b in AVAILABLE]  # triton runs on the CPU via the interpreter
if torch.cuda.is_available():
    ON_CPU = [b for b in ON_CPU if b != "triton"]
CUDA = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in AVAILABLE]

SHAPES = [(n, c, hw) for n, c, hw in itertools.product((2, 6), (3, 17, 64), ((1, 1), (7, 7), (5, 13)))]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8}
EPILOGUES = [(False, False), (False, True), (True, True), (True, False)]  # (residual, relu)


def _case(n, c, hw, g, channels_last, residual, training, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + 7919 * n + 31 * c + hw[0] * 5 + hw[1])
    shape = (n, c, *hw)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.7
    t = dict(
        x=x,
        scale=torch.randn(c, generator=gen, dtype=torch.float64),
        shift=torch.randn(c, generator=gen, dtype=torch.float64),
        coef_w=torch.rand(g, c, generator=gen, dtype=torch.float64) + 0.5,
        coef_b=torch.rand(g, c, generator=gen, dtype=torch.float64) + 0.5,
        residual=torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None,
        dy=torch.randn(shape, generator=gen, dtype=torch.float64),
        running_mean=torch.randn(c, generator=gen, dtype=torch.float64),
        running_var=torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
    )
    return t


def _run(fn, t, dtype, channels_last, training, relu):
    """Output, gradients (x, scale, shift, coef_w, coef_b[, residual]) and running stats of one call."""
    mf = torch.channels_last if channels_last else torch.contiguous_format
    act = lambda v: v.to(dtype).contiguous(memory_format=mf).requires_grad_()  # noqa: E731
    par = lambda v: v.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()  # noqa: E731
    x = act(t["x"])
    leaves = [x, par(t["scale"]), par(t["shift"]), par(t["coef_w"]), par(t["coef_b"])]
    residual = act(t["residual"]) if t["residual"] is not None else None
    if residual is not None:
        leaves.append(residual)
    stats_dtype = leaves[1].dtype
    rm, rv = t["running_mean"].to(stats_dtype), t["running_var"].to(stats_dtype)
    y = fn(x, leaves[1], leaves[2], leaves[3], leaves[4], rm, rv, training, 0.1, 1e-5, residual=residual, relu=relu)
    dy = t["dy"].to(dtype).contiguous(memory_format=mf)
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach(), *grads, rm, rv], y


def _assert_matches(fn, t, dtype, channels_last, training, relu, factor=2.0):
    names = ["y", "dx", "dscale", "dshift", "dcoef_w", "dcoef_b"] + (["dresidual"] if t["residual"] is not None else [])
    names += ["running_mean", "running_var"]
    # The fp64 reference sees exactly the values the tested call sees (activations rounded to the test dtype,
    # parameters to fp32): errors then measure each path's arithmetic, not the rounding of its inputs.
    act = ("x", "residual", "dy")
    t = {k: None if v is None else (v.to(dtype) if k in act else v.float()).double() for k, v in t.items()}
    if relu and dtype == torch.bfloat16:
        # Where the pre-activation is within bf16 rounding of 0 the ReLU mask is a coin toss for ANY bf16 path
        # (eager included): no gradient flows from there in this comparison.
        (pre, *_), _ = _run(eager.perturbed_batch_norm, t, torch.float64, channels_last, training, False)
        t = dict(t, dy=t["dy"] * (pre.abs() > 2.0 ** -6 * float(pre.abs().max())))
    ref64, _ = _run(eager.perturbed_batch_norm, t, torch.float64, channels_last, training, relu)
    ref, _ = _run(eager.perturbed_batch_norm, t, dtype, channels_last, training, relu)
    got, y = _run(fn, t, dtype, channels_last, training, relu)
    assert y.dtype == dtype and y.shape == t["x"].shape
    if channels_last and t["x"].shape[2] * t["x"].shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    for name, r64, r, g in zip(names, ref64, ref, got):
        r64 = r64.double()
        eager_err = float((r.double() - r64).abs().max())
        err = float((g.double() - r64).abs().max())
        tol = max(factor * eager_err, FLOOR[dtype] * max(1.0, float(r64.abs().max())))
        assert err <= tol, f"{name}: error {err:.3g} vs fp64, eager's {eager_err:.3g}, allowed {tol:.3g}"


def _grid(shapes, formats=(False, True), groups=(1, 2), modes=(True, False), epilogues=EPILOGUES):
    for (n, c, hw), cl, g, training, (res, relu) in itertools.product(shapes, formats, groups, modes, epilogues):
        if n % g or (training and n // g * hw[0] * hw[1] <= 1):
            continue  # torch refuses batch statistics of a single value
        yield n, c, hw, g, cl, training, res, relu


FULL = list(_grid(SHAPES))
THIN = [case for i, case in enumerate(_grid(SHAPES)) if i % 23 == 0]  # every value of every axis still appears


def _ids(case):
    n, c, hw, g, cl, training, res, relu = case
    return (f"{n}x{c}x{hw[0]}x{hw[1]}-G{g}-{'cl' if cl else 'nchw'}-{'train' if training else 'eval'}"
            f"{'-res' if res else ''}{'-relu' if relu else ''}")


@pytest.mark.parametrize("backend", [b for b in ON_CPU if b == "cpp"])
@pytest.mark.parametrize("case", FULL, ids=_ids)
def test_cpp_matches_eager_fp32(backend, case):
    n, c, hw, g, cl, training, res, relu = case
    t = _case(n, c, hw, g, cl, res, training, torch.float32)
    _assert_matches(ops.implementation(OP, backend), t, torch.float32, cl, training, relu)


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("case", THIN, ids=_ids)
def test_backend_matches_eager_bf16(backend, case):
    n, c, hw, g, cl, training, res, relu = case
    t = _case(n, c, hw, g, cl, res, training, torch.bfloat16, seed=1)
    _assert_matches(ops.implementation(OP, backend), t, torch.bfloat16, cl, training, relu)


@pytest.mark.parametrize("backend", [b for b in ON_CPU if b != "cpp"])
@pytest.mark.parametrize("case", THIN, ids=_ids)
def test_interpreted_backend_matches_eager_fp32(backend, case):
    n, c, hw, g, cl, training, res, relu = case
    t = _case(n, c, hw, g, cl, res, training, torch.float32)
    _assert_matches(ops.implementation(OP, backend), t, torch.float32, cl, training, relu)


def _through_given_statistics(backend):
    """Training mode computed by the backend's ``with_statistics`` from batch statistics taken here, outside the
    kernels (as ``ops.synced`` takes a process group's): equal to the eager training mode, every gradient
    included, only if the gradients reaching the given mean and variance are right."""
    with_statistics = ops.implementation(OP, backend).with_statistics

    def fn(x, scale, shift, coef_w, coef_b, running_mean, running_var, training, momentum, eps, residual=None,
           relu=False):
        g = coef_w.shape[0]
        xs = x.float().reshape(g, x.shape[0] // g, *x.shape[1:]).transpose(1, 2).reshape(g, x.shape[1], -1)
        mean, var = xs.mean(2), xs.var(2, unbiased=False)
        y = with_statistics(x, scale, shift, coef_w, coef_b, mean, var, eps, residual, relu)
        assert y is not None
        n = xs.shape[2]
        with torch.no_grad():
            for k in range(g):
                running_mean.mul_(1 - momentum).add_(mean[k].to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var[k].to(running_var.dtype) * n / (n - 1), alpha=momentum)
        return y
    return fn


@pytest.mark.parametrize("backend,dtype,case", [
    *(("cpp", torch.float32, c) for c in FULL if c[5] and "cpp" in ON_CPU),
    *((b, dt, c) for b in ON_CPU for dt in (torch.float32, torch.bfloat16) for c in THIN if c[5]
      and (b, dt) != ("cpp", torch.float32))], ids=lambda v: _ids(v) if isinstance(v, tuple) else str(v))
def test_given_statistics_match_eager(backend, dtype, case):
    n, c, hw, g, cl, training, res, relu = case
    t = _case(n, c, hw, g, cl, res, training, dtype, seed=2)
    # in bf16 the gradient of x is the kernel's term plus the statistics' term, each rounded to bf16 before
    # autograd adds them (eager rounds once): 3x eager's error allowed there
    _assert_matches(_through_given_statistics(backend), t, dtype, cl, training, relu,
                    3.0 if dtype == torch.bfloat16 else 2.0)


def test_given_statistics_outside_the_kernels_reach_the_eager_path_when_declined():
    """fp64 is no kernel's: ``with_statistics`` declines it (None) and ``ops.synced`` normalises eagerly."""
    for backend in ON_CPU:
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        stats = torch.zeros(1, 3), torch.ones(1, 3)
        assert ops.implementation(OP, backend).with_statistics(x, None, None, torch.ones(1, 3), torch.ones(1, 3),
                                                               *stats, 1e-5) is None


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_eager(backend, dtype):
    for n, c, hw, g, cl, training, res, relu in FULL:
        t = _case(n, c, hw, g, cl, res, training, dtype)
        t = {k: (v.cuda() if v is not None else None) for k, v in t.items()}
        _assert_matches(ops.implementation(OP, backend), t, dtype, cl, training, relu)


@pytest.mark.parametrize("backend", ON_CPU)
def test_non_dense_input_and_odd_gradient_layout(backend):
    fn = ops.implementation(OP, backend)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 10, 5, 6, generator=gen)
    x = base[:, ::2]  # strided channels: neither contiguous nor channels_last
    scale, shift = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    cw = (torch.rand(2, 5, generator=gen) + 0.5).requires_grad_()
    cb = torch.ones(2, 5)
    y = fn(x, scale, shift, cw, cb, None, None, True, 0.0, 1e-5, relu=True)
    ref = eager.perturbed_batch_norm(x, scale, shift, cw, cb, None, None, True, 0.0, 1e-5, relu=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(4, 5, 6, 5, generator=gen).transpose(2, 3)  # a gradient in yet another layout
    torch.testing.assert_close(torch.autograd.grad(y, cw, dy)[0], torch.autograd.grad(ref, cw, dy)[0],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ON_CPU)
def test_unsupported_dtype_falls_back_to_eager(backend):
    fn = ops.implementation(OP, backend)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    cw = torch.ones(1, 3, dtype=torch.float64)
    y = fn(x, w, None, cw, cw, None, None, True, 0.0, 1e-5)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, eager.perturbed_batch_norm(x, w, None, cw, cw, None, None, True, 0.0, 1e-5))


@pytest.mark.parametrize("backend", ON_CPU)
def test_bad_groups_is_a_clear_error(backend):
    fn = ops.implementation(OP, backend)
    x = torch.randn(5, 3, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        fn(x, torch.ones(3), None, torch.ones(2, 3), torch.ones(2, 3), None, None, True, 0.0, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value"):
        fn(x[:2, :, :1, :1], torch.ones(3), None, torch.ones(2, 3), torch.ones(2, 3), None, None, True, 0.0, 1e-5)


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("cl,res,relu,training", [(False, True, True, True), (True, False, True, False),
                                                  (True, True, False, True)])
def test_opcheck(backend, cl, res, relu, training):
    fwd, bwd = ops.custom_ops(backend)
    gen = torch.Generator().manual_seed(11)
    mf = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(4, 5, 3, 2, generator=gen).contiguous(memory_format=mf).requires_grad_()
    a = (torch.rand(2, 5, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(2, 5, generator=gen).requires_grad_()
    r = torch.randn(4, 5, 3, 2, generator=gen).contiguous(memory_format=mf).requires_grad_() if res else None
    mean_in = None if training else torch.randn(5, generator=gen)
    rstd_in = None if training else torch.rand(5, generator=gen) + 0.5
    torch.library.opcheck(fwd, (x, a, b, r, mean_in, rstd_in, relu, training, 1e-5, backend))
    y, mean, rstd, _ = fwd(x.detach(), a.detach(), b.detach(), r, mean_in, rstd_in, relu, training, 1e-5, backend)
    dy = torch.randn(4, 5, 3, 2, generator=gen).contiguous(memory_format=mf)
    saved = [t.detach() for t in (x, y, a, mean, rstd)]
    torch.library.opcheck(bwd, (dy, saved[0], saved[1] if relu else None, *saved[2:], res, relu, training, backend))


def test_one_custom_op_serves_every_backend():
    """Issue 12.1: each fused op is ONE torch.library op; the compiled backends register to it and its last
    argument names the one that runs; an unregistered name is a clear error, not a crash in a kernel."""
    compiled = [b for b in ops.backends(OP) if b != "eager"]
    if not compiled:
        pytest.skip("no compiled backend loaded here")
    pairs = {b: ops.custom_ops(b) for b in compiled}
    assert len({id(f) for f, _ in pairs.values()}) == 1 and len({id(g) for _, g in pairs.values()}) == 1
    fwd, _ = pairs[compiled[0]]
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="no backend 'nope' registered"):
        fwd(x, torch.ones(1, 3), torch.zeros(1, 3), None, None, None, False, True, 1e-5, "nope")
