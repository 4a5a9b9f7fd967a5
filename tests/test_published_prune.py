"""Issue 11: a checkpoint and mask file give the published prune script's ACC/ASR in `anp-fast prune` when told
the published conventions (--normalize published, --trigger published-badnets). The reference below is the
rule of csdongxian/ANP_backdoor prune_neuron_cifar.py (threshold pruning of the text mask values: every neuron
with value <= T gets its BN weight set to 0; ACC on the clean test set; ASR on the non-target test images with
add_predefined_trigger_cifar's trigger), re-implemented from its source, not imported."""
import json

import numpy as np
import pytest
import torch

from anp_fast.archs import build_arch
from anp_fast.checkpoint import load_state_dict
from anp_fast.cli import main
from anp_fast.datasets import digits_as_cifar, read_pickle
from anp_fast.maskfile import save_masks
from anp_fast.surgery import perturbable_layers
from test_attacks import _published_trigger

MEAN = np.array((0.4914, 0.4822, 0.4465)).reshape(1, 3, 1, 1)
STD = np.array((0.2023, 0.1994, 0.2010)).reshape(1, 3, 1, 1)


def _published_eval(model, data, labels, target):
    """test() of the published script over the clean and the triggered (non-target) test sets."""
    pattern, mask = _published_trigger("checkerboard_1corner")
    poisoned = ((1 - mask) * data + mask * (0.0 * data + 1.0 * pattern)).astype(np.uint8)
    keep = labels != target

    def predict(images):  # ToTensor + Normalize(MEAN_CIFAR10, STD_CIFAR10)
        x = torch.from_numpy(((images.transpose(0, 3, 1, 2) / 255.0 - MEAN) / STD).astype(np.float32))
        model.eval()
        with torch.no_grad():
            return torch.cat([model(x[i:i + 128]).argmax(1) for i in range(0, len(x), 128)]).numpy()

    acc = float((predict(data) == labels).mean())
    asr = float((predict(poisoned[keep]) == target).mean())
    return acc, asr


def _read_mask_values(path):  # read_data(): whitespace-separated, header skipped; sorted by value
    rows = [line.split() for line in open(path).read().splitlines()[1:] if line.strip()]
    return sorted(((r[1], int(r[2]), float(r[3])) for r in rows), key=lambda r: r[2])


def test_prune_gives_the_published_scripts_numbers(tmp_path):
    data_dir = tmp_path / "data"
    digits_as_cifar(str(data_dir))
    att = tmp_path / "att"
    assert main(["attack", "--arch", "resnet18", "--arch-arg", "width=8", "--data", f"cifar10:{data_dir}",
                 "--epochs", "4", "--trigger", "published-badnets", "--normalize", "published", "--out", str(att),
                 "--no-progress"]) == 0
    ckpt = str(att / "backdoored.pt")  # a plain state_dict, as the published code saves (no metadata)
    model = build_arch("resnet18", num_classes=10, width=8)
    model.load_state_dict(load_state_dict(ckpt))
    g = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(n, generator=g) for name, n in perturbable_layers(model)}
    save_masks(masks, str(tmp_path / "masks.txt"))
    batch = read_pickle(str(data_dir / "cifar-10-batches-py" / "test_batch"))
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch[b"labels"])
    values = _read_mask_values(tmp_path / "masks.txt")
    base_acc, base_asr = _published_eval(model, data, labels, 0)
    assert base_acc > 0.5 and base_asr > 0.5  # a working backdoored model: the comparison means something
    for threshold in (0.05, 0.1, 0.2):
        ref = build_arch("resnet18", num_classes=10, width=8)
        ref.load_state_dict(load_state_dict(ckpt))
        sd = ref.state_dict()
        for layer, idx, value in values:  # pruning(): state_dict[layer.weight][idx] = 0
            if value <= threshold:
                sd[f"{layer}.weight"][idx] = 0.0
        ref.load_state_dict(sd)
        want_acc, want_asr = _published_eval(ref, data, labels, 0)
        out = tmp_path / f"pruned{threshold}"
        assert main(["prune", "--arch", "resnet18", "--arch-arg", "width=8", "--checkpoint", ckpt, "--masks",
                     str(tmp_path / "masks.txt"), "--data", f"cifar10:{data_dir}", "--normalize", "published",
                     "--trigger", "published-badnets", "--target", "0", "--prune", f"threshold:{threshold}",
                     "--out", str(out)]) == 0
        after = json.loads((out / "prune_report.json").read_text())["after"]
        print(f"threshold {threshold}: anp-fast ACC {100 * after['acc']:.2f} ASR {100 * after['asr']:.2f}, "
              f"published rule ACC {100 * want_acc:.2f} ASR {100 * want_asr:.2f}")
        assert abs(100 * after["acc"] - 100 * want_acc) <= 0.1, (threshold, after["acc"], want_acc)
        assert abs(100 * after["asr"] - 100 * want_asr) <= 0.1, (threshold, after["asr"], want_asr)
