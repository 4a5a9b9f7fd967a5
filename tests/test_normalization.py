"""Input normalisation as data (issue 11): named conventions and explicit MEAN/STD, the setting reaching every
image a model sees, and the convention recorded in checkpoints anp_fast writes and read back from them."""
import json

import pytest
import torch

from anp_fast.checkpoint import checkpoint_metadata, save_checkpoint
from anp_fast.cli import main
from anp_fast.datasets import CIFAR10_MEAN, CIFAR10_STD, write_cifar
from anp_fast.errors import ConfigError
from anp_fast.normalization import from_metadata, resolve, to_metadata
from anp_fast.inputs import load_model_and_data


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    g = torch.Generator().manual_seed(1)
    write_cifar(str(root), torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.arange(40) % 10, torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.arange(20) % 10)
    return f"cifar10:{root}"


def test_conventions_and_explicit_values():
    d = ("cifar10", 3, CIFAR10_MEAN, CIFAR10_STD)
    assert resolve(None, *d).std == CIFAR10_STD and resolve("dataset", *d).name == "dataset"
    pub = resolve("published", *d)
    assert pub.mean == (0.4914, 0.4822, 0.4465) and pub.std == (0.2023, 0.1994, 0.2010)
    assert resolve("backdoorbench", *d).std == (0.247, 0.243, 0.261)
    assert resolve("BackdoorBench", "cifar100", 3, (0,) * 3, (1,) * 3).mean == (0.5071, 0.4865, 0.4409)
    assert resolve("backdoorbench", "mnist5k", 1, (0.1307,), (0.3081,)).std == (0.5,)
    assert resolve("torchvision", *d).std == (0.229, 0.224, 0.225)
    assert resolve("none", *d).mean == (0.0,) * 3 and resolve("none", *d).std == (1.0,) * 3
    one = resolve("0.5/0.25", *d)
    assert (one.name, one.mean, one.std) == ("explicit", (0.5,) * 3, (0.25,) * 3)
    assert resolve("0.1,0.2,0.3/1,2,3", *d).std == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("spec, message", [
    ("published", "no constants for digits"),
    ("cifar", "unknown; give a convention"),
    ("0.5,0.5/0.2", "2 mean values for 3-channel images"),
    ("0.5/0", "every std must be > 0"),
    ("a/b", "is not a comma-separated list of numbers"),
    ("0.5/nan", "must be finite"),
])
def test_bad_settings_say_what_is_wrong(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve(spec, "digits", 3, (0.5,) * 3, (0.5,) * 3)


def test_metadata_round_trip_and_bad_metadata_ignored():
    norm = resolve("published", "cifar10", 3, CIFAR10_MEAN, CIFAR10_STD)
    assert from_metadata(to_metadata(norm)) == norm
    assert from_metadata({}) is None and from_metadata(None) is None
    for bad in ("not json", json.dumps({"mean": [0.5], "std": [0]}), json.dumps({"mean": [1, 2], "std": [1]})):
        assert from_metadata({"anp_fast.normalization": bad}) is None


def test_the_setting_reaches_every_image(tiny_cifar):
    base = load_model_and_data("resnet18", None, tiny_cifar, {"width": 4})
    pub = load_model_and_data("resnet18", None, tiny_cifar, {"width": 4}, normalize="published")
    assert base.normalization.std == CIFAR10_STD and pub.splits.std == (0.2023, 0.1994, 0.2010)
    raw, _ = base.splits.test[3]  # pixels in [0, 1]
    for loaded, std in ((base, CIFAR10_STD), (pub, (0.2023, 0.1994, 0.2010))):
        x, _ = loaded.norm_test[3]
        want = (raw - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(x, want)
        x, _ = loaded.norm_train[5]
        assert x.shape == raw.shape


def test_checkpoints_carry_their_normalisation(tmp_path, tiny_cifar, capsys):
    att = tmp_path / "attack"
    assert main(["attack", "--arch", "resnet18", "--arch-arg", "width=4", "--data", tiny_cifar, "--epochs", "1",
                 "--batch-size", "16", "--out", str(att), "--no-progress", "--normalize", "published"]) == 0
    assert json.loads((att / "attack.json").read_text())["normalization"]["name"] == "published"
    meta = checkpoint_metadata(str(att / "backdoored.safetensors"))
    assert from_metadata(meta).std == (0.2023, 0.1994, 0.2010) and meta["format"] == "pt"
    assert checkpoint_metadata(str(att / "backdoored.pt")) == {}  # the .pt stays a plain state_dict
    capsys.readouterr()
    # no --normalize: the checkpoint's own is used, and said so
    loaded = load_model_and_data("resnet18", str(att / "backdoored.safetensors"), tiny_cifar, {"width": 4})
    assert loaded.normalization.name == "published" and "metadata" in loaded.notes[0]
    # an explicit, different one wins, with a warning
    other = load_model_and_data("resnet18", str(att / "backdoored.safetensors"), tiny_cifar, {"width": 4},
                                normalize="torchvision")
    assert other.splits.std == (0.229, 0.224, 0.225) and other.notes[0].startswith("warning: --normalize")
    # the same one explicitly: nothing to warn about
    same = load_model_and_data("resnet18", str(att / "backdoored.safetensors"), tiny_cifar, {"width": 4},
                               normalize="published")
    assert same.notes == []
    # purify reports it, and writes it into the purified checkpoint
    out = tmp_path / "purified"
    assert main(["purify", "--arch", "resnet18", "--arch-arg", "width=4", "--iters", "2", "--batch-size", "8",
                 "--clean-count", "20", "--no-progress", "--prune", "threshold:0.2", "--force",
                 "--checkpoint", str(att / "backdoored.safetensors"), "--data", tiny_cifar, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "normalisation from the checkpoint's metadata (published" in text
    assert json.loads((out / "report.json").read_text())["normalization"]["std"] == [0.2023, 0.1994, 0.2010]
    assert from_metadata(checkpoint_metadata(str(out / "purified.safetensors"))).name == "published"


def test_bad_normalize_flag_is_one_line(tmp_path, tiny_cifar, capsys):
    ckpt = tmp_path / "m"
    save_checkpoint(load_model_and_data("resnet18", None, tiny_cifar, {"width": 4}).model, str(ckpt))
    assert main(["prune", "--arch", "resnet18", "--arch-arg", "width=4", "--checkpoint", str(ckpt) + ".pt",
                 "--masks", "nothing.txt", "--data", tiny_cifar, "--out", str(tmp_path / "o"),
                 "--normalize", "0.5,0.5/0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 mean values for 3-channel images" in err[0]


class _Constant(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        out[:, self.k] = 1
        return out


class _Oracle(torch.nn.Module):  # reads the label written into pixel (0, 0)
    def forward(self, x):
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long().clamp(0, 9), 10).float()


def test_plausibility_flags_what_a_wrong_load_looks_like():
    from torch.utils.data import TensorDataset

    from anp_fast.evaluation import plausibility

    y = torch.arange(200) % 10
    x = torch.zeros(200, 1, 4, 4)
    x[:, 0, 0, 0] = y / 10
    ds = TensorDataset(x, y)
    const = plausibility(_Constant(3), ds, 10, torch.device("cpu"))
    assert not const["ok"] and const["top_class"] == 3 and const["top_share"] == 1.0
    assert "near chance" in const["why"][0] and "class 3 takes 100%" in const["why"][1]
    good = plausibility(_Oracle(), ds, 10, torch.device("cpu"))
    assert good["ok"] and good["acc"] == 1.0 and good["why"] == []
    # a class that really holds most labels may take most predictions
    y2 = torch.where(torch.arange(200) < 150, torch.tensor(3), y)
    x2 = x.clone()
    x2[:, 0, 0, 0] = y2 / 10
    assert plausibility(_Oracle(), TensorDataset(x2, y2), 10, torch.device("cpu"))["ok"]


def test_a_wrongly_normalised_checkpoint_stops_before_any_work(tmp_path, capsys):
    from anp_fast.commands import run_attack

    att = tmp_path / "att"
    run_attack(arch="resnet18", data="digits", out=str(att), epochs=4, arch_args={"width": 4}, progress=False,
               log=lambda *a: None)
    ckpt = str(att / "backdoored.pt")  # a .pt carries no normalisation: what the user says is used
    masks = tmp_path / "masks.txt"
    model = load_model_and_data("resnet18", ckpt, "digits", {"width": 4}).model
    from anp_fast import save_masks
    from anp_fast.surgery import perturbable_layers

    save_masks({name: torch.full((n,), 0.9) for name, n in perturbable_layers(model)}, str(masks))
    base = ["prune", "--arch", "resnet18", "--arch-arg", "width=4", "--checkpoint", ckpt, "--masks", str(masks),
            "--data", "digits", "--prune", "threshold:0.2"]
    capsys.readouterr()
    assert main([*base, "--normalize", "none", "--out", str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not look like a model of digits as loaded" in err[0]
    assert "with --normalize dataset its clean accuracy is" in err[0] and "--force" in err[0]
    assert not (tmp_path / "wrong").exists()  # stopped before anything was written
    assert main([*base, "--normalize", "none", "--force", "--out", str(tmp_path / "forced")]) == 0
    assert "(--force: going on)" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "right")]) == 0
    report = json.loads((tmp_path / "right" / "prune_report.json").read_text())
    assert report["plausibility"]["ok"] and report["plausibility"]["acc"] > 0.8
    assert report["normalization"]["name"] == "dataset"
