"""Surgery on every supported architecture: counts, frozen weights, one engine step, gates for norm-free
models, and per-layer views of the flat storage."""
import pytest
import torch
import torch.nn as nn
import torchvision

from anp_fast import ANPConfig, ANPEngine, ModelError, perturb_model
from anp_fast.models import preact_resnet18, resnet18, vgg16_bn

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _norm_channels(model):
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, NORMS) and isinstance(getattr(m, "weight", None), nn.Parameter))


def _vit():
    model = torchvision.models.vit_b_16(image_size=32, num_classes=7)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head: no gradient at all
    return model


MODELS = {
    "cifar_resnet18": (lambda: resnet18(10, 3, 8), (4, 3, 16, 16), 10),
    "preact_resnet18": (lambda: preact_resnet18(10, 3, 8), (4, 3, 16, 16), 10),
    "vgg16_bn": (lambda: vgg16_bn(10, 3, 0.125), (4, 3, 32, 32), 10),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=7), (4, 3, 32, 32), 7),
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=7), (2, 3, 32, 32), 7),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=7), (2, 3, 32, 32), 7),
    "tv_vit_b_16": (_vit, (2, 3, 32, 32), 7),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=7), (2, 3, 32, 32), 7),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_converts_and_steps(name):
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = build()
    pm = perturb_model(model)
    assert pm.policy == "norms"
    assert pm.num_neurons == _norm_channels(model) > 0
    assert not any(p.requires_grad for p in pm.parameters())
    # every norm with a scale became perturbable, nothing else did
    converted = {s.name for s in pm.slots}
    expected = {n for n, m in model.named_modules()
                if isinstance(m, NORMS) and isinstance(getattr(m, "weight", None), nn.Parameter)}
    assert converted == expected
    engine = ANPEngine(model, ANPConfig(batch_size=shape[0]))
    x = torch.randn(shape)
    y = torch.randint(0, classes, (shape[0],))
    loss = engine.step(x, y)
    assert torch.isfinite(loss)
    masks = engine.masks()
    assert sum(m.numel() for m in masks.values()) == pm.num_neurons
    moved = max(float((1 - m).abs().max()) for m in masks.values())
    assert 0 < moved and all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in masks.values())


def test_clean_forward_equals_original():
    """With m = 1 and no noise the perturbable copy computes exactly what the model computes."""
    torch.manual_seed(0)
    for build, shape, _ in (MODELS["cifar_resnet18"], MODELS["tv_convnext_tiny"], MODELS["tv_vit_b_16"]):
        model = build().eval()
        pm = perturb_model(model).eval()
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)
        model.train(), pm.train()
        with torch.no_grad():
            torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)


def test_mask_zero_removes_neuron():
    """Masking a neuron through the flat storage equals zeroing its scale in the model."""
    torch.manual_seed(0)
    model = resnet18(10, 3, 8).eval()
    pm = perturb_model(model).eval()
    slot = pm.slots[3]
    pm.state.mask[slot.offset + 2] = 0
    ref = __import__("copy").deepcopy(model)
    with torch.no_grad():
        dict(ref.named_modules())[slot.name].weight[2] = 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref(x))


class NoNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc1 = nn.Linear(5, 9)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(torch.relu(self.fc1(x.mean((2, 3)))))


def test_norm_free_model_gets_gates():
    torch.manual_seed(0)
    model = NoNorm()
    pm = perturb_model(model)
    assert pm.policy == "gates"
    assert [(s.name, s.size) for s in pm.slots] == [("c1", 6), ("c2", 5), ("fc1", 9)]  # never the head
    assert [s.name for s in perturb_model(model, exclude=["head"]).slots] == ["c1", "c2", "fc1"]
    assert [s.name for s in perturb_model(model, exclude=["c2"]).slots] == ["c1", "fc1"]
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x))
        # a gate value scales the conv output (bias untouched): same as scaling the conv's weight rows
        pm.state.mask[pm.slots[0].offset + 1] = 0.5
        ref = __import__("copy").deepcopy(model)
        ref.c1.weight[1] *= 0.5
        torch.testing.assert_close(pm(x), ref(x))
    engine = ANPEngine(model, ANPConfig(batch_size=3))
    assert torch.isfinite(engine.step(x, torch.tensor([0, 1, 3])))


def test_gates_forced_on_a_norm_model():
    model = resnet18(10, 3, 4)
    pm = perturb_model(model, layers="gates")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [s.name for s in pm.slots] == convs  # all convs; the linear head is left alone
    # its convs have no bias, so nothing reads the bias noise: the step runs (the autograd error seen once),
    # the bias-noise gradient is 0 and the noise stays as drawn
    engine = ANPEngine(model, ANPConfig(layers="gates", batch_size=4))
    drawn = {}

    def draw(w, b, eps):
        engine.draw_noise(w, b, eps)
        drawn["b"] = b.clone()
    engine.noise_init = draw
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(engine.step(x, y))
    assert torch.equal(engine.state.noise_b, drawn["b"]) and float(drawn["b"].abs().max()) > 0
    assert float((1 - engine.state.mask).abs().max()) > 0


def test_nothing_to_perturb_is_a_clear_error():
    with pytest.raises(ModelError, match="nothing to perturb"):
        perturb_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(ModelError, match="nothing to perturb"):
        perturb_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), layers="norms")
    with pytest.raises(ModelError, match="torch.nn.Module"):
        perturb_model("resnet18")
    with pytest.raises(ModelError, match="exclude names modules the model does not have: nope"):
        perturb_model(resnet18(10, 3, 4), exclude=["bn1", "nope"])


def test_flat_storage_views_share_memory():
    pm = perturb_model(resnet18(10, 3, 4))
    views = pm.state.views(pm.state.mask)
    assert sum(v.numel() for v in views.values()) == pm.state.mask.numel()
    for v in views.values():
        assert v.data_ptr() >= pm.state.mask.data_ptr()
        assert v.untyped_storage().data_ptr() == pm.state.mask.untyped_storage().data_ptr()


class MixedNorms(nn.Module):
    """BatchNorm1d, GroupNorm, LayerNorm over two dims, and a norm without affine scale (left alone)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.plain = nn.BatchNorm2d(8, affine=False)
        self.ln = nn.LayerNorm([8, 4, 4])
        self.fc = nn.Linear(8, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.ln(self.plain(torch.relu(self.gn(self.conv(x)))))
        return self.head(torch.relu(self.bn1d(self.fc(x.mean((2, 3))))))


def test_mixed_norm_kinds():
    torch.manual_seed(0)
    model = MixedNorms()
    for m in model.modules():  # non-trivial affine parameters, so a wrong view would show
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.normal_(m.weight, 1, 0.3)
            nn.init.normal_(m.bias, 0, 0.3)
    pm = perturb_model(model)
    assert [(s.name, s.kind, s.size) for s in pm.slots] == [
        ("gn", "group_norm", 8), ("ln", "layer_norm", 128), ("bn1d", "batch_norm", 6)]
    x = torch.randn(5, 3, 4, 4)
    for train in (False, True):  # eval first: a train-mode pass updates the original's running stats
        model.train(train), pm.train(train)
        with torch.no_grad():
            torch.testing.assert_close(pm(x), model(x))
    # a perturbed pass equals the model with scale * (m + d) and shift * (1 + e) written into it
    state = pm.state
    with torch.no_grad():
        state.mask.uniform_(0.2, 1)
        state.noise_w.uniform_(-0.4, 0.4)
        state.noise_b.uniform_(-0.4, 0.4)
        state.use_perturbed()
        ref = __import__("copy").deepcopy(model)
        mods = dict(ref.named_modules())
        for s in pm.slots:
            sl = slice(s.offset, s.offset + s.size)
            w = mods[s.name].weight
            w.mul_((state.mask[sl] + state.noise_w[sl]).view(w.shape))
            mods[s.name].bias.mul_((1 + state.noise_b[sl]).view(w.shape))
        torch.testing.assert_close(pm(x), ref(x))
    engine = ANPEngine(model, ANPConfig(batch_size=5))
    assert torch.isfinite(engine.step(x, torch.tensor([0, 1, 2, 0, 1])))


def test_perturbable_layers_lists_what_surgery_perturbs_without_copying():
    from anp_fast.surgery import perturbable_layers

    for model, layers in ((resnet18(10, 3, 4), "auto"), (resnet18(10, 3, 4), "gates"), (NoNorm(), "auto")):
        assert perturbable_layers(model, layers) == [(s.name, s.size) for s in perturb_model(model, layers).slots]
    with pytest.raises(ModelError, match="nothing to perturb"):
        perturbable_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
