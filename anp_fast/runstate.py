"""The saved state of an interrupted run (``--save-every``, Ctrl-C) and its resume format: masks, momentum,
the noise and data RNG states, the iteration, the loss history and the config, written atomically and read
back without unpickling anything but tensors and plain containers."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Dict

import torch

from .config import ANPConfig
from .errors import ConfigError
from .fileio import atomic_torch_save

RESUME_FORMAT = "anp_fast.resume/1"


def _read(path: str) -> Dict:
    """A saved run state, loaded without unpickling anything but tensors and plain containers."""
    if not os.path.isfile(path):
        raise ConfigError(f"no saved ANP state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read the saved ANP state {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ConfigError(f"{path} is not an anp_fast run state")
    return state


def _check_same_run(saved: Dict, config: ANPConfig, path: str) -> None:
    now = asdict(config)
    differ = [k for k, v in saved["config"].items() if k != "iters" and now.get(k) != v]
    if differ:
        raise ConfigError(f"cannot resume from {path}: the run was started with other settings ("
                          + ", ".join(f"{k}: saved {saved['config'][k]!r}, now {now.get(k)!r}" for k in differ)
                          + ")")
    if saved["iteration"] > config.iters:
        raise ConfigError(f"cannot resume from {path}: it is at iteration {saved['iteration']}, past iters="
                          f"{config.iters}")


def save_run_state(path: str, iteration: int, engine_state: Dict, source_state, history: torch.Tensor,
                   config: ANPConfig) -> None:
    """Write the state after ``iteration`` iterations to ``path`` (atomically)."""
    atomic_torch_save({"format": RESUME_FORMAT, "iteration": iteration, "engine": engine_state,
                       "source": source_state, "history": history.cpu(), "config": asdict(config)}, path)


def load_run_state(path: str, config: ANPConfig) -> Dict:
    """The state saved at ``path``, checked to be a run of ``config`` (all but ``iters`` equal, not past it)."""
    saved = _read(path)
    _check_same_run(saved, config, path)
    return saved
