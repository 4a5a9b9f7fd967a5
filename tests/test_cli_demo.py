"""The anp-fast command line and the digits demo, end to end."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from anp_fast import load_masks
from anp_fast.cli import main
from anp_fast.models import resnet18


def test_demo_purifies_at_one_and_two_threads(tmp_path):
    """The acceptance on a real backdoor, for users with one core and with two (seeded runs differ between
    thread counts: reduction order): ASR >= 95% before, <= 5% after, ACC drop <= 2 points, the amount chosen by
    the held-out clean rule. In bf16 to fit CI's time. Both runs at once, with OpenMP threads that sleep rather
    than spin while they wait: 3 spinning threads on CI's two cores made the 2-thread run's training 7x slower
    (71 s against 9.4 s alone), passive ones finish both demos in 367 s against 330 + 250 s one after the
    other. The thread count, not the load, fixes the reduction order, so each result is that of a quiet run."""
    procs = {}
    for threads in (2, 1):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "OMP_WAIT_POLICY": "PASSIVE"}
        with open(tmp_path / f"out{threads}", "w") as stdout, open(tmp_path / f"err{threads}", "w") as stderr:
            procs[threads] = subprocess.Popen(  # files, not pipes: neither run can block on a full pipe
                [sys.executable, "-m", "anp_fast.cli", "demo", "--out", str(tmp_path / f"demo{threads}"),
                 "--no-progress", "--precision", "bf16"], env=env, stdout=stdout, stderr=stderr)
    for proc in procs.values():
        proc.wait(timeout=1500)
    for threads, proc in procs.items():
        out = tmp_path / f"demo{threads}"
        stdout, stderr = (tmp_path / f"out{threads}").read_text(), (tmp_path / f"err{threads}").read_text()
        assert proc.returncode == 0, stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["threads"] == threads
        assert summary["before"]["asr"] >= 0.95, (threads, summary["before"])
        assert summary["after"]["asr"] <= 0.05, (threads, summary["after"], summary["chosen"])
        assert summary["before"]["acc"] - summary["after"]["acc"] <= 0.02, (threads, summary["after"])
        assert summary["prune"] == "auto" and "neurons" in summary["chosen"]
        choice = summary["choice"]  # the default: the walk with pre-activation evidence, checked on held-out data
        assert choice["name"] == "clean-walk+evidence" and choice["evidence"]["verified"], choice
        assert choice["evidence"]["kept"] == summary["pruned_neurons"], (choice, summary["pruned_neurons"])
        assert summary["plausibility"]["ok"], summary["plausibility"]  # the check passes a real model
        assert summary["sizes"]["holdout"] > 0
        for name in ("masks.txt", "summary.json", "sweep.csv", "anp_demo.png", "purified.pt", "backdoored.pt"):
            assert (out / name).stat().st_size > 0, name
        masks = load_masks(out / "masks.txt")
        assert sum(m.numel() for m in masks.values()) == summary["neurons"]
        model = resnet18(10, 1, 16)
        model.load_state_dict(torch.load(out / "purified.pt", weights_only=True))
        zeroed = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert zeroed >= summary["pruned_neurons"]
        assert (out / "anp_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "before ANP" in stdout and "after ANP (clean walk" in stdout
        assert summary["config"]["precision"] == "bf16" and summary["config"]["iters"] == 2000


def test_demo_threshold_is_still_a_choice(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--iters", "3", "--epochs", "1", "--no-progress",
                 "--threshold", "0.5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen"] == {"threshold": 0.5} and "after ANP (threshold 0.5)" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--iters", "3", "--threshold", "0.5", "--prune", "number:3",
                 "--overwrite"]) == 2


def test_demo_refuses_a_folder_with_foreign_results(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"mine": 1}')
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--epochs", "1", "--no-progress"]) == 2
    assert "already holds summary.json" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("args,message", [
    (["demo", "--iters", "0"], "ANPConfig.iters=0: must be >= 1"),
    (["demo", "--eps", "-1"], "ANPConfig.eps=-1.0: must be >= 0"),
    (["demo", "--target", "12"], "--target 12: digits has classes 0-9"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "anp_fast.cli", *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"anp-fast: error: {message}"
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o" / "summary.json")


def test_the_demo_is_the_attack_and_purify_commands(tmp_path, monkeypatch, capsys):
    """The demo calls `anp-fast attack` and `anp-fast purify` and prints them; run by hand, the printed commands
    give the same checkpoint and the same masks."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "d", "--iters", "4", "--epochs", "1", "--no-progress", "--threshold", "0.5",
                 "--eps", "0.3", "--no-fullgraph"]) == 0
    printed = [line[len("$ anp-fast "):] for line in capsys.readouterr().out.splitlines()
               if line.startswith("$ anp-fast ")]
    assert [p.split()[0] for p in printed] == ["attack", "purify"]
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    for line, recorded in zip(printed, (summary["commands"]["attack"], summary["commands"]["purify"])):
        assert shlex.split(line) == recorded[1:]
    assert "--eps" in printed[1] and "--no-fullgraph" in printed[1] and summary["config"]["eps"] == 0.3
    moved = {"d": "h", os.path.join("d", "backdoored.safetensors"): os.path.join("h", "backdoored.safetensors")}
    by_hand = [[moved.get(arg, arg) for arg in shlex.split(line)] for line in printed]
    assert by_hand[1][by_hand[1].index("--checkpoint") + 1] == "h/backdoored.safetensors"
    for argv in by_hand:
        assert main(argv + ["--no-progress"]) == 0
    assert (tmp_path / "h" / "backdoored.pt").read_bytes() == (tmp_path / "d" / "backdoored.pt").read_bytes()
    assert (tmp_path / "h" / "masks.txt").read_text() == (tmp_path / "d" / "masks.txt").read_text()
    hand = json.loads((tmp_path / "h" / "report.json").read_text())
    assert hand["after"] == summary["after"] and hand["pruned_neurons"] == summary["pruned_neurons"]


def test_an_interrupted_demo_continues_with_purify_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the demo's ANP loop saves the run state; `anp-fast purify --resume OUT` (from another
    directory too) ends with the masks of an uninterrupted demo."""
    from anp_fast.engine import ANPEngine

    args = ["--iters", "6", "--epochs", "1", "--no-progress", "--threshold", "0.5"]
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "full", *args]) == 0
    real, calls = ANPEngine.draw_noise, []

    def draw(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real(self, *a)
    monkeypatch.setattr(ANPEngine, "draw_noise", draw)
    assert main(["demo", "--out", "cut", *args]) == 130
    monkeypatch.undo()
    assert "continue with --resume cut" in capsys.readouterr().out
    assert not (tmp_path / "cut" / "masks.txt").exists()
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["purify", "--resume", str(tmp_path / "cut")]) == 0
    assert (tmp_path / "cut" / "masks.txt").read_text() == (tmp_path / "full" / "masks.txt").read_text()
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["anp"]["resumed_at"] == 3
