"""Former home of the commands, kept so that front ends importing ``anp_fast.pipeline`` keep working: the
commands are in :mod:`anp_fast.commands`, input checks and loading in :mod:`anp_fast.inputs`, the evaluator
and the plausibility check in :mod:`anp_fast.evaluation`."""
from .commands import (ATTACK_OUTPUTS, COMMAND_FILE, PURIFY_OUTPUTS, STATE_FILE, STATE_FILES,  # noqa: F401
                       run_attack, run_prune, run_purify)
from .errors import ANPError  # noqa: F401
from .evaluation import (Evaluator, Normalized, check_plausible, labels_of, logits, memorization,  # noqa: F401
                         plausibility, predictions, tensors_of)
from .inputs import (Loaded, asr_dataset, check_out, check_rule, check_rule_fits, load_model_and_data,  # noqa: F401
                     make_out, make_trigger_spec, parse_prune_rule)

__all__ = ["run_purify", "run_prune", "run_attack", "parse_prune_rule", "check_out", "Evaluator", "Normalized",
           "ANPError"]
