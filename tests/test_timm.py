"""timm models (an optional test dependency, in the test extra): surgery finds every norm layer (or, in the
normalisation-free nets, gates every conv), the perturbable copy computes the model's outputs with clean
coefficients, one ANP step runs, and pruning by the learned masks gives a model of the same output shape."""
import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from anp_fast import ANPConfig, ANPEngine, prune  # noqa: E402
from anp_fast.surgery import perturb_model  # noqa: E402

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
# name -> input side (the ViT-family models are built for 224 and take no other size)
MODELS = {
    "resnet18": 32, "efficientnet_b0": 32, "mobilenetv3_small_050": 32, "convnext_atto": 32,
    "vit_tiny_patch16_224": 224, "regnetx_002": 32, "densenet121": 32, "ghostnet_050": 32, "rexnet_100": 32,
    "poolformer_s12": 32, "mobilevit_xxs": 64, "resnetv2_50x1_bit": 32, "levit_128s": 224,
    "nf_resnet26": 32, "nfnet_f0": 64,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_surgery_step_and_prune(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    side = MODELS[name]
    x = torch.randn(2, 3, side, side)
    pm = perturb_model(model).eval()
    norms = [m for m in model.modules() if isinstance(m, NORMS) and isinstance(getattr(m, "weight", None),
                                                                                 nn.Parameter)]
    if norms:
        assert pm.policy == "norms"
        assert pm.num_neurons == sum(m.weight.numel() for m in norms)  # every affine norm, nothing else
    else:  # normalisation-free: EVERY conv gated (timm's ScaledStdConv2d/Conv2dSame subclasses included)
        convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        assert pm.policy == "gates" and convs <= {s.name for s in pm.slots}
        assert pm.num_neurons == sum(dict(model.named_modules())[s.name].weight.shape[0] for s in pm.slots)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-4, atol=1e-5)
    engine = ANPEngine(model, ANPConfig(batch_size=2))
    assert torch.isfinite(engine.step(x, torch.tensor([0, 1])))
    masks = engine.masks()
    pruned = prune(model, masks, fraction=0.1)
    with torch.no_grad():
        assert pruned(x).shape == (2, 5)
