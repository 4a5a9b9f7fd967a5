"""Backdoor attacks used to evaluate ANP: BadNets (a fixed patch in a corner) and Blend (the image blended
with a fixed pattern). Images are float tensors in [0, 1], (N, C, H, W)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from .errors import ConfigError


class Trigger:
    name = "trigger"

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass
class BadNets(Trigger):
    """A ``size`` x ``size`` checkerboard (1/0) stamped in the bottom-right corner, ``margin`` pixels in."""

    size: int = 3
    margin: int = 1
    name: str = "badnets"

    def pattern(self) -> Tensor:
        i = torch.arange(self.size)
        return ((i[:, None] + i[None, :]) % 2 == 0).float()

    def apply(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.size + self.margin > min(h, w):
            raise ConfigError(f"a {self.size}px BadNets patch does not fit {h}x{w} images")
        out = x.clone()
        r0, c0 = h - self.margin - self.size, w - self.margin - self.size
        out[..., r0:r0 + self.size, c0:c0 + self.size] = self.pattern().to(x)
        return out


@dataclass
class Blend(Trigger):
    """x' = (1 - alpha) x + alpha * pattern, the pattern a fixed uniform-noise image drawn from ``seed``."""

    alpha: float = 0.2
    seed: int = 1234
    name: str = "blend"

    def apply(self, x: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        pattern = torch.rand(x.shape[-3:], generator=g).to(x)
        return (1 - self.alpha) * x + self.alpha * pattern


def make_trigger(name: str, **kwargs) -> Trigger:
    table = {"badnets": BadNets, "blend": Blend}
    if name not in table:
        raise ConfigError(f"unknown trigger {name!r}; known: {', '.join(table)}")
    return table[name](**kwargs)


def poison(x: Tensor, y: Tensor, trigger: Trigger, target: int, rate: float, seed: int = 0
           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Poison a fraction ``rate`` of the training set: stamp the trigger on images whose label is not the
    target and relabel them ``target``. Returns (x, y, indices poisoned); the inputs are not modified."""
    if not 0 <= rate <= 1:
        raise ConfigError(f"poisoning rate {rate} must be in [0, 1]")
    candidates = (y != target).nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    count = min(len(candidates), round(rate * len(y)))
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:count]]
    x, y = x.clone(), y.clone()
    x[chosen] = trigger.apply(x[chosen])
    y[chosen] = target
    return x, y, chosen


def triggered_test_set(x: Tensor, y: Tensor, trigger: Trigger, target: int) -> Tuple[Tensor, Tensor]:
    """The ASR set: test images whose true label is not the target, with the trigger applied."""
    keep = y != target
    return trigger.apply(x[keep]), y[keep]


@dataclass
class ImageTrigger(Trigger):
    """A user's trigger picture: stamped in the bottom-right corner (``margin`` pixels in) when smaller than the
    images, blended with weight ``alpha`` when it has their size. ``pattern``: (C, h, w) in [0, 1]."""

    pattern: Tensor = None
    alpha: float = 0.2
    margin: int = 1
    name: str = "image"

    @classmethod
    def from_file(cls, path: str, image_shape) -> "ImageTrigger":
        from PIL import Image, UnidentifiedImageError

        channels, h, w = image_shape
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.width > w or img.height > h:
                    raise ConfigError(f"trigger image {path} is {img.width}x{img.height}, larger than the "
                                      f"{w}x{h} images")
                data = torch.tensor(list(img.getdata()), dtype=torch.float32) / 255
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read the trigger image {path}: {exc}") from exc
        pattern = data.view(img.height, img.width, -1).permute(2, 0, 1).contiguous()
        return cls(pattern=pattern)

    def apply(self, x: Tensor) -> Tensor:
        p = self.pattern.to(x)
        h, w = x.shape[-2:]
        ph, pw = p.shape[-2:]
        if (ph, pw) == (h, w):
            return (1 - self.alpha) * x + self.alpha * p
        if ph + self.margin > h or pw + self.margin > w:
            raise ConfigError(f"a {pw}x{ph} trigger does not fit {w}x{h} images")
        out = x.clone()
        r0, c0 = h - self.margin - ph, w - self.margin - pw
        out[..., r0:r0 + ph, c0:c0 + pw] = p
        return out
