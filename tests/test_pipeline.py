"""The purification pipeline and its CLI (`anp-fast purify / prune / attack / export-digits`): end to end on tiny
CIFAR-format data for every registry architecture and three torchvision models, resume from the CLI, and one
clear error line with exit code 2 for each bad input -- with no user file lost or half-written."""
import json
import math
import os

import pytest
import torch

from anp_fast import ANPConfig
from anp_fast.checkpoint import load_state_dict, save_checkpoint
from anp_fast.cli import main
from anp_fast.errors import ConfigError
from anp_fast.datasets import write_cifar
from anp_fast.commands import PURIFY_OUTPUTS, run_purify
from anp_fast.inputs import parse_prune_rule
from anp_fast.selection import auto_number
from anp_fast.archs import build_arch


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    g = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (60, 3, 32, 32), generator=g, dtype=torch.uint8)
    test_x = torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8)
    write_cifar(str(root), train_x, torch.arange(60) % 10, test_x, torch.arange(20) % 10)
    return f"cifar10:{root}"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(build_arch("resnet18", num_classes=10, width=4), str(path))
    return str(path) + ".safetensors"


TINY = ["--arch", "resnet18", "--arch-arg", "width=4", "--iters", "2", "--batch-size", "8", "--clean-count", "20",
        "--no-progress", "--prune", "auto:most", "--force"]  # a later --prune wins; the clean walk is tested on its own


def _snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def _fails(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("anp-fast: error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    return err


# ---------------------------------------------------------------------------------------------- end to end
ARCHS = [("resnet18", {"width": 4}), ("resnet34", {"width": 4}), ("resnet50", {"width": 4}),
         ("preact_resnet18", {"width": 4}), ("vgg16_bn", {"width": 0.0625}), ("vgg19_bn", {"width": 0.0625}),
         ("mobilenetv2", {"width": 0.25}), ("wrn16", {"widen": 1}),
         ("resnet18", {}),  # a bare name goes to the registry; tv:resnet18 below is torchvision's
         ("tv:resnet18", {}),
         ("torchvision.models.vision_transformer:VisionTransformer",
          {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}),
         ("convnext_tiny", {})]


@pytest.mark.parametrize("arch,args", ARCHS, ids=[a if not k else f"{a}-{next(iter(k))}" for a, k in ARCHS])
def test_every_architecture_purifies_end_to_end(tmp_path, tiny_cifar, arch, args):
    torch.manual_seed(0)
    ckpt = tmp_path / "in"
    save_checkpoint(build_arch(arch, num_classes=10, **args), str(ckpt))
    out = tmp_path / "out"
    report = run_purify(arch=arch, checkpoint=str(ckpt) + ".pt", data=tiny_cifar, out=str(out),
                        config=ANPConfig(iters=2, batch_size=8, seed=1), arch_args=args, clean_count=20,
                        # the clean walk costs a clean pass per neuron: walked on the small models only
                        prune_rule="auto" if arch in ("resnet18", "wrn16") and args else "auto:most",
                        trigger="badnets", target=0, progress=False, log=lambda *a: None,
                        force=True)  # random weights: the plausibility check would stop it
    for name in PURIFY_OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert report["neurons"] > 0 and 0 <= report["pruned_neurons"] <= report["neurons"]
    assert set(report["after"]) == {"acc", "asr", "holdout_acc", "holdout_loss", "clean_acc", "clean_loss",
                                    "select_acc", "select_loss"}
    purified = load_state_dict(str(out / "purified.safetensors"))
    assert purified.keys() == load_state_dict(str(out / "purified.pt")).keys()
    model = build_arch(arch, num_classes=10, **args)
    model.load_state_dict(purified)  # the purified checkpoint fits the architecture


def test_attack_then_purify_from_the_cli(tmp_path, tiny_cifar, capsys):
    att = tmp_path / "attack"
    assert main(["attack", "--arch", "resnet18", "--arch-arg", "width=4", "--data", tiny_cifar, "--epochs", "1",
                 "--batch-size", "16", "--out", str(att), "--no-progress"]) == 0
    report = json.loads((att / "attack.json").read_text())
    assert report["poisoned"] > 0 and 0 <= report["asr"] <= 1
    out = tmp_path / "purified"
    assert main(["purify", *TINY, "--checkpoint", str(att / "backdoored.safetensors"), "--data", tiny_cifar,
                 "--trigger", "badnets", "--target", "0", "--prune", "threshold:0.3", "--out", str(out)]) == 0
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0] == ("threshold,pruned,holdout_acc,holdout_loss,clean_acc,clean_loss,select_acc,select_loss,acc,"
                       "asr") and len(rows) == 21
    masks_out = tmp_path / "pruned"
    assert main(["prune", "--arch", "resnet18", "--arch-arg", "width=4", "--checkpoint",
                 str(att / "backdoored.pt"), "--masks", str(out / "masks.txt"), "--data", tiny_cifar,
                 "--clean-count", "20", "--prune", "auto", "--out", str(masks_out), "--force"]) == 0
    assert (masks_out / "pruned.safetensors").exists() and (masks_out / "prune_report.json").exists()


def test_resume_from_the_cli_matches_an_uninterrupted_run(tmp_path, tiny_cifar, tiny_checkpoint, monkeypatch):
    from anp_fast.engine import ANPEngine

    common = [*TINY, "--iters", "6", "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--no-progress",
              "--no-channels-last"]
    full = tmp_path / "full"
    assert main(["purify", *common, "--out", str(full)]) == 0
    real = ANPEngine.draw_noise
    calls = []

    def interrupt_on_fifth(self, w, b, eps):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(self, w, b, eps)
    monkeypatch.setattr(ANPEngine, "draw_noise", interrupt_on_fifth)
    part = tmp_path / "part"
    assert main(["purify", *common, "--save-every", "2", "--out", str(part)]) == 130
    monkeypatch.undo()
    assert torch.load(part / "anp_state.pt", weights_only=True)["iteration"] == 4
    assert main(["purify", "--resume", str(part)]) == 0
    assert (part / "masks.txt").read_text() == (full / "masks.txt").read_text()
    assert json.loads((part / "report.json").read_text())["anp"]["resumed_at"] == 4


def _readme_front_end_method():
    """The README's front-end method, run as written there (up to its register_method line)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "register_method(" in b]
    code = block[:block.index("\n", block.index('register_method("'))]
    exec(compile(code, "README.md", "exec"), {})


def _wrapped_anp():
    from anp_fast.methods import anp, register_method

    register_method("anp-wrapped", lambda *args, **kwargs: anp(*args, **kwargs))


@pytest.mark.parametrize("method, register, state", [("clean-masks", _readme_front_end_method, "clean-masks_state.pt"),
                                                     ("anp-wrapped", _wrapped_anp, "anp_state.pt")])
def test_a_front_end_method_resumes_where_purify_looks(tmp_path, tiny_cifar, tiny_checkpoint, monkeypatch, method,
                                                       register, state):
    """A front end's method resumes: the README's own, which keeps its state under its own name, and a wrapper of
    ANP, which keeps it under ANP's. An interrupted run goes on from there with the masks of an uninterrupted
    run."""
    from anp_fast.engine import ANPEngine
    from anp_fast.methods import METHODS, _STATE_FILES, state_files

    register()
    try:
        assert state_files(method) == (f"{method}_state.pt",)
        common = [*TINY, "--iters", "6", "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--no-progress",
                  "--no-channels-last", "--method", method]
        full = tmp_path / "full"
        assert main(["purify", *common, "--out", str(full)]) == 0
        real, calls = ANPEngine.step, []

        def interrupt_on_fifth(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)
        monkeypatch.setattr(ANPEngine, "step", interrupt_on_fifth)
        part = tmp_path / "part"
        assert main(["purify", *common, "--save-every", "2", "--out", str(part)]) == 130
        monkeypatch.undo()
        assert [p.name for p in part.glob("*_state.pt")] == [state]
        assert torch.load(part / state, weights_only=True)["iteration"] == 4
        assert main(["purify", "--resume", str(part)]) == 0
        assert (part / "masks.txt").read_text() == (full / "masks.txt").read_text()
        assert json.loads((part / "report.json").read_text())["anp"]["resumed_at"] == 4
    finally:
        METHODS.pop(method, None)
        _STATE_FILES.pop(method, None)


def test_register_method_refuses_bad_names_and_state_files():
    from anp_fast.commands import PURIFY_OUTPUTS
    from anp_fast.methods import METHODS, _STATE_FILES, register_method, state_files

    def learn(*args, **kwargs):
        return None

    for files in ("mine_extra.pt", ("../elsewhere.pt",), ("..",), (".",), ("",), ("a\\b.pt",), ("a\0.pt",),
                  ("command.json",), (PURIFY_OUTPUTS[2],), (3,)):
        with pytest.raises(ConfigError, match="plain file names"):
            register_method("mine", learn, state_files=files)
    for name in ("", "mine/x", "m\u00efne", "ANP"):
        with pytest.raises(ConfigError, match="method name"):
            register_method(name, learn)
    assert "mine" not in METHODS
    with pytest.raises(ConfigError, match="unknown method 'mine'"):
        state_files("mine")
    try:  # any iterable of names, a generator included
        register_method("mine", learn, state_files=(f for f in ["mine_extra.pt"]))
        assert state_files("mine") == ("mine_state.pt", "mine_extra.pt")
    finally:
        METHODS.pop("mine", None)
        _STATE_FILES.pop("mine", None)


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_and_truncated_checkpoints(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    _fails(capsys, ["purify", *TINY, "--checkpoint", str(tmp_path / "nope.pt"), "--data", tiny_cifar,
                    "--out", str(out)], "nope.pt")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(tiny_checkpoint, "rb").read()[:100])
    _fails(capsys, ["purify", *TINY, "--checkpoint", str(truncated), "--data", tiny_cifar, "--out", str(out)],
           "cut.safetensors")
    assert not out.exists()  # nothing written before every input was checked


def test_malicious_checkpoint_is_refused_from_the_cli(tmp_path, tiny_cifar, capsys):
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil()}, bad)
    _fails(capsys, ["purify", *TINY, "--checkpoint", str(bad), "--data", tiny_cifar, "--out",
                    str(tmp_path / "o")], "refused")
    assert not marker.exists()


def test_architecture_mismatch_lists_the_keys(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    err = _fails(capsys, ["purify", "--arch", "resnet34", "--arch-arg", "width=4", "--checkpoint", tiny_checkpoint,
                          "--data", tiny_cifar, "--out", str(tmp_path / "o"), "--no-progress"], "missing")
    assert "unexpected" in err or "layer1.2" in err


def test_unknown_architecture_and_dataset(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    _fails(capsys, ["purify", *TINY[2:], "--arch", "resnet1800", "--checkpoint", tiny_checkpoint, "--data",
                    tiny_cifar, "--out", str(tmp_path / "o")], "unknown architecture 'resnet1800'")
    _fails(capsys, ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", "mnist:/x",
                    "--out", str(tmp_path / "o")], "mnist")


def test_wrong_data_layout(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    _fails(capsys, ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", f"cifar10:{tmp_path}",
                    "--out", str(tmp_path / "o")], "data_batch")


def test_clean_set_smaller_than_a_batch_offers_sampling(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    argv = ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--batch-size", "64",
            "--out", str(tmp_path / "o")]
    _fails(capsys, argv, "--sample-with-replacement")
    assert not (tmp_path / "o").exists()
    assert main(argv + ["--sample-with-replacement"]) == 0


def test_target_out_of_range_and_trigger_without_target(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    base = ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--out", str(tmp_path / "o")]
    _fails(capsys, base + ["--trigger", "badnets", "--target", "10"], "--target 10")
    _fails(capsys, base + ["--trigger", "badnets"], "--trigger needs --target")
    _fails(capsys, base + ["--prune", "threshold:x"], "--prune 'threshold:x'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_requested_where_there_is_none(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    _fails(capsys, ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--device", "cuda",
                    "--out", str(tmp_path / "o")], "no CUDA GPU")


def test_cuda_graphs_without_a_cuda_device(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    _fails(capsys, ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--cuda-graphs",
                    "--out", str(tmp_path / "o")], "--cuda-graphs needs --device cuda")
    assert not (tmp_path / "o").exists()


def test_existing_results_are_never_overwritten_silently(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    argv = ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--out", str(out)]
    assert main(argv) == 0
    (out / "my_notes.txt").write_text("mine")
    before = _snapshot(out)
    _fails(capsys, argv, "already holds results")
    assert _snapshot(out) == before  # nothing touched
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "my_notes.txt").read_text() == "mine"  # --overwrite replaces our files only


def test_resume_without_a_run_and_missing_arguments(tmp_path, capsys):
    _fails(capsys, ["purify", "--resume", str(tmp_path)], "no anp-fast purify run there")
    _fails(capsys, ["purify", "--arch", "resnet18"], "purify needs --checkpoint, --data, --out")


# ---------------------------------------------------------------------------------------------- helpers
def test_prune_rules_and_auto_choice():
    assert parse_prune_rule("threshold:0.2") == {"threshold": 0.2}
    assert parse_prune_rule("number:5") == {"number": 5}
    assert parse_prune_rule("fraction:0.1") == {"fraction": 0.1}
    assert parse_prune_rule("auto") == {"auto": True, "mode": "walk"}
    assert parse_prune_rule("auto:most") == {"auto": True, "mode": "most"}
    with pytest.raises(ConfigError, match="auto modes"):
        parse_prune_rule("auto:best")

    # auto: a held-out accuracy losing 0.1 point per pruned neuron -> a 2-point budget allows exactly 20
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 150, 1), torch.nn.BatchNorm2d(150))
    masks = {"1": torch.rand(150, generator=torch.Generator().manual_seed(0))}
    seen = []

    def evaluator(m, holdout_only=False):
        assert holdout_only  # auto never looks at the test split or triggered data
        zeros = int((m[1].weight == 0).sum())
        seen.append(zeros)
        return {"holdout_acc": 1.0 - 0.001 * zeros}
    assert auto_number(model, masks, evaluator, 2.0) == {"number": 20}
    assert auto_number(model, masks, evaluator, 0.0) == {"number": 0}
    assert auto_number(model, masks, evaluator, 100.0) == {"number": 150}
    assert len(seen) < 3 * 40  # grid + bisection, not every count


def _walk_problem(reads=(0.0, 1, 1, 0, 1, 1), masks=(0.05, 0.1, 0.3, 0.4, 0.5, 0.6)):
    """Channels that copy the input (+1 for class 1, -1 for class 0), read by the classifier with weight
    ``reads[i]``. By default six channels, of which 1, 2, 4, 5 are read: pruning 0 or 3 costs nothing and
    pruning any other one shrinks the margin (loss up)."""
    from torch.utils.data import TensorDataset

    from anp_fast.evaluation import Evaluator

    n = len(reads)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, n, 1, bias=False), torch.nn.BatchNorm2d(n),
                                torch.nn.Flatten(), torch.nn.Linear(n, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        weights = torch.tensor(reads, dtype=torch.float32)
        model[3].weight.copy_(torch.stack([-weights, weights]))
    model.eval()
    y = torch.arange(40) % 2
    x = (2.0 * y - 1).float().view(-1, 1, 1, 1)
    half = TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:])
    evaluator = Evaluator(torch.device("cpu"), half[0], half[0], None, None, clean=half[1])
    # default mask order: 0 (harmless), 1 (read, below the floor), 2 (read), 3 (harmless), 4, 5 (read)
    return model, {"1": torch.tensor(masks)}, evaluator


def test_clean_walk_keeps_costly_neurons_and_goes_on():
    from anp_fast.pruning import prune
    from anp_fast.selection import choose, walk

    model, masks, evaluator = _walk_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # every neuron takes the loss test by default: 0 pruned; 1, 2 kept (loss up); 3 pruned; 4, 5 kept
    full = dict(max_fraction=1.0)
    assert walk(model, masks, evaluator, 2.0, tau=1e-6, patience=9, **full)[0] == {"neurons": {"1": [0, 3]}}
    assert walk(model, masks, evaluator, 2.0, tau=1e-6, patience=3, **full)[0] == {"neurons": {"1": [0, 3]}}
    assert walk(model, masks, evaluator, 2.0, tau=1e-6, patience=2, **full)[0] == {"neurons": {"1": [0]}}
    # with floor 0.2 (the published threshold) 1 is pruned unconditionally (mask < floor); 2 kept; 3 pruned
    floor = dict(full, floor=0.2)
    assert walk(model, masks, evaluator, 2.0, tau=1e-6, patience=2, **floor)[0] == {"neurons": {"1": [0, 1, 3]}}
    assert walk(model, masks, evaluator, 2.0, tau=1e-6, patience=1, **floor)[0] == {"neurons": {"1": [0, 1]}}
    # the walk covers the lowest 60% of the neurons by default: 0, 1, 2 here
    assert walk(model, masks, evaluator, 2.0, tau=1e-6, patience=9, floor=0.2)[0] == {"neurons": {"1": [0, 1]}}
    assert walk(model, masks, evaluator, 2.0, tau=1e-6, patience=9)[0] == {"neurons": {"1": [0]}}
    # a loose tau prunes everything the accuracy budget allows: the last read channel is kept (accuracy 0.5)
    assert walk(model, masks, evaluator, 2.0, tau=10.0, patience=9, **full)[0] == {"neurons": {"1": [0, 1, 2, 3, 4]}}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    rule = choose(model, masks, evaluator, 2.0)["rule"]
    pruned = prune(model, masks, **rule)
    assert pruned[1].weight.tolist() == [0.0 if i in rule["neurons"]["1"] else 1.0 for i in range(6)]
    with pytest.raises(ConfigError, match="patience"):
        walk(model, masks, evaluator, 2.0, patience=0)


def test_clean_walk_gain_tau_keeps_neurons_whose_pruning_lowers_the_clean_loss():
    """Channel 0 carries the class (+1), channel 1 works against it (-0.5: pruning it lowers the loss), channel
    2 is unread. Off by default: 1 and 2 are pruned; with gain_tau 1 is kept (and not counted toward patience); a
    loose gain_tau changes nothing."""
    from anp_fast.selection import walk

    model, masks, evaluator = _walk_problem(reads=(1.0, -0.5, 0.0), masks=(0.1, 0.2, 0.3))
    kw = dict(tau=1e-6, patience=9, max_fraction=1.0, evidence=False)
    assert walk(model, masks, evaluator, 2.0, **kw)[0] == {"neurons": {"1": [1, 2]}}
    assert walk(model, masks, evaluator, 2.0, gain_tau=1e-6, **kw)[0] == {"neurons": {"1": [2]}}
    assert walk(model, masks, evaluator, 2.0, gain_tau=100.0, **kw)[0] == {"neurons": {"1": [1, 2]}}
    # a neuron kept by the gain test does not count toward patience: with patience 2 the walk passes 0 (costly)
    # and 1 (gain) and still reaches 2
    assert walk(model, masks, evaluator, 2.0, gain_tau=1e-6, **dict(kw, patience=2))[0] == {"neurons": {"1": [2]}}
    with pytest.raises(ConfigError, match=r"gain_tau=-1\.0"):
        walk(model, masks, evaluator, 2.0, gain_tau=-1.0)


def test_clean_walk_is_checked_on_the_held_out_split_and_backs_off():
    """The walk decides on the method's clean set alone; the held-out split, which no decision saw, catches a
    pruning that costs accuracy there and the walk keeps the longest prefix of its prunings within budget.
    Channel 3 reads input b, which is 0 in the clean set (pruning it is free there) and carries the class in
    the held-out split (pruning it costs 50 points there)."""
    from torch.utils.data import TensorDataset

    from anp_fast.evaluation import Evaluator
    from anp_fast.selection import walk

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 1, bias=False), torch.nn.BatchNorm2d(6),
                                torch.nn.Flatten(), torch.nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:, 0] = 1.0
        model[0].weight[3] = torch.tensor([0.0, 1.0]).view(2, 1, 1)
        reads = torch.tensor([0.0, 1, 1, 3, 1, 1])
        model[3].weight.copy_(torch.stack([-reads, reads]))
    model.eval()
    y = torch.arange(40) % 2
    sign = (2.0 * y - 1).float()
    clean = TensorDataset(torch.stack([sign, 0 * sign], 1).view(-1, 2, 1, 1), y)
    holdout = TensorDataset(torch.stack([0 * sign, sign], 1).view(-1, 2, 1, 1), y)
    evaluator = Evaluator(torch.device("cpu"), holdout, holdout, None, None, clean=clean)
    masks = {"1": torch.tensor([0.05, 0.1, 0.3, 0.15, 0.5, 0.6])}  # walk order 0, 1, 3, 2, 4, 5
    # floor 0.2: channel 1 (mask 0.1, read) is pruned without the loss test, the budget alone decides
    options = dict(tau=1e-6, patience=2, max_fraction=1.0, evidence=False, floor=0.2)
    rule, report = walk(model, masks, evaluator, 2.0, **options)
    assert rule == {"neurons": {"1": [0, 1]}}
    assert report["verified"] and report["walked"] == 3 and report["kept"] == 2
    rule, report = walk(model, masks, evaluator, 60.0, **options)  # 50 points are within this budget
    assert rule == {"neurons": {"1": [0, 1, 3]}} and report["kept"] == 3
    # unverified, all clean data decides: pruning 3 costs 25 points of the pooled data and is refused
    rule, report = walk(model, masks, evaluator, 2.0, verify=False, **options)
    assert rule == {"neurons": {"1": [0, 1]}} and not report["verified"] and report["walked"] == 2


def test_clean_walk_decides_on_a_share_of_the_budget_when_a_held_out_split_checks():
    """``decide_fraction``: the walk's decisions may spend only that share of the budget on the deciding set
    (the held-out check keeps the whole budget). Pruning channel 0 costs 5 points on the clean set (2 of 40
    images need it) and nothing on the held-out split: within a 6-point budget, refused at half of it."""
    from torch.utils.data import TensorDataset

    from anp_fast.evaluation import Evaluator
    from anp_fast.selection import walk

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1, bias=False), torch.nn.BatchNorm2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        model[3].weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    model.eval()
    y = torch.arange(40) % 2
    sign = (2.0 * y - 1).float()
    a, b = sign.clone(), sign.clone()
    a[:2], b[:2] = 3 * sign[:2], -sign[:2]  # right only while channel 0 is there
    clean = TensorDataset(torch.stack([a, b], 1).view(-1, 2, 1, 1), y)
    holdout = TensorDataset(torch.stack([sign, sign], 1).view(-1, 2, 1, 1), y)
    evaluator = Evaluator(torch.device("cpu"), holdout, holdout, None, None, clean=clean)
    masks = {"1": torch.tensor([0.05, 0.9])}
    options = dict(max_fraction=0.5, evidence=False, floor=0.2)  # channel 0 only, the budget alone decides
    assert walk(model, masks, evaluator, 6.0, **options)[0] == {"neurons": {"1": [0]}}
    assert walk(model, masks, evaluator, 6.0, decide_fraction=0.5, **options)[0] == {"neurons": {}}
    assert walk(model, masks, evaluator, 12.0, decide_fraction=0.5, **options)[0] == {"neurons": {"1": [0]}}
    # unverified (all clean data decides: 2 of 80 images, 2.5 points), nothing checks: the whole budget decides
    assert walk(model, masks, evaluator, 3.0, decide_fraction=0.5, verify=False, **options)[0] == {
        "neurons": {"1": [0]}}
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="decide_fraction"):
            walk(model, masks, evaluator, 6.0, decide_fraction=bad, **options)


# Mistakes found by probing the CLI: each refused up front, in one line, before anything is written or run.
@pytest.mark.parametrize("extra,message", [
    (["--prune", "number:4000"], "--prune number:4000: the model has"),
    (["--holdout-fraction", "0"], "--prune auto chooses the amount on held-out clean data"),
    (["--budget", "nan"], "--budget nan: must be a finite number"),
    (["--arch-arg", "num_classes=3"], "--arch-arg num_classes: set by the data set"),
    (["--device", "foo"], "--device 'foo': not a device"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--save-every", "-1"], "--save-every -1: must be >= 0"),
    (["--stop-patience", "2", "--stop-overlap", "1.5"], "--stop-overlap 1.5: must be in (0, 1]"),
    (["--stop-patience", "2", "--stop-threshold", "0"], "--stop-threshold 0.0: must be in (0, 1)"),
    (["--stop-patience", "2", "--stop-threshold", "1"], "--stop-threshold 1.0: must be in (0, 1)"),
    (["--stop-overlap", "0.8"], "give --stop-patience K as well"),
])
def test_purify_refuses_before_running(tmp_path, tiny_cifar, tiny_checkpoint, capsys, extra, message):
    _fails(capsys, ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar,
                    "--out", str(tmp_path / "o"), *extra], message)
    assert not (tmp_path / "o").exists()


def test_resume_of_a_finished_run_says_so(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    argv = ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--prune", "threshold:0.2",
            "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    _fails(capsys, ["purify", "--resume", str(tmp_path / "o")], "holds a finished run")


@pytest.mark.parametrize("extra,message", [
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
])
def test_attack_refuses_bad_training_values(tmp_path, tiny_cifar, capsys, extra, message):
    _fails(capsys, ["attack", "--arch", "resnet18", "--arch-arg", "width=4", "--data", tiny_cifar, "--epochs", "1",
                    "--out", str(tmp_path / "a"), *extra], message)
    assert not (tmp_path / "a").exists()


def test_prune_refuses_a_checkpoint_as_masks_and_warns_of_partial_masks(tmp_path, tiny_cifar, tiny_checkpoint,
                                                                        capsys):
    base = ["prune", "--arch", "resnet18", "--arch-arg", "width=4", "--checkpoint", tiny_checkpoint, "--data",
            tiny_cifar, "--clean-count", "20", "--force"]
    _fails(capsys, base + ["--masks", tiny_checkpoint, "--out", str(tmp_path / "p")], "is not text")
    partial = tmp_path / "partial.txt"
    partial.write_text("No \t Layer Name \t Neuron Idx \t Mask Score\n"
                       + "".join(f"{i} \t bn1 \t {i} \t 0.1000\n" for i in range(4)))
    assert main(base + ["--masks", str(partial), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "has masks for 1 of the model's 20 perturbable layers" in out


def test_export_digits_into_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "f.txt"
    target.write_text("mine")
    _fails(capsys, ["export-digits", str(target)], "exists and is not a directory")
    assert target.read_text() == "mine"


def test_attack_is_reproducible_from_its_seed(tmp_path):
    """The same seed gives the same checkpoint, whatever the global RNG state before (the initial weights are
    drawn from the seed too); another seed gives another model."""
    from anp_fast.commands import run_attack

    outs = []
    for i, seed in enumerate((3, 3, 4)):
        torch.manual_seed(100 + i)  # a caller's RNG state must not matter
        run_attack(arch="resnet18", data="digits", out=str(tmp_path / f"a{i}"), epochs=1, arch_args={"width": 4},
                   seed=seed, progress=False, log=lambda *a: None)
        outs.append(load_state_dict(str(tmp_path / f"a{i}" / "backdoored.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_resume_of_a_finished_run_with_saved_state_changes_nothing(tmp_path, tiny_cifar, tiny_checkpoint, capsys):
    """A run with --save-every keeps its state file after finishing; --resume used to re-run the last iterations
    and rewrite every output. Now it says the run is finished and leaves every file as it was."""
    out = tmp_path / "o"
    assert main(["purify", *TINY, "--iters", "4", "--save-every", "2", "--checkpoint", tiny_checkpoint, "--data",
                 tiny_cifar, "--prune", "threshold:0.2", "--out", str(out)]) == 0
    assert (out / "anp_state.pt").exists()  # kept after finishing: what the old resume picked up
    before = _snapshot(str(out))
    _fails(capsys, ["purify", "--resume", str(out)], "holds a finished run")
    assert _snapshot(str(out)) == before


def test_resume_works_from_another_directory(tmp_path, tiny_cifar, tiny_checkpoint, monkeypatch):
    """command.json records the directory the run started in: relative paths resolve from there."""
    from anp_fast.engine import ANPEngine

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ckpt = os.path.relpath(tiny_checkpoint, work)
    calls = {"n": 0}
    real = ANPEngine.step

    def stop_after_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ANPEngine, "step", stop_after_two)
    assert main(["purify", *TINY, "--iters", "6", "--save-every", "2", "--checkpoint", ckpt, "--data", tiny_cifar,
                 "--prune", "threshold:0.2", "--out", "run"]) == 130
    monkeypatch.setattr(ANPEngine, "step", real)
    elsewhere = tmp_path / "a" / "b" / "c"  # another depth: the relative paths would miss from here
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert main(["purify", "--resume", str(work / "run")]) == 0
    assert (work / "run" / "report.json").exists()


def test_ctrl_c_outside_the_anp_loop_is_a_clean_exit(tmp_path, tiny_cifar, tiny_checkpoint, monkeypatch, capsys):
    import anp_fast.commands as commands

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_pruning_sweep", interrupt)
    masks = tmp_path / "m.txt"
    from anp_fast import save_masks
    from anp_fast.surgery import perturbable_layers

    model = build_arch("resnet18", num_classes=10, width=4)
    save_masks({n: torch.full((k,), 0.5) for n, k in perturbable_layers(model)}, str(masks))
    rc = main(["prune", "--arch", "resnet18", "--arch-arg", "width=4", "--checkpoint", tiny_checkpoint, "--masks",
               str(masks), "--data", tiny_cifar, "--clean-count", "20", "--force", "--out", str(tmp_path / "p")])
    assert rc == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_the_old_pipeline_module_still_serves_older_imports():
    """Front ends that imported the commands from anp_fast.pipeline before the split get the same objects."""
    import anp_fast.commands as commands
    import anp_fast.evaluation as evaluation
    import anp_fast.inputs as inputs
    import anp_fast.pipeline as pipeline

    assert pipeline.run_purify is commands.run_purify and pipeline.run_attack is commands.run_attack
    assert pipeline.Evaluator is evaluation.Evaluator and pipeline.load_model_and_data is inputs.load_model_and_data
    assert set(pipeline.__all__) <= set(dir(pipeline))


class _Confident(torch.nn.Module):
    """Logits margin * onehot(label), both read from the image: x[:, 0, 0, 0] the label, x[:, 0, 0, 1] the
    margin (the cross-entropy of a right answer is log(1 + 9 exp(-margin)))."""

    def forward(self, x):
        return x[:, 0, 0, 1:2] * torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()


def _margin_set(margins, wrong=0):
    from torch.utils.data import TensorDataset

    n = len(margins)
    y = torch.arange(n) % 10
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 0] = y.float()
    x[:wrong, 0, 0, 0] = ((y[:wrong] + 1) % 10).float()  # the first `wrong` images are misclassified
    x[:, 0, 0, 1] = torch.tensor(margins, dtype=torch.float32)
    return TensorDataset(x, y)


@pytest.mark.parametrize("held,test,wrong,memorized", [
    (10.0, 6.0, 0, True),    # held out fitted 50x tighter than unseen test images: trained on
    (8.0, 8.0, 0, False),    # as tight as the test split (an easy data set, the digits demo): not memorized
    (6.0, 9.0, 0, False),    # loose fit (0.022 nats)
    (10.0, 6.0, 3, False),   # 3 of 100 wrong: below 99% accuracy
])
def test_memorized_held_out_images_are_told_apart_from_an_easy_data_set(held, test, wrong, memorized):
    from anp_fast.evaluation import Evaluator, memorization

    evaluator = Evaluator(torch.device("cpu"), _margin_set([test] * 60), _margin_set([held] * 100, wrong))
    model = _Confident()
    found = memorization(model, evaluator, evaluator(model))
    assert found["memorized"] is memorized, found
    assert found["holdout_fit"] == pytest.approx(math.log1p(9 * math.exp(-held)), rel=1e-3)  # fp32 logits


def test_the_tolerant_stop_rule_ends_purify_early(tmp_path, tiny_cifar, tiny_checkpoint):
    """--stop-threshold T compares the sets of masks at or below T (no evaluation per check); --stop-overlap F
    takes consecutive sets that overlap by F for unchanged. Masks start at 1 and fall: the set at or below 0.99
    grows and settles over the first iterations, overlapping by 0.8-0.9 by about the sixth (never by 1)."""
    out = tmp_path / "o"
    argv = ["purify", *TINY, "--checkpoint", tiny_checkpoint, "--data", tiny_cifar, "--out", str(out),
            "--prune", "threshold:0.2", "--iters", "16", "--stop-patience", "2", "--stop-every", "1",
            "--stop-overlap", "0.8", "--stop-threshold", "0.99"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    stop = report["stop_rule"]
    assert stop["overlap"] == 0.8 and stop["threshold"] == 0.99
    checks = stop["checks"]
    assert all(c["rule"] == {"threshold": 0.99} for c in checks)
    # it stopped at the first check whose last two overlaps reach 0.8, with the sets still moving
    first = next(k for k in range(2, len(checks)) if checks[k - 1]["overlap"] >= 0.8 and checks[k]["overlap"] >= 0.8)
    assert stop["stopped_at"] == checks[first]["iteration"] == checks[-1]["iteration"] < 16
    assert report["anp"]["iters"] == stop["stopped_at"] and checks[first]["overlap"] < 1
