"""Errors raised for user mistakes. Each carries one clear sentence; the CLI prints it and exits non-zero."""


class ANPError(Exception):
    """Base class of every error anp_fast raises on purpose."""


class ConfigError(ANPError, ValueError):
    """A configuration field is unknown or holds an invalid value."""


class ModelError(ANPError, ValueError):
    """The model cannot be used (nothing to perturb, unsupported output, ...)."""


class DataError(ANPError, ValueError):
    """The clean data is empty, malformed or has labels out of range."""


class MaskFileError(ANPError, ValueError):
    """A mask file is malformed or does not fit the model."""


class DivergenceError(ANPError, RuntimeError):
    """The loss stopped being finite during mask optimisation."""

    def __init__(self, iteration: int, value: float):
        self.iteration = iteration
        self.value = value
        super().__init__(
            f"the ANP loss became {value} at iteration {iteration}; the masks are no longer meaningful "
            "(try a smaller lr or eps, or check the model and data for NaN/inf)"
        )


class CheckpointError(ANPError, ValueError):
    """A model checkpoint is missing, unreadable, refused as unsafe, or does not fit the model."""


class Interrupted(KeyboardInterrupt):
    """A long run (optimize_masks, a method's loop) was interrupted; ``.result`` holds what it reached so far
    (an ANPResult: masks and loss history). Defined here, torch-free, so the command line can catch it without
    importing the engine."""

    def __init__(self, result):
        super().__init__(f"interrupted after {len(result.loss_history)} iterations")
        self.result = result


class ProcessGroupError(ANPError):
    """Another process of a multi-process run failed or was killed (its collective broke)."""
