"""anp_fast: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), fast and for any model."""
from .config import ANPConfig
from .cpu_memory import keep_freed_memory
from .engine import ANPEngine, ANPResult, Interrupted, optimize_masks
from .errors import ANPError, ConfigError, DataError, DivergenceError, MaskFileError, ModelError
from .maskfile import load_masks, save_masks
from .pruning import prune, pruned_count, select_pruned, sweep
from .state import MaskState, Slot
from .surgery import PerturbedModel, perturb_model

__version__ = "0.1.0"

__all__ = [
    "ANPConfig", "ANPEngine", "ANPResult", "Interrupted", "optimize_masks", "ANPError", "ConfigError",
    "DataError", "DivergenceError", "MaskFileError", "ModelError", "load_masks", "save_masks", "prune",
    "pruned_count", "select_pruned", "sweep", "MaskState", "Slot", "PerturbedModel", "perturb_model",
    "keep_freed_memory",
]
