"""Residual-block epilogue fusion and the fused ops inside torch.compile graphs."""
import pytest
import re

import torch
import torch.nn as nn
import torchvision

from anp_fast import ops
from anp_fast.fusion import fuse_blocks
from anp_fast.models import preact_resnet18, resnet18
from anp_fast.surgery import perturb_model


def _grads(pm, x, fused=False):
    pm.state.fused = fused
    mask = pm.state.mask.requires_grad_(True)
    pm.state.use_clean()
    try:
        out = pm(x)
        (g,) = torch.autograd.grad(out.square().sum(), mask)
    finally:
        mask.requires_grad_(False)
    return out.detach(), g


@pytest.mark.parametrize("make,blocks", [
    (lambda: resnet18(num_classes=5, width=8), 8),
    (lambda: preact_resnet18(num_classes=5, width=8), 8),
    (lambda: torchvision.models.resnet18(num_classes=5), 8),
    (lambda: torchvision.models.resnet50(num_classes=5), 16),
])
def test_known_blocks_fuse_and_keep_results(make, blocks):
    torch.manual_seed(0)
    model = make()
    pm = perturb_model(model)
    fused_names = [n for n, m in pm.net.named_modules() if type(m).__name__.startswith("Fused")]
    assert len(fused_names) == blocks
    pm.train()
    x = torch.randn(4, 3, 32, 32)
    # eager ops: the fused block computes the same operations in the same order -> identical outputs
    plain = perturb_model(model)
    for m in plain.net.modules():  # undo the block rewrite on the second copy
        if hasattr(type(m), "_anp_fused_base"):
            m.__class__ = type(m)._anp_fused_base
    plain.train()
    out_f, g_f = _grads(pm, x, fused=False)
    out_p, g_p = _grads(plain, x, fused=False)
    assert torch.equal(out_f, out_p) and torch.equal(g_f, g_p)
    # fused kernels (where built): as close to an fp64 run as eager fp32 is (an untrained deep net whose last
    # stage normalises over 4 values per channel amplifies rounding: ResNet-50 here, ~3% for both, measured)
    if len(ops.backends("perturbed_batch_norm", "cpu")) > 1:
        out_k, g_k = _grads(pm, x, fused=True)
        ref = perturb_model(make().double()).train()
        ref.net.load_state_dict(model.state_dict())
        ref.state.mask = ref.state.mask.double()
        ref.state._ones = ref.state._ones.double()
        out_d, g_d = _grads(ref, x.double(), fused=False)
        for got, eager_, exact in ((out_k, out_p, out_d), (g_k, g_p, g_d)):
            scale = float(exact.abs().max())
            eager_err = float((eager_.double() - exact).abs().max()) / scale
            assert float((got.double() - exact).abs().max()) / scale <= max(2 * eager_err, 1e-5)


def test_custom_forward_or_excluded_norm_is_not_fused():
    class MyBlock(torchvision.models.resnet.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(MyBlock(4, 4), torchvision.models.resnet.BasicBlock(4, 4))
    pm = perturb_model(net, exclude=["1.bn2"])
    assert not any(type(m).__name__.startswith("Fused") for m in pm.net.modules())
    assert fuse_blocks(nn.Sequential(nn.Conv2d(1, 1, 1))) == []


@pytest.mark.skipif(len(ops.backends("perturbed_batch_norm", "cpu")) < 2, reason="no fused CPU kernels built")
def test_fullgraph_compile_keeps_the_fused_ops_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    pm = perturb_model(resnet18(num_classes=5, width=4)).train()
    pm.net.to(memory_format=torch.channels_last)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(pm.net, backend=capture, fullgraph=True)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    mask = pm.state.mask.requires_grad_(True)
    pm.state.use_clean()
    out_c = compiled(x)
    (g_c,) = torch.autograd.grad(out_c.sum(), mask)
    pm.state.use_clean()
    out_e = pm.net(x)
    (g_e,) = torch.autograd.grad(out_e.sum(), mask)
    mask.requires_grad_(False)
    assert len(graphs) == 1  # fullgraph: one graph, no break
    code = graphs[0].code
    calls = re.findall(r"anp_fast\.perturbed_batch_norm\.default\((.*?)\);", code)
    assert len(calls) == 20 and all(c.endswith("'cpp'") for c in calls), calls  # every batch norm, C++ backend
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(g_c, g_e)
