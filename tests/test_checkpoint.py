"""Untrusted checkpoints: round trips, unwrapping, refusal of code-running pickles, one-line errors."""
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from anp_fast.checkpoint import apply_state_dict, load_state_dict, save_checkpoint
from anp_fast.errors import ANPError, CheckpointError


class Payload:
    """Unpickling this creates ``path``: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    # control: the payload used below does create its marker under a plain pickle.loads
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control), protocol=2)).close()  # the payload returns an open file
    assert control.exists()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_state_dict", "model", "net", "module",
                                  "extras", "module_prefix", "nested_prefix", "other_name"])
def test_pt_round_trips(tmp_path, wrap):
    sd = tiny_net().state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 7, "best_acc": 0.9},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}},
        "model": {"model": sd, "epoch": 3},
        "net": {"net": sd, "acc": 91.2, "epoch": 200},
        "module": {"module": sd},
        "extras": OrderedDict(list(sd.items()) + [("epoch", 5), ("arch", "resnet")]),
        "module_prefix": OrderedDict(("module." + k, v) for k, v in sd.items()),
        "nested_prefix": {"state_dict": OrderedDict(("module." + k, v) for k, v in sd.items()), "epoch": 1},
        "other_name": {"weights": sd, "epoch": 1},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    assert_same(load_state_dict(path), sd)


def test_partial_prefix_is_kept(tmp_path):
    sd = {"module.a": torch.ones(2), "b": torch.zeros(2)}
    torch.save(sd, tmp_path / "c.pt")
    assert list(load_state_dict(str(tmp_path / "c.pt"))) == ["module.a", "b"]


def test_legacy_torch_format_round_trip(tmp_path):
    sd = tiny_net().state_dict()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(tmp_path / "old.pt"), sd)


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny_net().state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    got = load_state_dict(tmp_path / "m.safetensors")
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k])


def test_save_checkpoint_writes_both_and_loads_back(tmp_path):
    net = tiny_net()
    net(torch.randn(2, 1, 8, 8))  # moves the batch norm statistics and num_batches_tracked
    st_path, pt_path = save_checkpoint(net, tmp_path / "sub" / "purified")
    assert st_path == str(tmp_path / "sub" / "purified.safetensors")
    assert pt_path == str(tmp_path / "sub" / "purified.pt")
    assert sorted(os.listdir(tmp_path / "sub")) == ["purified.pt", "purified.safetensors"]  # no temp left over
    sd = net.state_dict()
    for path in (st_path, pt_path):
        got = load_state_dict(path)
        assert set(got) == set(sd)
        for k in sd:
            assert torch.equal(got[k], sd[k]), (path, k)
        fresh = tiny_net()
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        apply_state_dict(fresh, got)
        x = torch.randn(3, 1, 8, 8)
        assert torch.equal(fresh.eval()(x), net.eval()(x))
    # the .pt is a plain state_dict: it loads under the bare weights-only loader
    plain = torch.load(pt_path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in plain.values())


def test_save_checkpoint_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12.0)
    sd = {"tied.a": base, "tied.b": base, "view": base.view(3, 4)[:, 1], "t": torch.randn(3, 4).t()}
    st_path, pt_path = save_checkpoint(sd, str(tmp_path / "shared.pt"))  # a trailing .pt is dropped
    assert st_path.endswith("shared.safetensors") and pt_path.endswith("shared.pt")
    for path in (st_path, pt_path):
        got = load_state_dict(path)
        for k in sd:
            assert torch.equal(got[k], sd[k])
            assert got[k].is_contiguous()


def test_save_checkpoint_rejects_non_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="no tensors"):
        save_checkpoint({}, tmp_path / "x")
    with pytest.raises(CheckpointError, match="'epoch'"):
        save_checkpoint({"w": torch.ones(1), "epoch": 3}, tmp_path / "x")


@pytest.mark.parametrize("style", ["zip", "legacy", "raw_pickle", "nested_in_state_dict"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, style):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    sd = tiny_net().state_dict()
    if style == "zip":
        torch.save({"state_dict": sd, "payload": Payload(marker)}, path)
    elif style == "legacy":
        torch.save({"state_dict": sd, "payload": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif style == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f, protocol=2)
    else:
        torch.save({"state_dict": {**sd, "evil": Payload(marker)}}, path)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # cannot override an explicit weights_only=True
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    text = one_line(exc)
    assert str(path) in text and "refused" in text
    assert "run code" in text and "arbitrary Python objects" in text
    assert "state_dicts" in text and ".safetensors" in text
    assert "open" in text  # names what the pickle asked for
    assert not marker.exists()
    assert seen == [True]  # tried once, weights-only, never retried unsafely


def test_object_that_needs_a_class_is_refused(tmp_path):
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": tiny_net().state_dict()}, tmp_path / "n.pt")
    with pytest.raises(CheckpointError, match=r"refused.*argparse\.Namespace"):
        load_state_dict(tmp_path / "n.pt")


def _good_bytes(tmp_path):
    torch.save(tiny_net().state_dict(), tmp_path / "good.pt")
    return (tmp_path / "good.pt").read_bytes()


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("empty", r"is empty \(0 bytes\)"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("garbage", "not a readable PyTorch checkpoint|refused"),
    ("truncated_safetensors", "not a readable .safetensors file"),
    ("empty_safetensors", r"is empty \(0 bytes\)"),
    ("garbage_safetensors", "not a readable .safetensors file"),
    ("no_tensors", "holds no tensors.*'epoch'"),
    ("single_tensor", "single tensor"),
    ("two_candidates", "several state_dicts"),
])
def test_bad_checkpoint_messages(tmp_path, case, match):
    path = tmp_path / ("x.safetensors" if "safetensors" in case else "x.pt")
    good = _good_bytes(tmp_path)
    if case == "directory":
        path.mkdir()
    elif case in ("empty", "empty_safetensors"):
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "garbage":
        path.write_bytes(b"this is not a checkpoint at all")
    elif case == "truncated_safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.randn(10, 10)}, str(path))
        path.write_bytes(path.read_bytes()[:-37])
    elif case == "garbage_safetensors":
        path.write_bytes(b"\x00" * 64)
    elif case == "no_tensors":
        torch.save({"epoch": 3, "acc": 0.5}, path)
    elif case == "single_tensor":
        torch.save(torch.ones(3), path)
    elif case == "two_candidates":
        sd = tiny_net().state_dict()
        torch.save({"student": sd, "teacher": sd}, path)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_state_dict(path)
    text = one_line(exc)
    assert str(path) in text
    assert isinstance(exc.value, ANPError)


def test_apply_state_dict_mismatch_lists_keys():
    net = tiny_net()
    sd = dict(net.state_dict())
    sd.pop("0.weight")
    sd.pop("1.running_var")
    sd["extra.weight"] = torch.ones(1)
    sd["4.weight"] = torch.ones(5, 144)
    with pytest.raises(CheckpointError) as exc:
        apply_state_dict(net, sd, source="weights.pt")
    text = one_line(exc)
    assert "weights.pt" in text
    assert "2 missing keys: 0.weight, 1.running_var" in text
    assert "1 unexpected key: extra.weight" in text
    assert "1 shape mismatch: 4.weight (checkpoint (5, 144) vs model (3, 144))" in text


def test_apply_state_dict_counts_long_lists():
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    with pytest.raises(CheckpointError, match=r"16 missing keys: 0\.weight, .*\(11 more\); 1 unexpected key: x"):
        apply_state_dict(big, {"x": torch.ones(1)})


def test_apply_state_dict_tolerates_missing_num_batches_tracked():
    net = tiny_net()
    sd = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["1.running_mean"] += 1
    apply_state_dict(net, sd)
    assert torch.equal(net[1].running_mean, sd["1.running_mean"])


def _write_trigger_info(path, **extra):
    """A trigger_info.th as the published code writes it (torch.save of numpy arrays)."""
    import numpy as np

    from test_attacks import _published_trigger

    pattern, mask = _published_trigger("checkerboard_1corner")
    info = {"trigger_pattern": pattern[np.newaxis], "trigger_mask": mask[np.newaxis], "trigger_alpha": 1.0,
            "poison_target": np.array([0]), "data_index": np.arange(7)}
    info.update(extra)
    torch.save(info, path)
    return pattern, mask


def test_published_trigger_info_loads_and_applies_as_published(tmp_path):
    import numpy as np

    from anp_fast.checkpoint import load_trigger_info
    from anp_fast.inputs import make_trigger_spec

    path = tmp_path / "trigger_info.th"
    pattern, mask = _write_trigger_info(path)
    info = load_trigger_info(path)
    assert info["trigger_pattern"].shape == (1, 32, 32, 1) and int(info["poison_target"][0]) == 0
    trig = make_trigger_spec(str(path), (3, 32, 32))
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    # add_predefined_trigger_cifar: ((1 - mask) * data + mask * ((1 - alpha) * data + alpha * pattern)).astype(uint8)
    ref = ((1 - mask) * data + mask * (0.0 * data + 1.0 * pattern)).astype(np.uint8)
    x = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
    ours = (trig.apply(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, ref) and trig.describe()["pixels"] == 9
    with pytest.raises(ANPError, match=r"its trigger is \(1, 32, 32\)"):
        trig.apply(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("style", ["payload", "object_array", "not_a_dict", "missing_key", "bad_alpha"])
def test_bad_or_malicious_trigger_info_is_refused(tmp_path, style):
    import numpy as np

    from anp_fast.checkpoint import load_trigger_info

    marker = tmp_path / "MARKER"
    path = tmp_path / "trigger_info.th"
    if style == "payload":
        _write_trigger_info(path, payload=Payload(marker))
    elif style == "object_array":
        _write_trigger_info(path, data_index=np.array([Payload(marker)], dtype=object))
    elif style == "not_a_dict":
        torch.save([1, 2], path)
    elif style == "missing_key":
        torch.save({"trigger_pattern": np.zeros((1, 4, 4, 1), np.uint8)}, path)
    else:
        _write_trigger_info(path, trigger_alpha=2.0)
    with pytest.raises(CheckpointError) as exc:
        load_trigger_info(path)
    text = one_line(exc)
    assert str(path) in text
    want = {"payload": "refused", "object_array": "refused", "not_a_dict": "not a trigger_info dict",
            "missing_key": "needs trigger_pattern", "bad_alpha": "trigger_alpha 2.0"}[style]
    assert want in text
    assert not marker.exists()
