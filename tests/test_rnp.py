"""RNP on the anp_fast backend against a straightforward eager version of the published loops
(tests/rnp_reference.py), and the method extension point."""
import pytest
import torch

from anp_fast import ANPConfig
from anp_fast.batches import BatchSource
from anp_fast.engine import optimize_masks
from anp_fast.errors import ConfigError
from anp_fast.methods import METHODS, RNPConfig, learn_masks, register_method, rnp, unlearn

import rnp_reference as ref


class Fixed(BatchSource):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches[self.start:]


def _batches(n_batches=4, size=10, seed=3, classes=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n_batches)]


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_unlearning_matches_the_published_loop(tiny_resnet):
    batches = _batches()
    n = sum(len(y) for _, y in batches)
    opts = RNPConfig(unlearn_epochs=3, clean_threshold=0.0, unlearn_schedule=(1, 2))  # never stops early
    ours, info = unlearn(tiny_resnet, lambda e: batches, n, opts, torch.device("cpu"), progress=False)
    theirs, accs = ref.unlearn(tiny_resnet, lambda e: batches, unlearning_epochs=3, clean_threshold=0.0,
                               schedule=(1, 2))
    assert info["epochs"] == len(accs) == 4 and info["clean_acc_per_epoch"] == pytest.approx(accs)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for key in ours_sd:
        if ours_sd[key].is_floating_point():
            assert _max_rel(ours_sd[key], theirs_sd[key]) <= 1e-5, key
    # gradient ascent moved the weights, and the original model is untouched
    assert _max_rel(ours_sd["conv1.weight"], tiny_resnet.state_dict()["conv1.weight"]) > 1e-3


def test_unlearning_stops_where_the_published_loop_stops(tiny_resnet):
    batches = _batches(seed=5)
    n = sum(len(y) for _, y in batches)
    opts = RNPConfig(unlearn_lr=0.05)
    _, info = unlearn(tiny_resnet, lambda e: batches, n, opts, torch.device("cpu"), progress=False)
    _, accs = ref.unlearn(tiny_resnet, lambda e: batches, lr=0.05)
    assert info["epochs"] == len(accs) and info["threshold_reached"] == (accs[-1] <= 0.2)
    assert info["threshold_reached"] and len(accs) < 21  # the threshold is met, not the epoch limit


@pytest.mark.parametrize("fused", [False, True])
def test_recovering_matches_the_published_loop(tiny_resnet, fused):
    batches = _batches(n_batches=6, seed=7)
    theirs = ref.recover(tiny_resnet, batches)
    config = ANPConfig(eps=0.0, alpha=0.2, lr=0.2, momentum=0.9, iters=len(batches), fused_kernels=fused)
    ours = optimize_masks(tiny_resnet, Fixed(batches), config, progress=False).masks
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-5, name
    assert any((m < 1).any() for m in ours.values())  # the masks moved


def test_rnp_end_to_end_and_resume(tmp_path, tiny_resnet):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    opts = RNPConfig(batch_size=16, recover_epochs=2, unlearn_lr=0.05)
    config = ANPConfig(seed=2)
    full = rnp(tiny_resnet, (x, y), config, options=opts, progress=False)
    assert full.timings["iters"] == 2 * 3  # 2 epochs of ceil(40 / 16) batches
    assert full.info["unlearning"]["epochs"] >= 1 and set(full.masks) == {
        n for n, m in tiny_resnet.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in full.masks.values():
        assert m.min() >= 0 and m.max() <= 1
    # the unlearned copy is saved, so a resumed run skips unlearning and ends with the same masks
    again = rnp(tiny_resnet, (x, y), config, options=opts, progress=False, state_dir=str(tmp_path))
    assert (tmp_path / "rnp_unlearned.pt").exists()
    resumed = rnp(tiny_resnet, (x, y), config, options=opts, progress=False, state_dir=str(tmp_path), resume=True)
    for name in full.masks:
        assert torch.equal(full.masks[name], again.masks[name])
        assert torch.equal(full.masks[name], resumed.masks[name])


def test_rnp_options_are_checked():
    with pytest.raises(ConfigError, match="unlearn_lr"):
        RNPConfig(unlearn_lr=0)
    with pytest.raises(ConfigError, match="recover_epochs"):
        RNPConfig(recover_epochs=0)
    with pytest.raises(ConfigError, match="unlearn_clip"):
        RNPConfig(unlearn_clip=-1.0)


def test_a_front_end_registers_its_own_method(tiny_resnet):
    """The extension point of the README: a method built from the engine's mask step, used by name."""
    def clean_masks(model, clean, config, **services):
        return optimize_masks(model, clean, config.replace(eps=0.0), progress=False)

    register_method("clean-masks", clean_masks)
    try:
        x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 5, (20,))
        result = learn_masks("clean-masks", tiny_resnet, (x, y), ANPConfig(iters=3, batch_size=8))
        assert result.timings["iters"] == 3 and result.num_neurons > 0
    finally:
        METHODS.pop("clean-masks")
    with pytest.raises(ConfigError, match="unknown method 'clean-masks'"):
        learn_masks("clean-masks", tiny_resnet, (x, y), ANPConfig(iters=1))


def test_purify_with_rnp_and_presets_from_the_cli(tmp_path):
    """--method rnp end to end; --preset backdoorbench sets its values, explicit flags win, the report says so."""
    from anp_fast.checkpoint import save_checkpoint
    from anp_fast.cli import main, parse
    from anp_fast.datasets import write_cifar
    from anp_fast.archs import build_arch

    g = torch.Generator().manual_seed(0)
    write_cifar(str(tmp_path / "data"), torch.randint(0, 256, (60, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.arange(60) % 10, torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.arange(20) % 10)
    torch.manual_seed(0)
    save_checkpoint(build_arch("resnet18", num_classes=10, width=4), str(tmp_path / "m"))
    common = ["purify", "--arch", "resnet18", "--arch-arg", "width=4", "--checkpoint", str(tmp_path / "m.pt"),
              "--data", f"cifar10:{tmp_path / 'data'}", "--clean-count", "30", "--no-progress",
              "--sample-with-replacement", "--force"]  # random weights: past the plausibility check
    out = tmp_path / "rnp"
    assert main([*common, "--method", "rnp", "--rnp-recover-epochs", "2", "--rnp-batch-size", "8",
                 "--out", str(out)]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "rnp" and report["method_info"]["options"]["recover_epochs"] == 2
    assert report["anp"]["iters"] == 2 * 3  # 24 clean images in batches of 8, two epochs
    assert (out / "rnp_unlearned.pt").exists()
    _, args = parse([*common, "--preset", "backdoorbench", "--out", "x"])
    assert (args.lr, args.batch_size, args.iters) == (0.01, 256, 2000)
    _, args = parse([*common, "--preset", "backdoorbench", "--lr", "0.3", "--out", "x"])
    assert (args.lr, args.batch_size) == (0.3, 256)
    _, args = parse([*common, "--preset", "backdoorbench", "--method", "rnp", "--out", "x"])
    assert args.rnp_batch_size == 256 and args.lr == 0.2  # an RNP preset leaves ANP's flags alone
    from anp_fast.presets import preset, sources

    assert preset("backdoorbench", "anp")["clean_fraction"] == 0.05
    assert "config/defense/anp" in sources("backdoorbench", "anp")["lr"]
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope", "anp")
