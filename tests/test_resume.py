"""Resumable runs: interrupted at an arbitrary point (inside a step, or killed between saves), resumed, the
masks equal an uninterrupted run's bit for bit (CPU, fp32, same seed); a write killed half-way leaves the
previous state usable."""
import os

import pytest
import torch
from torch.utils.data import TensorDataset

from anp_fast import ANPConfig, optimize_masks
from anp_fast.engine import ANPEngine, Interrupted
from anp_fast.errors import ConfigError

CFG = dict(iters=12, batch_size=8, seed=3, channels_last=False)


def _data(tiny_batches, wrap):
    x = torch.cat([b[0] for b in tiny_batches])
    y = torch.cat([b[1] for b in tiny_batches])
    return (x, y) if wrap == "tensors" else TensorDataset(x, y)


def _interrupt_at(monkeypatch, call):
    """Make the engine's noise draw raise KeyboardInterrupt on its ``call``-th use (i.e. inside a step)."""
    real = ANPEngine.draw_noise
    calls = []

    def draw(self, noise_w, noise_b, eps):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        real(self, noise_w, noise_b, eps)
    monkeypatch.setattr(ANPEngine, "draw_noise", draw)


@pytest.mark.parametrize("wrap", ["tensors", "dataset"])
@pytest.mark.parametrize("stop_at", [1, 7, 12])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_resnet, tiny_batches, tmp_path, monkeypatch, wrap,
                                                      stop_at):
    data = _data(tiny_batches, wrap)
    full = optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False)
    state = str(tmp_path / "state.pt")
    _interrupt_at(monkeypatch, stop_at)
    with pytest.raises(Interrupted) as info:
        optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False, state_path=state)
    monkeypatch.undo()
    assert len(info.value.result.loss_history) == stop_at - 1
    if stop_at > 1:
        assert os.path.exists(state)  # saved on Ctrl-C, at the last finished iteration
    resumed = optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False, state_path=state, resume=True)
    assert resumed.timings["resumed_at"] == stop_at - 1
    for name, m in full.masks.items():
        assert torch.equal(resumed.masks[name], m), name
    assert resumed.loss_history == full.loss_history


def test_periodic_saves_and_a_write_killed_half_way(tiny_resnet, tiny_batches, tmp_path, monkeypatch):
    data = _data(tiny_batches, "tensors")
    state = str(tmp_path / "state.pt")
    full = optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False)
    # a "kill" of the process during the second periodic write (iteration 8): the first save must survive
    import anp_fast.fileio as fileio
    real_save = torch.save
    saves = []

    def dying_save(obj, f):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"half a state")
            raise SystemExit("killed")  # the process dies mid-write: no handler of ours runs
        real_save(obj, f)
    monkeypatch.setattr(fileio, "_torch_save", dying_save)
    with pytest.raises(SystemExit):
        optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False, state_path=state, save_every=4)
    monkeypatch.undo()
    assert [p for p in os.listdir(tmp_path) if p != "state.pt"] == []  # no temporary file left behind
    saved = torch.load(state, weights_only=True)
    assert saved["iteration"] == 4
    resumed = optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False, state_path=state, resume=True)
    assert resumed.timings["resumed_at"] == 4
    for name, m in full.masks.items():
        assert torch.equal(resumed.masks[name], m), name


def test_resume_refuses_other_settings_and_foreign_files(tiny_resnet, tiny_batches, tmp_path):
    data = _data(tiny_batches, "tensors")
    state = str(tmp_path / "state.pt")
    optimize_masks(tiny_resnet, data, ANPConfig(**{**CFG, "iters": 4}), progress=False, state_path=state,
                   save_every=2)
    with pytest.raises(ConfigError, match=r"other settings \(eps: saved 0.4, now 0.2\)"):
        optimize_masks(tiny_resnet, data, ANPConfig(**{**CFG, "eps": 0.2}), progress=False, state_path=state,
                       resume=True)
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ConfigError, match="not an anp_fast run state"):
        optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False, state_path=str(bad), resume=True)
    with pytest.raises(ConfigError, match="save_every needs a state_path"):
        optimize_masks(tiny_resnet, data, ANPConfig(**CFG), progress=False, save_every=3)
