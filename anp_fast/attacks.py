"""Backdoor attacks used to evaluate defenses, each with its published trigger rule. Images are float tensors
in [0, 1], (N, C, H, W); triggers act in that pixel space, before any normalisation.

- ``badnets``: a checkerboard patch stamped in the bottom-right corner (Gu et al. 2017); dirty label.
- ``patch``: a Trojan-style patch of fixed random values (the fixed "Trojan square" of the NAD/ABL/RNP code, a
  seeded random pattern here), pasted in the bottom-right corner; dirty label.
- ``blend``: the image blended with a fixed uniform-noise pattern, weight ``alpha`` (Chen et al. 2017); dirty
  label.
- ``sig``: a horizontal sinusoid ``x + delta * sin(2 pi j f / W)`` added and clipped (Barni et al. 2019,
  BackdoorBench's delta 40/255, f 6); CLEAN label: only target-class images are poisoned, labels kept.
- ``wanet``: a smooth fixed warping field (Nguyen & Tran 2021: k x k uniform noise normalised by its mean
  absolute value, bicubic upsampling, ``identity + s * noise / H``, clamped, ``grid_sample`` with
  align_corners) on dirty-labelled images, plus ``cross_ratio`` times as many "noise mode" images warped by the
  field plus per-image random noise (``/ H``) that keep their true labels.

The poisoning rate is always the number of poisoned images over ALL training images (as BackdoorBench
defines it, also for the clean-label SIG). Poisoned training sets are made once, statically (WaNet's
reference code re-draws its noise-mode images every batch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError


@dataclass
class Poisoned:
    """A poisoned training set: images, labels, the indices given the backdoor and (WaNet) the indices of the
    noise-mode images that keep their labels."""

    x: Tensor
    y: Tensor
    poisoned: Tensor
    noise: Tensor


class Trigger:
    """A trigger and its poisoning rule. ``apply`` stamps the test-time trigger; ``poison`` makes a training
    set (dirty label by default: non-target images triggered and relabelled to the target)."""

    name = "trigger"
    clean_label = False

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        return ((y == target) if self.clean_label else (y != target)).nonzero().flatten()

    def poison(self, x: Tensor, y: Tensor, target: int, rate: float, seed: int = 0) -> Poisoned:
        """Poison ``rate`` of ALL training images (capped by the candidates: non-target images, or the target
        class for a clean-label trigger). The inputs are not modified."""
        if not 0 <= rate <= 1:
            raise ConfigError(f"poisoning rate {rate} must be in [0, 1]")
        candidates = self._candidates(y, target)
        g = torch.Generator().manual_seed(seed)
        order = candidates[torch.randperm(len(candidates), generator=g)]
        chosen = order[:min(len(candidates), round(rate * len(y)))]
        x, y = x.clone(), y.clone()
        if len(chosen):
            x[chosen] = self.apply(x[chosen])
        if not self.clean_label:
            y[chosen] = target
        return Poisoned(x, y, chosen, torch.zeros(0, dtype=torch.long))

    def describe(self) -> Dict:
        """The trigger's name and parameters (for reports)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not f.name.startswith("_")} if dataclasses.is_dataclass(self) else {}
        return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)) for k, v in fields.items()}


def _corner(x: Tensor, patch: Tensor, margin: int, what: str) -> Tensor:
    """``patch`` ((C or 1), ph, pw) pasted into the bottom-right corner of every image, ``margin`` px in."""
    h, w = x.shape[-2:]
    ph, pw = patch.shape[-2:]
    if ph + margin > h or pw + margin > w:
        raise ConfigError(f"a {pw}x{ph} {what} (margin {margin}) does not fit {w}x{h} images")
    out = x.clone()
    r0, c0 = h - margin - ph, w - margin - pw
    out[..., r0:r0 + ph, c0:c0 + pw] = patch.to(x)
    return out


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
        return _corner(x, self.pattern(), self.margin, "BadNets patch")


@dataclass
class RandomPatch(Trigger):
    """A Trojan-style patch: ``size`` x ``size`` fixed random values per channel (uniform in [0, 1], drawn from
    ``seed``), pasted in the bottom-right corner ``margin`` pixels in."""

    size: int = 3
    margin: int = 1
    seed: int = 4321
    name: str = "patch"

    def pattern(self, channels: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(channels, self.size, self.size, generator=g)

    def apply(self, x: Tensor) -> Tensor:
        return _corner(x, self.pattern(x.shape[-3]), self.margin, "patch trigger")


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


@dataclass
class SIG(Trigger):
    """x' = clip(x + delta * sin(2 pi j f / W), 0, 1), j the column: vertical stripes, ``f`` periods across the
    width, the same on every row and channel. Clean label. Defaults: BackdoorBench's (delta 40 of 255, f 6,
    the same at training and test time); ``test_delta`` gives the test-time trigger its own amplitude (Barni
    et al. test with a stronger signal than they train with)."""

    delta: float = 40 / 255
    f: float = 6
    test_delta: Optional[float] = None
    name: str = "sig"
    clean_label = True

    def _signal(self, x: Tensor, delta: float) -> Tensor:
        w = x.shape[-1]
        j = torch.arange(w, dtype=torch.float64)
        return (x + (delta * torch.sin(2 * torch.pi * j * self.f / w)).to(x)).clamp(0, 1)

    def apply(self, x: Tensor) -> Tensor:
        return self._signal(x, self.delta if self.test_delta is None else self.test_delta)

    def poison(self, x: Tensor, y: Tensor, target: int, rate: float, seed: int = 0) -> Poisoned:
        train = dataclasses.replace(self, test_delta=None)  # training images get ``delta``
        return Trigger.poison(train, x, y, target, rate, seed)


@dataclass
class WaNet(Trigger):
    """The warping trigger: a fixed smooth field ``clamp((identity + s * noise / H) * grid_rescale, -1, 1)``,
    ``noise`` = k x k uniform(-1, 1) (drawn from ``seed``) over its mean absolute value, upsampled bicubic with
    align_corners. Training adds ``cross_ratio`` x (poisoned count) noise-mode images warped by the field plus
    uniform(-1, 1) / H per pixel, with their true labels. Defaults are the reference code's (k 4, s 0.5, grid
    rescale 1, cross ratio 2)."""

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    seed: int = 2021
    name: str = "wanet"
    _grids: Dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def grid(self, h: int, w: int) -> Tensor:
        key = (h, w, self.k, self.s, self.grid_rescale, self.seed)
        if key not in self._grids:
            self._grids[key] = self._make_grid(h, w)
        return self._grids[key]

    def _make_grid(self, h: int, w: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((cols, rows), 2)[None]  # grid_sample wants (x = column, y = row)
        return ((identity + self.s * noise / h) * self.grid_rescale).clamp(-1, 1)

    def _warp(self, x: Tensor, grid: Tensor) -> Tensor:
        return F.grid_sample(x, grid.to(x), align_corners=True).clamp(0, 1)

    def apply(self, x: Tensor) -> Tensor:
        return self._warp(x, self.grid(*x.shape[-2:]).expand(x.shape[0], -1, -1, -1))

    def apply_noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The noise mode: the field plus per-image random noise; these images keep their labels."""
        h, w = x.shape[-2:]
        jitter = torch.rand(x.shape[0], h, w, 2, generator=generator) * 2 - 1
        return self._warp(x, (self.grid(h, w) + jitter / h).clamp(-1, 1))

    def poison(self, x: Tensor, y: Tensor, target: int, rate: float, seed: int = 0) -> Poisoned:
        out = super().poison(x, y, target, rate, seed)
        taken = torch.zeros(len(y), dtype=torch.bool)
        taken[out.poisoned] = True
        g = torch.Generator().manual_seed(seed + 1)
        free = (~taken).nonzero().flatten()
        free = free[torch.randperm(len(free), generator=g)]
        noise = free[:min(len(free), round(self.cross_ratio * len(out.poisoned)))]
        if len(noise):
            out.x[noise] = self.apply_noise(x[noise], g)
        return Poisoned(out.x, out.y, out.poisoned, noise)


@dataclass
class ImageTrigger(Trigger):
    """A user's trigger picture (``image:path=FILE,alpha=A,row=R,col=C``, or just the file's name): blended with
    weight ``alpha`` (default 0.2) when it has the images' size; otherwise stamped with its top-left corner at
    (``row``, ``col``) (default: the bottom-right corner, ``margin`` pixels in) with weight ``alpha`` (default 1:
    pasted). ``pattern``: (C, h, w) in [0, 1]."""

    pattern: Tensor = None
    alpha: Optional[float] = None
    margin: int = 1
    row: int = -1
    col: int = -1
    path: str = ""
    name: str = "image"

    @classmethod
    def from_file(cls, path: str, image_shape, **options) -> "ImageTrigger":
        from PIL import Image, UnidentifiedImageError

        if image_shape is None:
            raise ConfigError("an image trigger needs the images' shape")
        channels, h, w = image_shape
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.width > w or img.height > h:
                    raise ConfigError(f"trigger image {path} is {img.width}x{img.height}, larger than the "
                                      f"{w}x{h} images")
                data = torch.from_numpy(__import__("numpy").array(img, dtype="uint8")).float() / 255
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read the trigger image {path}: {exc}") from exc
        pattern = data.view(img.height, img.width, -1).permute(2, 0, 1).contiguous()
        return cls(pattern=pattern, path=path, **options)

    def apply(self, x: Tensor) -> Tensor:
        p = self.pattern.to(x)
        h, w = x.shape[-2:]
        ph, pw = p.shape[-2:]
        if (ph, pw) == (h, w) and self.row < 0 and self.col < 0:
            a = 0.2 if self.alpha is None else self.alpha
            return (1 - a) * x + a * p
        a = 1.0 if self.alpha is None else self.alpha
        r = h - self.margin - ph if self.row < 0 else self.row
        c = w - self.margin - pw if self.col < 0 else self.col
        if r < 0 or c < 0 or r + ph > h or c + pw > w:
            raise ConfigError(f"a {pw}x{ph} trigger at row {r}, column {c} does not fit {w}x{h} images")
        out = x.clone()
        out[..., r:r + ph, c:c + pw] = (1 - a) * x[..., r:r + ph, c:c + pw] + a * p
        return out

    def describe(self) -> Dict:
        return {"name": self.name, "path": self.path, "alpha": self.alpha, "row": self.row, "col": self.col,
                "margin": self.margin, "size": list(self.pattern.shape)}


@dataclass
class PublishedBlend(Trigger):
    """The published code's Blend (``gaussian_noise``: its ``data/cifar_gaussian_noise.png`` over the whole
    image, mask 1; give the file as ``image=PATH``) with its ``--trigger-alpha`` (``alpha``), computed by its
    uint8 rule (:func:`_uint8_blend`)."""

    image: str = ""
    alpha: float = 0.2
    name: str = "published-blend"

    def apply(self, x: Tensor) -> Tensor:
        from PIL import Image, UnidentifiedImageError
        import numpy as np

        c, h, w = x.shape[-3:]
        if not self.image:
            raise ConfigError(f"trigger {self.name} needs image=PATH (the published data/cifar_gaussian_noise.png)")
        try:
            with Image.open(self.image) as img:
                arr = np.array(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read the trigger image {self.image}: {exc}") from None
        arr = arr[..., None] if arr.ndim == 2 else arr[..., :3]
        if arr.shape[:2] != (h, w) or arr.shape[2] not in (1, c):
            raise ConfigError(f"trigger image {self.image} is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]}, the "
                              f"images {w}x{h}x{c}: the published blend needs the images' size")
        pattern = torch.from_numpy(arr).permute(2, 0, 1).double()
        return _uint8_blend(x, pattern, torch.ones(1, h, w, dtype=torch.float64), self.alpha)


_CHECKER_VALUES = ((0, 0, 255), (0, 255, 0), (255, 0, 255))  # the published 3x3 trigger, uint8


def _uint8_blend(x: Tensor, pattern: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """The published code's trigger rule on uint8 pixels: ``(1 - m) x + m ((1 - alpha) x + alpha p)``, clipped
    and truncated to uint8 (``x`` in [0, 1]; ``pattern`` in 0-255 and ``mask`` broadcast over (C, H, W))."""
    orig = (x.double() * 255).round()
    out = (1 - mask) * orig + mask * ((1 - alpha) * orig + alpha * pattern)
    return (out.clamp(0, 255).floor() / 255).to(x.dtype)


@dataclass
class TriggerInfo(Trigger):
    """A trigger read from the published code's ``trigger_info.th`` (:func:`anp_fast.checkpoint.load_trigger_info`):
    its ``trigger_pattern`` and ``trigger_mask`` ((1, H, W, C) uint8, C 1 or the images' channels) and
    ``trigger_alpha``, applied by its rule (:func:`_uint8_blend`)."""

    pattern: Optional[Tensor] = None  # (C, H, W), 0-255
    mask: Optional[Tensor] = None
    alpha: float = 1.0
    source: str = ""
    name: str = "trigger-info"

    def apply(self, x: Tensor) -> Tensor:
        c, h, w = x.shape[-3:]
        if self.pattern.shape[-2:] != (h, w) or self.pattern.shape[0] not in (1, c):
            raise ConfigError(f"{self.source}: its trigger is {tuple(self.pattern.shape)} (C, H, W), the images "
                              f"are {(c, h, w)}")
        return _uint8_blend(x, self.pattern.double(), self.mask.double(), self.alpha)

    def describe(self) -> Dict:
        return {"name": self.name, "source": self.source, "alpha": self.alpha,
                "pixels": int((self.mask != 0).any(0).sum())}


@dataclass
class PublishedCheckerboard(Trigger):
    """The published ANP code's BadNets triggers (csdongxian/ANP_backdoor, ``data/poison_cifar.py``), exactly:
    ``corners=1`` is its ``checkerboard_1corner`` (3x3 values 0/255 centred on row/column 30 of a 32x32 image,
    i.e. rows/columns 29-31, the same in every channel; ``--poison-type badnets``), ``corners=4`` its
    ``checkerboard_4corner`` (that pattern at all four corners, mirrored left-right on the left side;
    ``clean-label``'s trigger). ``alpha``: its ``--trigger-alpha``, computed as it does on uint8 pixels
    (``(1 - alpha) x + alpha p``, clipped and truncated to uint8). Other image sizes: the same offsets from the
    borders (row/column H-2 and 1)."""

    corners: int = 1
    alpha: float = 1.0
    name: str = "published-badnets"

    def pattern_and_mask(self, h: int, w: int) -> Tuple[Tensor, Tensor]:
        pattern = torch.zeros(h, w, dtype=torch.float64)
        mask = torch.zeros(h, w, dtype=torch.float64)
        values = torch.tensor(_CHECKER_VALUES, dtype=torch.float64)
        rows = [h - 2] if self.corners == 1 else [1, h - 2]
        for r in rows:
            pattern[r - 1:r + 2, w - 3:w] = values
            mask[r - 1:r + 2, w - 3:w] = 1
            if self.corners == 4:
                pattern[r - 1:r + 2, 0:3] = values.flip(1)  # its [h + 1][-w - 2]: columns mirrored
                mask[r - 1:r + 2, 0:3] = 1
        return pattern, mask

    def apply(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h < 6 or w < 6:
            raise ConfigError(f"trigger {self.name}: images of {w}x{h} are too small (6x6 at least)")
        pattern, mask = self.pattern_and_mask(h, w)
        return _uint8_blend(x, pattern, mask, self.alpha)


@dataclass
class PublishedFourCorner(PublishedCheckerboard):
    """``checkerboard_4corner`` of the published code (see :class:`PublishedCheckerboard`)."""

    corners: int = 4
    name: str = "published-4corner"


@dataclass
class BackdoorBenchBadNets(Trigger):
    """BackdoorBench's BadNets (``resource/badnet/trigger_image.png`` from ``generate_white_square.py``: a
    ``size`` x ``size`` white square ``distance`` pixels from the bottom-right corner, 3 and 0 by default, i.e.
    rows/columns 29-31 of a 32x32 image, every channel 255), applied as its ``AddMaskPatchTrigger``: pixels under
    the square set to 255. (For other image sizes BackdoorBench resizes its 32x32 picture; here the square keeps
    its size.)"""

    size: int = 3
    distance: int = 0
    name: str = "backdoorbench-badnets"

    def apply(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.size + self.distance > min(h, w):
            raise ConfigError(f"trigger {self.name}: a {self.size}-pixel square {self.distance} px in does not fit "
                              f"{w}x{h} images")
        out = x.clone()
        r1, c1 = h - self.distance, w - self.distance
        out[..., r1 - self.size:r1, c1 - self.size:c1] = 1.0
        return out


@dataclass
class BackdoorBenchBlended(Trigger):
    """BackdoorBench's Blended (``config/attack/blended/default.yaml``: ``hello_kitty.jpeg`` at alpha 0.2 for
    training and test): the picture ``image`` (give the file: it is not shipped) resized to the images' size
    (bilinear, as torchvision's Resize on a PIL image) and blended on uint8 pixels as its
    ``blendedImageAttack``: ``(1 - alpha) x + alpha p``, clipped and truncated to uint8."""

    image: str = ""
    alpha: float = 0.2
    name: str = "backdoorbench-blended"

    def _pattern(self, c: int, h: int, w: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        if not self.image:
            raise ConfigError(f"trigger {self.name} needs image=PATH (BackdoorBench's resource/blended/"
                              "hello_kitty.jpeg, or another picture)")
        try:
            with Image.open(self.image) as img:
                img = img.convert("RGB").resize((w, h), Image.BILINEAR)
                data = torch.from_numpy(__import__("numpy").array(img, dtype="uint8")).permute(2, 0, 1)
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read the trigger image {self.image}: {exc}") from None
        # ToTensor() then * 255, in float32, as BackdoorBench computes it
        pattern = (data.float() / 255) * 255
        return pattern[:1] if c == 1 else pattern

    def apply(self, x: Tensor) -> Tensor:
        c, h, w = x.shape[-3:]
        # its numpy arithmetic: alpha * pattern in float32 (a Python float times a float32 array), the image
        # term in float64, the sum in float64
        blended = (self._pattern(c, h, w) * torch.tensor(self.alpha, dtype=torch.float32)).double()
        orig = (x.double() * 255).round()
        out = (1 - self.alpha) * orig + blended
        return (out.clamp(0, 255).floor() / 255).to(x.dtype)


TRIGGERS = {"badnets": BadNets, "patch": RandomPatch, "blend": Blend, "sig": SIG, "wanet": WaNet,
            "published-badnets": PublishedCheckerboard, "published-4corner": PublishedFourCorner,
            "published-blend": PublishedBlend,
            "backdoorbench-badnets": BackdoorBenchBadNets, "backdoorbench-blended": BackdoorBenchBlended,
            "image": ImageTrigger}


def make_trigger(name: str, **kwargs) -> Trigger:
    if name not in TRIGGERS:
        raise ConfigError(f"unknown trigger {name!r}; known: {', '.join(TRIGGERS)}")
    cls = TRIGGERS[name]
    known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} - {"name"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"trigger {name} has no option {', '.join(unknown)}; its options: "
                          f"{', '.join(sorted(known))}")
    return cls(**kwargs)


def _option(name: str, key: str, text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"trigger {name}: {key}={text!r} is not {'an integer' if kind is int else 'a number'}"
                          ) from None
    if kind is float and not torch.isfinite(torch.tensor(value)):
        raise ConfigError(f"trigger {name}: {key}={text!r} must be finite")
    return value


def parse_trigger(spec: str, image_shape: Optional[Tuple[int, int, int]] = None) -> Trigger:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (e.g. ``blend:alpha=0.1``, ``wanet:s=1,k=4``). With
    ``image_shape`` (C, H, W), the patch triggers default to 1/6 of the image side (3 px at least: 5 px on
    32 x 32, 3 px on 16 x 16). Options are checked: a mistyped key or value is a one-line ConfigError."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in TRIGGERS:
        raise ConfigError(f"unknown trigger {spec!r}; known: {', '.join(TRIGGERS)} (NAME or NAME:KEY=VALUE,...)")
    cls = TRIGGERS[name]
    types = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "name" and not f.name.startswith("_")}
    kwargs = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in types:
            raise ConfigError(f"trigger {name}: {item!r} is not KEY=VALUE with a key among "
                              f"{', '.join(sorted(types))}")
        if types[key] in (str, "str"):
            kwargs[key] = value.strip()
            continue
        kind = int if types[key] in (int, "int") else float  # Optional[float] options take a float too
        kwargs[key] = _option(name, key, value.strip(), kind)
    if name in ("badnets", "patch") and "size" not in kwargs and image_shape is not None:
        kwargs["size"] = max(3, min(image_shape[-2:]) // 6)
    if name == "image":
        if "pattern" in kwargs or not kwargs.get("path"):
            raise ConfigError("trigger image: give image:path=FILE[,alpha=A,row=R,col=C,margin=M]")
        trigger = ImageTrigger.from_file(kwargs.pop("path"), image_shape, **kwargs)
        _check_values(trigger)
        return trigger
    trigger = make_trigger(name, **kwargs)
    _check_values(trigger)
    return trigger


def _check_values(t: Trigger) -> None:
    bad = None
    if isinstance(t, (BadNets, RandomPatch)) and (t.size < 1 or t.margin < 0):
        bad = "size must be >= 1 and margin >= 0"
    elif isinstance(t, Blend) and not 0 < t.alpha <= 1:
        bad = "alpha must be in (0, 1]"
    elif isinstance(t, SIG) and not (t.delta > 0 and t.f > 0 and (t.test_delta is None or t.test_delta > 0)):
        bad = "delta, test_delta and f must be > 0"
    elif isinstance(t, BackdoorBenchBadNets) and (t.size < 1 or t.distance < 0):
        bad = "size must be >= 1 and distance >= 0"
    elif isinstance(t, ImageTrigger) and t.alpha is not None and not 0 < t.alpha <= 1:
        bad = "alpha must be in (0, 1]"
    elif isinstance(t, (BackdoorBenchBlended, PublishedBlend)) and not 0 < t.alpha <= 1:
        bad = "alpha must be in (0, 1]"
    elif isinstance(t, PublishedCheckerboard) and not (0 < t.alpha <= 1 and t.corners in (1, 4)):
        bad = "alpha must be in (0, 1] and corners 1 or 4"
    elif isinstance(t, WaNet) and (t.k < 2 or t.s <= 0 or t.grid_rescale <= 0 or t.cross_ratio < 0):
        bad = "k must be >= 2, s and grid_rescale > 0, cross_ratio >= 0"
    if bad:
        raise ConfigError(f"trigger {t.name}: {bad}")


def poison(x: Tensor, y: Tensor, trigger: Trigger, target: int, rate: float, seed: int = 0
           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Poison a fraction ``rate`` of the training set with ``trigger``'s rule (dirty label: non-target images
    triggered and relabelled; SIG: target images triggered, labels kept; WaNet: plus noise-mode images).
    Returns (x, y, indices given the backdoor); the inputs are not modified."""
    out = trigger.poison(x, y, target, rate, seed)
    return out.x, out.y, out.poisoned


def triggered_test_set(x: Tensor, y: Tensor, trigger: Trigger, target: int) -> Tuple[Tensor, Tensor]:
    """The ASR set: test images whose true label is not the target, with the trigger applied."""
    keep = y != target
    return trigger.apply(x[keep]), y[keep]
