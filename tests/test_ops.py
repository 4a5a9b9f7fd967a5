"""The eager perturbed ops (the specification) against direct torch calls, and the dispatch point."""
import os

import pytest
import torch
import torch.nn.functional as F

from anp_fast import ops
from anp_fast.ops import eager


def _coefs(g, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(g, c, generator=gen) + 0.5).requires_grad_(), (torch.rand(g, c, generator=gen) + 0.5).requires_grad_()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_groups_use_their_own_statistics(memory_format):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 3, 4).to(memory_format=memory_format)
    w, b = torch.randn(5), torch.randn(5)
    cw, cb = _coefs(2, 5)
    rm, rv = torch.zeros(5), torch.ones(5)
    y = ops.perturbed_batch_norm(x, w, b, cw, cb, rm, rv, True, 0.1, 1e-5)
    rm2, rv2 = torch.zeros(5), torch.ones(5)
    parts = [F.batch_norm(x[3 * g:3 * g + 3], rm2, rv2, w * cw[g], b * cb[g], True, 0.1, 1e-5) for g in range(2)]
    torch.testing.assert_close(y, torch.cat(parts))
    torch.testing.assert_close(rm, rm2)  # running stats updated group after group
    torch.testing.assert_close(rv, rv2)
    assert not torch.equal(rm, torch.zeros(5))
    # group 0 alone is unaffected by group 1's data
    y0 = ops.perturbed_batch_norm(x[:3], w, b, cw[:1], cb[:1], None, None, True, 0.0, 1e-5)
    torch.testing.assert_close(y[:3], y0)


def test_batch_norm_gradients_reach_coefficients():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 2, 2)
    w, b = torch.randn(3), torch.randn(3)
    cw, cb = _coefs(1, 3)
    y = ops.perturbed_batch_norm(x, w, b, cw, cb, None, None, True, 0.0, 1e-5)
    dy = torch.randn_like(y)
    gw, gb = torch.autograd.grad((y * dy).sum(), (cw, cb))
    xh = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    # y = xh * w * cw + b * cb, so d/dcw = sum(dy * xh) * w and d/dcb = sum(dy) * b
    torch.testing.assert_close(gw[0], (dy * xh).sum((0, 2, 3)) * w)
    torch.testing.assert_close(gb[0], dy.sum((0, 2, 3)) * b)


def test_batch_norm_eval_uses_running_stats():
    x = torch.randn(2, 3, 4, 4)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    w, b = torch.randn(3), torch.randn(3)
    cw, cb = _coefs(1, 3)
    y = ops.perturbed_batch_norm(x, w, b, cw, cb, rm, rv, False, 0.1, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x, rm, rv, w * cw[0], b * cb[0], False, 0.1, 1e-5))


def test_layer_norm_per_feature():
    torch.manual_seed(2)
    x = torch.randn(4, 7, 6)
    w, b = torch.randn(6), torch.randn(6)
    cw, cb = _coefs(2, 6)
    y = ops.perturbed_layer_norm(x, (6,), w, b, cw, cb, 1e-6)
    ref = torch.cat([F.layer_norm(x[2 * g:2 * g + 2], (6,), w * cw[g], b * cb[g], 1e-6) for g in range(2)])
    torch.testing.assert_close(y, ref)
    # multi-dimensional normalized_shape: coefficient rows are flat
    w2 = torch.randn(7, 6)
    cw2, cb2 = _coefs(1, 42)
    y2 = ops.perturbed_layer_norm(x, (7, 6), w2, None, cw2, cb2, 1e-6)
    torch.testing.assert_close(y2, F.layer_norm(x, (7, 6), w2 * cw2[0].view(7, 6), None, 1e-6))


def test_group_norm_and_gate():
    torch.manual_seed(3)
    x = torch.randn(4, 6, 3, 3)
    w, b = torch.randn(6), torch.randn(6)
    cw, cb = _coefs(1, 6)
    torch.testing.assert_close(ops.perturbed_group_norm(x, 3, w, b, cw, cb, 1e-5),
                               F.group_norm(x, 3, w * cw[0], b * cb[0], 1e-5))
    torch.testing.assert_close(ops.perturbed_channel_gate(x, b, cw, cb, 1),
                               x * cw[0].view(1, 6, 1, 1) + (b * cb[0]).view(1, 6, 1, 1))
    z = torch.randn(5, 2, 6)
    torch.testing.assert_close(ops.perturbed_channel_gate(z, None, cw, cb, -1), z * cw[0])


def test_dispatch_prefers_registered_backend_and_env_forces(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        return eager.perturbed_group_norm(*args, **kwargs)

    saved = dict(ops._REGISTRY["perturbed_group_norm"])
    try:
        ops.register("perturbed_group_norm", "fake", fake)
        assert ops.backends("perturbed_group_norm")[0] == "fake"
        x, w = torch.randn(2, 4, 3), torch.randn(4)
        cw, cb = _coefs(1, 4)
        ops.perturbed_group_norm(x, 2, w, None, cw, cb, 1e-5)
        assert calls == [1]
        monkeypatch.setenv("ANP_FAST_BACKEND", "eager")
        ops.perturbed_group_norm(x, 2, w, None, cw, cb, 1e-5)
        assert calls == [1]
    finally:
        ops._REGISTRY["perturbed_group_norm"] = saved


def test_missing_cpp_library_warns_once_and_runs_eagerly(monkeypatch):
    from anp_fast.ops import loaders

    ops.backends("perturbed_batch_norm")  # load whatever is built
    table = {k: v for k, v in ops._REGISTRY["perturbed_batch_norm"].items() if k != "cpp"}
    monkeypatch.setitem(ops._REGISTRY, "perturbed_batch_norm", table)
    monkeypatch.setattr(ops, "_cpp_error", ImportError("no module named anp_fast._cpu_kernels"))
    monkeypatch.setattr(loaders, "_warned", set())
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels are not built .*no module named"):
        fn = ops.resolve("perturbed_batch_norm", "cpu")
    assert fn is eager.perturbed_batch_norm
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert ops.resolve("perturbed_batch_norm", "cpu") is eager.perturbed_batch_norm


def test_unknown_backend_name_raises_naming_the_valid_ones(monkeypatch):
    x = torch.randn(4, 3, 5, 5)
    w, b = torch.ones(3), torch.zeros(3)
    monkeypatch.setenv("ANP_FAST_BACKEND", "cpu_fast")
    with pytest.raises(ValueError, match=r"ANP_FAST_BACKEND='cpu_fast': unknown backend; valid: eager, cpp, cuda, "
                                         r"triton"):
        ops.resolve("perturbed_batch_norm", "cpu")


def test_requested_but_missing_backend_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(ops, "_missing", {**ops._missing, "cuda": ImportError("No module named anp_fast._cuda")})
    monkeypatch.setenv("ANP_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"ANP_FAST_BACKEND='cuda' was requested but that backend did not load "
                                           r"here \(ImportError: No module named anp_fast._cuda\)"):
        ops.resolve("perturbed_batch_norm", "cuda")


def test_only_not_built_counts_as_missing(monkeypatch):
    """ImportError/OSError: not built (skipped); any other error while loading a backend is a bug: it propagates."""
    import importlib

    from anp_fast.ops import loaders

    def broken(name):
        raise ZeroDivisionError("a bug in the extension's import")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ZeroDivisionError):
        loaders.cpp_kernels()

    def absent(name):
        raise ImportError(f"No module named {name}")

    monkeypatch.setattr(importlib, "import_module", absent)
    kernels, err = loaders.cpp_kernels()
    assert kernels is None and isinstance(err, ImportError)


def test_cuda_backend_does_not_claim_fp16(monkeypatch):
    """The CUDA source rejects float16 (TORCH_CHECK float32/bfloat16): the backend must not claim it, so fp16 input
    falls back to eager instead of raising on a GPU."""
    import importlib
    import types

    from anp_fast.ops import loaders

    monkeypatch.setattr(importlib, "import_module", lambda name: types.ModuleType(name))
    ext, err = loaders.cuda_kernels()
    assert err is None

    class FakeCuda:  # what supports() reads of a tensor
        def __init__(self, dtype):
            self.device, self.dtype = types.SimpleNamespace(type="cuda"), dtype

        def dim(self):
            return 4

        def numel(self):
            return 8

    assert ext.supports(FakeCuda(torch.float32)) and ext.supports(FakeCuda(torch.bfloat16))
    assert not ext.supports(FakeCuda(torch.float16))


@pytest.mark.skipif(os.environ.get("ANP_FAST_BUILD_CPP") == "0", reason="ANP_FAST_BUILD_CPP=0: built without C++")
def test_cpp_backend_is_built_and_used_on_the_cpu():
    """Unless the build was told not to, the C++ CPU kernels are there and are what a CPU batch norm runs."""
    assert "cpp" in ops.backends("perturbed_batch_norm", "cpu"), f"C++ kernels not built: {ops._cpp_error}"
    assert ops.resolve("perturbed_batch_norm", "cpu") is ops.implementation("perturbed_batch_norm", "cpp")


_VARIANT_PROBE = """
import torch
from anp_fast import ops
from anp_fast.ops import eager, loaders
g = torch.Generator().manual_seed(0)
x = torch.randn(6, 5, 7, 3, generator=g).contiguous(memory_format=torch.channels_last)
w, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
cw, cb = torch.rand(1, 5, generator=g) + 0.5, torch.rand(1, 5, generator=g) + 0.5
fused = ops.resolve("perturbed_batch_norm", "cpu")
assert fused is ops.implementation("perturbed_batch_norm", "cpp")
args = (x, w, b, cw, cb, None, None, True, 0.1, 1e-5, None, True)
err = (fused(*args) - eager.perturbed_batch_norm(*args)).abs().max().item()
print(loaders.cpu_variant, err)
"""


@pytest.mark.skipif(os.environ.get("ANP_FAST_BUILD_CPP") == "0", reason="ANP_FAST_BUILD_CPP=0: built without C++")
def test_cpu_build_variants_dispatch_at_runtime():
    """The portable build and the x86-64-v3/v4 builds each load when forced and agree with the eager op; unforced,
    the best build this CPU runs is chosen; an unknown variant name raises naming the valid ones."""
    import subprocess
    import sys
    from anp_fast.ops import loaders

    def probe(variant):
        env = {k: v for k, v in os.environ.items() if k != "ANP_FAST_CPU_VARIANT"}
        if variant:
            env["ANP_FAST_CPU_VARIANT"] = variant
        return subprocess.run([sys.executable, "-c", _VARIANT_PROBE], env=env, capture_output=True, text=True,
                              timeout=120)

    built = [v for v, name, cap in loaders.CPU_VARIANTS if loaders._import(name)[0] is not None]
    assert "baseline" in built
    runnable = [v for v, _, cap in loaders.CPU_VARIANTS if v in built and loaders._cpu_runs(cap)]
    for variant in runnable:
        r = probe(variant)
        assert r.returncode == 0, r.stderr
        name, err = r.stdout.split()
        assert name == variant and float(err) < 1e-5
    r = probe(None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == runnable[0]  # CPU_VARIANTS is best first
    r = probe("avx9000")
    assert r.returncode != 0 and "ANP_FAST_CPU_VARIANT='avx9000': valid: v4, v3, baseline" in r.stderr
