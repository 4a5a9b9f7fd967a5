"""The anp-fast command line and the digits demo, end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from anp_fast import load_masks
from anp_fast.cli import main
from anp_fast.models import resnet18


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_demo_purifies_the_backdoor(tmp_path, capsys, precision):
    """The acceptance on a real backdoor: ASR >= 95% before, <= 5% after, ACC drop <= 2 points, in the
    exact precision and in bf16."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--precision", precision]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["asr"] >= 0.95
    assert summary["after"]["asr"] <= 0.05
    assert summary["before"]["acc"] - summary["after"]["acc"] <= 0.02
    for name in ("masks.txt", "summary.json", "sweep.csv", "anp_demo.png", "purified.pt"):
        assert (out / name).stat().st_size > 0, name
    masks = load_masks(out / "masks.txt")
    assert sum(m.numel() for m in masks.values()) == summary["neurons"]
    state = torch.load(out / "purified.pt", weights_only=True)
    model = resnet18(10, 1, 16)
    model.load_state_dict(state)
    zeroed = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert zeroed >= summary["pruned_neurons"]
    assert (out / "anp_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "before ANP" in text and "after ANP (t=0.2)" in text
    assert summary["config"]["precision"] == precision and summary["config"]["iters"] == 2000


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
