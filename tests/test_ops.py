"""The eager perturbed ops (the specification) against direct torch calls, and the dispatch point."""
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
