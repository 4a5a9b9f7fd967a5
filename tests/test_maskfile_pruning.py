import pytest
import torch

from anp_fast import ConfigError, MaskFileError, load_masks, prune, pruned_count, save_masks, select_pruned, sweep
from anp_fast.models import resnet18

PUBLISHED = ("No \t Layer Name \t Neuron Idx \t Mask Score \n"
             "0 \t layer1.0.bn1 \t 0 \t 0.9873 \n"
             "1 \t layer1.0.bn1 \t 1 \t 0.1000 \n"
             "2 \t bn1 \t 0 \t 0.0000 \n")


def test_roundtrip(tmp_path):
    masks = {"bn1": torch.tensor([0.12345, 1.0, 0.0]), "layer1.0.bn2": torch.rand(7)}
    path = tmp_path / "m.txt"
    save_masks(masks, path)
    text = path.read_text().splitlines()
    assert text[0] == "No \t Layer Name \t Neuron Idx \t Mask Score "
    assert text[1] == "0 \t bn1 \t 0 \t 0.1235 "  # published: 4 decimals, ' \t ' separators
    back = load_masks(path)
    assert list(back) == list(masks)
    for k in masks:
        torch.testing.assert_close(back[k], masks[k], atol=5e-5, rtol=0)


def test_published_file_loads(tmp_path):
    path = tmp_path / "pub.txt"
    path.write_text(PUBLISHED)
    masks = load_masks(path)
    assert list(masks) == ["layer1.0.bn1", "bn1"]
    torch.testing.assert_close(masks["layer1.0.bn1"], torch.tensor([0.9873, 0.1]))


@pytest.mark.parametrize("text,match", [
    ("No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t bn1 \t 0\n", "expected 4 fields"),
    ("0 bn1 x 0.5\n", "must be an integer"),
    ("0 bn1 0 0.5\n1 bn1 0 0.4\n", "appears twice"),
    ("0 bn1 0 0.5\n1 bn1 2 0.4\n", r"lacks neuron indices \[1\]"),
    ("No \t Layer Name \t Neuron Idx \t Mask Score \n", "holds no mask"),
])
def test_malformed_files(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(MaskFileError, match=match):
        load_masks(path)


def test_missing_file(tmp_path):
    with pytest.raises(MaskFileError, match="does not exist"):
        load_masks(tmp_path / "nope.txt")


def test_mask_for_unknown_layers_is_refused(tmp_path):
    model = resnet18(10, 3, 4)
    path = tmp_path / "pub.txt"
    path.write_text(PUBLISHED.replace("bn1 \t 0 \t 0.0000", "no_such_bn \t 0 \t 0.0000"))
    with pytest.raises(MaskFileError, match=r"name 1 layer\(s\) that ResNet does not have: no_such_bn"):
        prune(model, load_masks(path))
    with pytest.raises(MaskFileError, match="has 4 neurons but its mask has 2"):
        prune(model, {"bn1": torch.ones(2)})


def test_select_rules():
    masks = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.2, 0.05])}
    sel = select_pruned(masks, threshold=0.2)
    assert sel["a"].tolist() == [1] and sel["b"].tolist() == [0, 1]
    sel = select_pruned(masks, number=2)
    assert sel["a"].tolist() == [1] and sel["b"].tolist() == [1]
    sel = select_pruned(masks, fraction=0.6)  # floor(0.6 * 5) = 3 lowest
    assert pruned_count(masks, fraction=0.6) == 3 and sel["b"].tolist() == [0, 1]
    for bad in ({}, {"threshold": 0.1, "number": 1}, {"number": 9}, {"fraction": 1.5}, {"number": -1}):
        with pytest.raises(ConfigError):
            select_pruned(masks, **bad)


def test_prune_sets_scale_only():
    model = resnet18(10, 3, 4)
    masks = {"bn1": torch.tensor([0.1, 0.9, 0.3, 0.0]), "layer1.0.bn1": torch.ones(4)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, masks, threshold=0.2)
    assert pruned.bn1.weight.tolist()[1:3] == before["bn1.weight"].tolist()[1:3]
    assert pruned.bn1.weight[0] == 0 and pruned.bn1.weight[3] == 0
    for k in ("bn1.bias", "bn1.running_mean", "bn1.running_var", "layer1.0.bn1.weight"):
        assert torch.equal(pruned.state_dict()[k], before[k])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sweep_matches_prune():
    torch.manual_seed(0)
    model = resnet18(10, 3, 4).eval()
    masks = {n: torch.rand(m.weight.numel()) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    x = torch.randn(3, 3, 8, 8)

    def evaluate(m):
        with torch.no_grad():
            return {"out": float(m(x).sum())}

    rows = sweep(model, masks, evaluate, thresholds=[0.3, 0.0, 0.6])
    for row in rows:
        assert row["out"] == pytest.approx(evaluate(prune(model, masks, threshold=row["threshold"]))["out"])
        assert row["pruned"] == pruned_count(masks, threshold=row["threshold"])


def test_non_finite_scores_and_binary_files_are_refused(tmp_path):
    from anp_fast.errors import MaskFileError
    from anp_fast.maskfile import load_masks

    nan = tmp_path / "nan.txt"
    nan.write_text("0 \t bn1 \t 0 \t 0.5000\n1 \t bn1 \t 1 \t nan\n")
    with pytest.raises(MaskFileError, match=r"nan.txt:2: the score of neuron 1 of bn1 is nan"):
        load_masks(nan)
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00\x80garbage")
    with pytest.raises(MaskFileError, match="is not text"):
        load_masks(binary)
    with pytest.raises(MaskFileError, match="is a directory"):
        load_masks(tmp_path)


def test_prune_zeroes_gated_rows_in_any_memory_format():
    """A gated conv's scale is its weight's output-channel rows, whatever the layout (channels_last weights
    cannot be viewed as (out, -1)); norm layers and gated layers go through one helper (pruning.scale_rows)."""
    from anp_fast.pruning import scale_rows

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    model = torch.nn.Sequential(conv)
    pruned = prune(model, {"0": torch.tensor([0.9, 0.1, 0.8, 0.05])}, threshold=0.2)
    w = pruned[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert torch.count_nonzero(w[1]) == 0 and torch.count_nonzero(w[3]) == 0
    assert torch.equal(w[0], conv.weight[0]) and torch.equal(w[2], conv.weight[2])
    assert torch.equal(pruned[0].bias, conv.bias)  # the bias is not the scale
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        scale_rows(bn)[2] = 0
    assert bn.weight.tolist() == [1, 1, 0, 1, 1]  # a view, not a copy
