"""CIFAR-style architectures used by ANP's papers and benchmarks (written for this package)."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class Bottleneck(nn.Module):
    """CIFAR bottleneck (1x1 reduce, 3x3 with the stride, 1x1 expand by 4) with a post-activation residual."""
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, no max-pool); ``width`` is the first stage's channel count (64 published)."""

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.preact = block is PreActBlock
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = None if self.preact else nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2)
        self.linear = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, width)


def resnet50(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR ResNet-50: :class:`Bottleneck` blocks, so the classifier sees ``width * 8 * 4`` features."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """Pre-activation ResNet-18 in BackdoorBench's layout (``models/preact_resnet.py``, after WaNet's): no BN
    after the stem and none after the last stage (the last block's output goes to the average pool as it is),
    1x1-conv shortcuts without BN; its checkpoints load as they are."""
    return ResNet(PreActBlock, [2, 2, 2, 2], num_classes, in_channels, width)


_VGG = {"vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
        "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                  512, 512, 512, 512, "M"]}


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm after every conv (convs with a bias) and one linear classifier: the state_dict
    layout of the published ANP code's ``models/vgg_cifar.py`` (``features.{i}``, ``classifier``), whose
    checkpoints load as they are. At 32x32 its five max-pools leave 1x1, where the average pool (kept so other
    sizes run) changes nothing."""

    def __init__(self, name: str = "vgg16", num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers, c = [], in_channels
        for v in _VGG[name]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(1, int(v * width))
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    return VGG("vgg16", num_classes, in_channels, width)


def vgg19_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    return VGG("vgg19", num_classes, in_channels, width)


def _divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class MobileNetBlock(nn.Module):
    """MobileNetV2 block as the published ANP code writes it (``models/mobilenetv2.py``, after kuangliu's
    pytorch-cifar): 1x1 expansion (also for expansion 1), 3x3 depthwise with the stride, linear 1x1 projection,
    BN after each, ReLU after the first two; at stride 1 a residual (a 1x1 conv + BN when the width changes)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


# (expansion t, channels c, blocks n, first stride s): the published code's CIFAR table (the 24-channel stage
# and the stem at stride 1)
_MOBILENETV2 = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 in the published ANP code's state_dict layout (``conv1``/``bn1``, ``layers.{i}``,
    ``conv2``/``bn2``, ``linear``), so its checkpoints load as they are; ``width`` multiplies every channel
    count (rounded to multiples of 8) except the last conv's 1280, which only grows with ``width > 1``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c = _divisible(32 * width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        blocks = []
        for t, channels, n, s in _MOBILENETV2:
            out = _divisible(channels * width)
            for i in range(n):
                blocks.append(MobileNetBlock(c, out, t, s if i == 0 else 1))
                c = out
        self.layers = nn.Sequential(*blocks)
        last = _divisible(1280 * max(1.0, width))
        self.conv2 = nn.Conv2d(c, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(self.layers(out))))

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width)


class WideBasic(nn.Module):
    """Pre-activation wide basic block (BN-ReLU-conv3x3 twice, dropout between); when the shape changes the
    1x1 shortcut conv reads the activated input, as in the WRN reference code."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """CIFAR WideResNet-``depth``-``widen``: three groups of (depth - 4) / 6 :class:`WideBasic` blocks with
    16k, 32k, 64k channels (strides 1, 2, 2) after a 16-channel 3x3 stem; final BN-ReLU, average pool, linear."""

    def __init__(self, depth: int = 16, widen: int = 1, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        c, groups = 16, []
        for planes, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBasic(c, planes, stride if i == 0 else 1, dropout))
                c = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn_final = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn_final(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn16(num_classes: int = 10, in_channels: int = 3, widen: int = 1, dropout: float = 0.0) -> WideResNet:
    """WideResNet-16-``widen`` (WRN-16-1 by default)."""
    return WideResNet(16, widen, num_classes, in_channels, dropout)
