"""Issue 11: the published ANP code's architectures (csdongxian/ANP_backdoor models/resnet_cifar.py, vgg_cifar.py,
mobilenetv2.py) load into the registry's models as they are. The references below re-implement those files'
structure (module names, layer order, activations, pooling) from their source; each test loads the REFERENCE's
random state_dict into ours (strict: the same key list, the same shapes) and compares the forward to 1e-6."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from anp_fast.archs import build_arch


class RefBasic(nn.Module):
    expansion = 1

    def __init__(self, i, p, s):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, p, 3, s, 1, bias=False), nn.BatchNorm2d(p)
        self.conv2, self.bn2 = nn.Conv2d(p, p, 3, 1, 1, bias=False), nn.BatchNorm2d(p)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if s != 1 or i != p:
            self.shortcut = nn.Sequential(nn.Conv2d(i, p, 1, s, bias=False), nn.BatchNorm2d(p))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, i, p, s):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, p, 1, bias=False), nn.BatchNorm2d(p)
        self.conv2, self.bn2 = nn.Conv2d(p, p, 3, s, 1, bias=False), nn.BatchNorm2d(p)
        self.conv3, self.bn3 = nn.Conv2d(p, 4 * p, 1, bias=False), nn.BatchNorm2d(4 * p)
        self.shortcut = nn.Sequential()
        if s != 1 or i != 4 * p:
            self.shortcut = nn.Sequential(nn.Conv2d(i, 4 * p, 1, s, bias=False), nn.BatchNorm2d(4 * p))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class RefResNet(nn.Module):
    def __init__(self, block, blocks, nc=10):
        super().__init__()
        self.in_planes = 64
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.layer1 = self._layer(block, 64, blocks[0], 1)
        self.layer2 = self._layer(block, 128, blocks[1], 2)
        self.layer3 = self._layer(block, 256, blocks[2], 2)
        self.layer4 = self._layer(block, 512, blocks[3], 2)
        self.linear = nn.Linear(512 * block.expansion, nc)

    def _layer(self, block, p, n, s):
        out = []
        for st in [s] + [1] * (n - 1):
            out.append(block(self.in_planes, p, st))
            self.in_planes = p * block.expansion
        return nn.Sequential(*out)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).view(len(x), -1))


class RefVGG(nn.Module):
    E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]

    def __init__(self, nc=10):
        super().__init__()
        layers, c = [], 3
        for v in self.E:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, nc)

    def forward(self, x):
        return self.classifier(self.features(x).view(len(x), -1))


class RefMBBlock(nn.Module):
    def __init__(self, i, o, e, s):
        super().__init__()
        self.stride, p = s, e * i
        self.conv1, self.bn1 = nn.Conv2d(i, p, 1, bias=False), nn.BatchNorm2d(p)
        self.conv2, self.bn2 = nn.Conv2d(p, p, 3, s, 1, groups=p, bias=False), nn.BatchNorm2d(p)
        self.conv3, self.bn3 = nn.Conv2d(p, o, 1, bias=False), nn.BatchNorm2d(o)
        self.shortcut = nn.Sequential()
        if s == 1 and i != o:
            self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class RefMobileNetV2(nn.Module):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, nc=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        blocks, c = [], 32
        for e, o, n, s in self.cfg:
            for st in [s] + [1] * (n - 1):
                blocks.append(RefMBBlock(c, o, e, st))
                c = o
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, nc)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.avg_pool2d(out, 4).view(len(x), -1))


REFERENCES = {
    "resnet18": lambda: RefResNet(RefBasic, [2, 2, 2, 2]),
    "resnet34": lambda: RefResNet(RefBasic, [3, 4, 6, 3]),
    "resnet50": lambda: RefResNet(RefBottleneck, [3, 4, 6, 3]),
    "vgg19_bn": RefVGG,
    "mobilenetv2": RefMobileNetV2,
}


def _randomise(model):
    """Random weights AND running statistics (eval-mode BN then matters), reproducibly."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name.endswith("weight") and t.dim() > 1:
                    t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


@pytest.mark.parametrize("arch", list(REFERENCES))
def test_published_checkpoint_loads_and_gives_the_same_outputs(arch):
    torch.manual_seed(0)
    ref = REFERENCES[arch]().double().eval()
    _randomise(ref)
    ours = build_arch(arch, num_classes=10).double().eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # the same keys in the same order
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert want.abs().max() > 1e-3  # not a trivially small output
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class RefPreActBlock(nn.Module):  # BackdoorBench models/preact_resnet.py
    expansion = 1

    def __init__(self, i, p, s):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, p, 3, s, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(p), nn.Conv2d(p, p, 3, 1, 1, bias=False)
        if s != 1 or i != p:
            self.shortcut = nn.Sequential(nn.Conv2d(i, p, 1, s, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + short


class RefPreActResNet18(nn.Module):
    def __init__(self, nc=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        layers = []
        for p, s in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks = []
            for st in (s, 1):
                blocks.append(RefPreActBlock(self.in_planes, p, st))
                self.in_planes = p
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, nc)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(len(x), -1))


def test_backdoorbench_preact_resnet18_checkpoint_loads_and_gives_the_same_outputs():
    ref = RefPreActResNet18().double().eval()
    _randomise(ref)
    ours = build_arch("preact_resnet18", num_classes=10).double().eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_backdoorbench_vgg19_bn_is_torchvisions():
    """BackdoorBench builds vgg19_bn as torchvision.models.vgg19_bn(num_classes=...)
    (utils/aggregate_block/model_trainer_generate.py): `--arch tv:vgg19_bn` is that model."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.vgg19_bn(num_classes=10).eval()
    ours = build_arch("tv:vgg19_bn", num_classes=10).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
