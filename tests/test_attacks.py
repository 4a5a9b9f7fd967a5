"""Backdoor attacks for evaluation: each trigger against its published rule (written here independently from
the reference code), the poisoning rules (dirty label, clean label, WaNet's noise mode) and trigger specs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anp_fast.attacks import (SIG, BadNets, Blend, RandomPatch, WaNet, parse_trigger, poison,
                              triggered_test_set)
from anp_fast.errors import ConfigError


def _images(n=40, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g), torch.arange(n) % 10


def test_sig_is_backdoorbench_s_sinusoid():
    """BackdoorBench's sigTrigger on a uint8 HWC image: img + delta * sin(2 pi j f / m), j the column, clipped."""
    x, _ = _images(2, 3, 32, 32)
    hwc = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.float32)
    pattern = np.zeros_like(hwc)
    m = pattern.shape[1]
    for i in range(hwc.shape[0]):
        for j in range(hwc.shape[1]):
            pattern[i, j] = 40 * np.sin(2 * np.pi * j * 6 / m)
    expected = np.clip(hwc + pattern, 0, 255) / 255
    ours = SIG().apply(x[:1])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() < 1e-5
    # the test-time amplitude can differ; training images always get delta
    strong = SIG(test_delta=60 / 255)
    assert (strong.apply(x) - x).abs().max() > (SIG().apply(x) - x).abs().max()
    out = strong.poison(x, torch.zeros(len(x), dtype=torch.long), 0, 0.5, seed=1)
    assert torch.allclose(out.x[out.poisoned], SIG().apply(x[out.poisoned]))


def _wanet_reference(x, k, s, seed, grid_rescale=1.0):
    """The WaNet reference code's grid (train.py), with its torch.rand drawn from our seed."""
    h = x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=h)
    a, b = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((b, a), 2)[None, ...]
    grid_temps = (identity_grid + s * noise_grid / h) * grid_rescale
    grid_temps = torch.clamp(grid_temps, -1, 1)
    return F.grid_sample(x, grid_temps.repeat(x.shape[0], 1, 1, 1), align_corners=True), grid_temps


def test_wanet_warp_is_the_reference_field():
    x, _ = _images(4, 3, 32, 32)
    for k, s in ((4, 0.5), (8, 2.0)):
        expected, _ = _wanet_reference(x, k, s, seed=11)
        ours = WaNet(k=k, s=s, seed=11).apply(x)
        assert torch.allclose(ours, expected.clamp(0, 1), atol=1e-6)
        assert (ours - x).abs().max() > 1e-3  # it does move pixels


def test_wanet_poisons_with_its_noise_mode():
    x, y = _images(200, 1, 16, 16)
    t = WaNet(seed=3)
    out = t.poison(x, y, target=0, rate=0.1, seed=5)
    assert len(out.poisoned) == 20 and len(out.noise) == 40  # cross ratio 2
    assert not set(out.poisoned.tolist()) & set(out.noise.tolist())
    assert (out.y[out.poisoned] == 0).all() and (y[out.poisoned] != 0).all()
    assert torch.equal(out.y[out.noise], y[out.noise])  # noise-mode images keep their labels
    assert torch.allclose(out.x[out.poisoned], t.apply(x[out.poisoned]))
    _, grid = _wanet_reference(x[:1], 4, 0.5, seed=3)
    # each noise-mode image is warped by the field plus at most 1/H per coordinate, never by the field alone
    for i in out.noise[:5].tolist():
        assert not torch.allclose(out.x[i], t.apply(x[i:i + 1])[0], atol=1e-4)
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[out.poisoned] = untouched[out.noise] = False
    assert torch.equal(out.x[untouched], x[untouched])


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1])
def test_dirty_label_rates_count_all_training_images(rate):
    x, y = _images(400, 1, 16, 16)
    xp, yp, idx = poison(x, y, BadNets(size=3), target=2, rate=rate, seed=0)
    assert len(idx) == round(rate * 400)
    assert (y[idx] != 2).all() and (yp[idx] == 2).all()
    rest = torch.ones(400, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(xp[rest], x[rest]) and torch.equal(yp[rest], y[rest])
    assert torch.equal(x, _images(400, 1, 16, 16)[0])  # inputs untouched


def test_sig_is_clean_label_and_capped_by_the_target_class():
    x, y = _images(100, 1, 16, 16)  # 10 images of each class
    xp, yp, idx = poison(x, y, SIG(), target=3, rate=0.05, seed=0)
    assert len(idx) == 5 and (y[idx] == 3).all() and torch.equal(yp, y)
    _, _, idx = poison(x, y, SIG(), target=3, rate=0.5, seed=0)
    assert len(idx) == 10  # only 10 target images exist


def test_patch_triggers_land_in_the_corner():
    x, _ = _images(3, 3, 32, 32)
    for trig in (BadNets(size=5, margin=1), RandomPatch(size=5, margin=1)):
        out = trig.apply(x)
        changed = (out != x).any(dim=1).any(dim=0)
        rows, cols = changed.nonzero().T
        assert rows.min() >= 32 - 1 - 5 and rows.max() <= 30 and cols.min() >= 26 and cols.max() <= 30
    patch = RandomPatch(size=4).apply(x)[..., -5:-1, -5:-1]
    assert torch.equal(patch, RandomPatch(size=4).pattern(3).expand(3, -1, -1, -1))  # fixed per seed
    assert not torch.equal(RandomPatch(seed=1).pattern(3), RandomPatch(seed=2).pattern(3))


def test_blend_alpha_and_asr_set():
    x, y = _images(20, 1, 8, 8)
    out = Blend(alpha=0.3).apply(x)
    pattern = (out - 0.7 * x) / 0.3
    assert torch.allclose(pattern, pattern[:1].expand_as(pattern), atol=1e-5)  # one fixed pattern
    xt, yt = triggered_test_set(x, y, Blend(alpha=0.3), target=1)
    assert len(xt) == int((y != 1).sum()) and (yt != 1).all()


def test_trigger_specs():
    t = parse_trigger("blend:alpha=0.1", (3, 32, 32))
    assert isinstance(t, Blend) and t.alpha == 0.1
    t = parse_trigger("wanet:s=1,k=8", (1, 16, 16))
    assert (t.s, t.k, t.cross_ratio) == (1.0, 8, 2.0)
    assert parse_trigger("badnets", (3, 32, 32)).size == 5 and parse_trigger("patch", (1, 16, 16)).size == 3
    assert parse_trigger("sig:test_delta=0.3").test_delta == 0.3
    for spec, message in [("blend:beta=1", "not KEY=VALUE with a key among"), ("wanet:k=two", "is not an integer"),
                          ("blend:alpha=0", "alpha must be in"), ("sig:delta=nan", "must be finite"),
                          ("laser", "unknown trigger"), ("wanet:s=-1", "s and grid_rescale > 0")]:
        with pytest.raises(ConfigError, match=message):
            parse_trigger(spec, (3, 32, 32))
    with pytest.raises(ConfigError, match="does not fit"):
        BadNets(size=9).apply(torch.zeros(1, 1, 8, 8))
    assert parse_trigger("sig").describe() == {"delta": 40 / 255, "f": 6, "test_delta": None,
                                                "name": "sig"}
    assert not math.isnan(parse_trigger("wanet").describe()["s"])


def _published_trigger(kind):
    """csdongxian/ANP_backdoor data/poison_cifar.py::generate_trigger, re-implemented from its source."""
    import numpy as np

    values = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    region = [-1, 0, 1]
    if kind == "checkerboard_1corner":
        pattern = np.zeros((32, 32, 1), dtype=np.uint8) + 122
        mask = np.zeros((32, 32, 1), dtype=np.uint8)
        for h in region:
            for w in region:
                pattern[30 + h, 30 + w, 0] = values[h + 1][w + 1]
                mask[30 + h, 30 + w, 0] = 1
    else:
        pattern = np.zeros((32, 32, 1), dtype=np.uint8)
        mask = np.zeros((32, 32, 1), dtype=np.uint8)
        for center in [1, 30]:
            for h in region:
                for w in region:
                    pattern[center + h, 30 + w, 0] = values[h + 1][w + 1]
                    pattern[center + h, 1 + w, 0] = values[h + 1][- w - 2]
                    mask[center + h, 30 + w, 0] = 1
                    mask[center + h, 1 + w, 0] = 1
    return pattern, mask


@pytest.mark.parametrize("name, kind", [("published-badnets", "checkerboard_1corner"),
                                        ("published-4corner", "checkerboard_4corner")])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.3])
def test_published_triggers_match_the_published_code(name, kind, alpha):
    """Its add_trigger_cifar rule on uint8 HWC images (clip, then astype uint8) vs ours on [0, 1] CHW floats."""
    import numpy as np

    from anp_fast.attacks import parse_trigger

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    pattern, mask = _published_trigger(kind)
    ref = np.clip((1 - mask) * data + mask * ((1 - alpha) * data + alpha * pattern), 0, 255).astype(np.uint8)
    trig = parse_trigger(f"{name}:alpha={alpha}" if alpha != 1.0 else name, (3, 32, 32))
    x = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
    ours = (trig.apply(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, ref)
    changed = (ref != data).any(axis=(0, 3))
    rows, cols = np.nonzero(changed)
    assert rows.max() <= 31 and (kind == "checkerboard_4corner" or rows.min() >= 29)


def test_published_trigger_options_are_checked():
    from anp_fast.attacks import parse_trigger

    for bad in ("published-badnets:alpha=0", "published-badnets:corners=2"):
        with pytest.raises(ConfigError):
            parse_trigger(bad, (3, 32, 32))
    with pytest.raises(ConfigError, match="too small"):
        parse_trigger("published-badnets", (1, 4, 4)).apply(torch.zeros(1, 1, 4, 4))


def test_backdoorbench_badnets_matches_its_rule():
    """generate_white_square.py (32, 3, 0, 0) + AddMaskPatchTrigger + clip/uint8, re-implemented from source."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    trigger = np.zeros((32, 32, 3), dtype=np.uint8)
    trigger[32 - 0 - 3:32 - 0, 32 - 0 - 3:32 - 0, :] = 255
    ref = np.clip(data * (trigger == 0) + trigger * (trigger > 0), 0, 255).astype(np.uint8)
    x = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
    ours = (parse_trigger("backdoorbench-badnets", (3, 32, 32)).apply(x) * 255).round().to(torch.uint8)
    assert np.array_equal(ours.permute(0, 2, 3, 1).numpy(), ref)
    with pytest.raises(ConfigError, match="does not fit"):
        parse_trigger("backdoorbench-badnets:size=9,distance=0", (1, 8, 8)).apply(torch.zeros(1, 1, 8, 8))


def test_backdoorbench_blended_matches_its_rule(tmp_path):
    """bd_attack_img_trans_generate's blended chain: ToPILImage -> Resize -> ToTensor * 255 for the picture,
    (1 - a) img + a pattern on the uint8 image, clip and astype uint8."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (45, 50, 3), dtype=np.uint8)
    path = tmp_path / "kitty.png"
    Image.fromarray(picture).save(path)
    trans = transforms.Compose([transforms.ToPILImage(), transforms.Resize((32, 32)), transforms.ToTensor()])
    pattern = trans(np.array(Image.open(path))).cpu().numpy().transpose(1, 2, 0) * 255
    data = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for alpha in (0.2, 0.1):
        ref = np.clip((1 - alpha) * data + alpha * pattern, 0, 255).astype(np.uint8)
        trig = parse_trigger(f"backdoorbench-blended:image={path},alpha={alpha}", (3, 32, 32))
        x = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
        ours = (trig.apply(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(ours, ref), (alpha, np.abs(ours.astype(int) - ref).max())
    with pytest.raises(ConfigError, match="needs image=PATH"):
        parse_trigger("backdoorbench-blended", (3, 32, 32)).apply(torch.zeros(1, 3, 32, 32))


def test_image_trigger_placement_and_alpha(tmp_path):
    from PIL import Image

    patch = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]] * 3, dtype=np.uint8)  # 3x3 RGB
    path = tmp_path / "t.png"
    Image.fromarray(patch).save(path)
    x = torch.rand(2, 3, 12, 12)
    trig = parse_trigger(f"image:path={path},row=2,col=5,alpha=0.5", (3, 12, 12))
    out = trig.apply(x)
    p = torch.from_numpy(patch).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(out[..., 2:5, 5:8], 0.5 * x[..., 2:5, 5:8] + 0.5 * p)
    keep = torch.ones(12, 12, dtype=torch.bool)
    keep[2:5, 5:8] = False
    assert torch.equal(out[..., keep], x[..., keep])
    # defaults: pasted (alpha 1) 1 px from the bottom-right corner, as a bare file name gives
    from anp_fast.inputs import make_trigger_spec

    bare = make_trigger_spec(str(path), (3, 12, 12)).apply(x)
    assert torch.equal(bare, parse_trigger(f"image:path={path}", (3, 12, 12)).apply(x))
    torch.testing.assert_close(bare[..., 8:11, 8:11], p.expand(2, 3, 3, 3))
    for bad, msg in ((f"image:path={path},row=11", "does not fit"), ("image:alpha=0.5", "path=FILE"),
                     (f"image:path={path},alpha=2", "alpha must be")):
        with pytest.raises(ConfigError, match=msg):
            parse_trigger(bad, (3, 12, 12)).apply(x)


def test_published_blend_matches_its_rule(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "cifar_gaussian_noise.png"
    Image.fromarray(noise).save(path)
    pattern = np.array(Image.open(path))  # generate_trigger('gaussian_noise')
    mask = np.ones((32, 32, 1), dtype=np.uint8)
    data = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    alpha = 0.2
    ref = np.clip((1 - mask) * data + mask * ((1 - alpha) * data + alpha * pattern), 0, 255).astype(np.uint8)
    x = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
    ours = parse_trigger(f"published-blend:image={path},alpha={alpha}", (3, 32, 32)).apply(x)
    assert np.array_equal((ours * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), ref)
