"""anp_fast: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), fast and for any model.

The public names load on first use (PEP 562), so ``import anp_fast`` (and the command line's ``--help``) does not
import torch."""
from importlib import import_module

__version__ = "0.1.0"

_WHERE = {
    "ANPConfig": "config", "ANPEngine": "engine", "ANPResult": "engine", "Interrupted": "errors",
    "optimize_masks": "engine", "ANPError": "errors", "ConfigError": "errors", "DataError": "errors",
    "DivergenceError": "errors", "MaskFileError": "errors", "ModelError": "errors", "load_masks": "maskfile",
    "save_masks": "maskfile", "prune": "pruning", "pruned_count": "pruning", "select_pruned": "pruning",
    "sweep": "pruning", "MaskState": "state", "Slot": "state", "PerturbedModel": "surgery",
    "perturb_model": "surgery", "keep_freed_memory": "cpu_memory",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'anp_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
