"""ANPConfig: every knob of the adversarial neuron pruning loop, validated on construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import ConfigError

LAYER_POLICIES = ("auto", "norms", "gates")
TRAIN_MODES = ("all", "norms")
PRECISIONS = ("fp32", "bf16", "mixed")


def field_help(cls) -> Dict[str, str]:
    """``{field: text}`` from a config dataclass's docstring, where each field is described by a line
    ``name: text`` or ``name, other: text`` (continued on more-indented lines): the CLI's help comes from here."""
    import inspect
    import re

    found: Dict[str, str] = {}
    current: list = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        m = re.match(r"^([a-z_]+(?:, [a-z_]+)*): (.*)$", line)
        if m:
            current = m.group(1).split(", ")
            for name in current:
                found[name] = m.group(2).strip()
        elif current and line.startswith("    ") and line.strip():
            for name in current:
                found[name] += " " + line.strip()
        else:
            current = []
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in found.items() if k in fields}


# the CLI's choices and groups of ANPConfig fields (the flags themselves are generated from the dataclass)
FIELD_CHOICES = {"layers": LAYER_POLICIES, "train_mode": TRAIN_MODES, "precision": PRECISIONS}
FAST_PATH_FIELDS = ("channels_last", "merge_passes", "compile", "fullgraph", "fused_kernels", "cuda_graphs")


@dataclass
class ANPConfig:
    """Hyper-parameters of ANP (defaults are the published ones, see ../shared/ANP.md).

    eps: bound of the neuron perturbation d, e (0 disables the adversary).
    steps: adversarial sign-gradient steps per iteration; the noise lr is eps / steps.
    alpha: weight of the clean loss; (1 - alpha) weighs the perturbed loss.
    lr: learning rate of the SGD on the masks.
    momentum: momentum of that SGD.
    iters: iterations of the loop.
    batch_size: clean images per iteration, drawn with replacement from the clean set.
    project_noise: clamp d, e back to [-eps, eps] after each noise step (the paper); the published code
        does not (default False).
    seed: seeds the noise draws and the batch sampling.
    layers: "auto" perturbs affine norm layers if the model has any, else gates conv/linear outputs;
        "norms" or "gates" force one kind.
    train_mode: "all" puts the whole model in train mode (published); "norms" only the norm layers
        (dropout and stochastic depth off, batch statistics still used).
    precision: "fp32" (exact); "bf16" (autocast for every pass); "mixed" (the noise step in bf16, since
        only the sign of its gradient is used; the mask step in fp32).
    device: where the loop runs (cpu, cuda, cuda:1, ...); None keeps the model's device.

    Fast paths (results equal the published loop up to float rounding):
    channels_last: run conv models in channels_last memory format (None: when the model has a Conv2d).
    merge_passes: the clean and perturbed passes of the mask step run as ONE pass over the batch twice,
        each half normalised with its own statistics and coefficients: bit-identical results (None: on
        CUDA only; on CPU the doubled batch is measured slower).
    compile: torch.compile the model passes (None: on CUDA only; on CPU compiling takes tens of seconds
        and pays off over long runs).
    fullgraph: with compile, demand that the model compiles with no graph break.
    fused_kernels: run the perturbed norms as the fused compiled kernels (C++ on the CPU, CUDA/Triton on GPUs),
        with residual add and ReLU folded into the batch norm of known residual blocks (None/True: wherever a
        kernel is available; False: the eager ops, which reproduce the published loop bit for bit).
    cuda_graphs: capture one iteration (after the noise draw) as a CUDA graph and replay it (CUDA only; the
        first two iterations run uncaptured to warm up). Off by default until measured on a GPU.

    Several processes (torch.distributed, :mod:`anp_fast.distributed`):
    distributed: run ONE loop data-parallel over the initialised default process group, with the result of a
        single process (None: whenever one of more than one process is initialised; False: each process runs
        its own loop).
    local_statistics: with distributed, normalise each process's slice of the batch with its own batch
        statistics (as DDP without SyncBatchNorm) instead of the global batch's: faster, but the masks then
        differ from a single process's and change with the number of processes.
    """

    eps: float = 0.4
    steps: int = 1
    alpha: float = 0.2
    lr: float = 0.2
    momentum: float = 0.9
    iters: int = 2000
    batch_size: int = 128
    project_noise: bool = False
    seed: int = 0
    layers: str = "auto"
    train_mode: str = "all"
    precision: str = "fp32"
    device: Optional[str] = None
    channels_last: Optional[bool] = None
    merge_passes: Optional[bool] = None
    compile: Optional[bool] = None
    fullgraph: bool = True
    fused_kernels: Optional[bool] = None
    cuda_graphs: bool = False
    distributed: Optional[bool] = None
    local_statistics: bool = False

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"ANPConfig.{field}={getattr(self, field)!r}: {why}")

        def number(field):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(field, "must be a finite number")
            return float(v)

        def integer(field, low):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(field, "must be an integer")
            if v < low:
                bad(field, f"must be >= {low}")

        if number("eps") < 0:
            bad("eps", "must be >= 0")
        integer("steps", 1)
        if not 0.0 <= number("alpha") <= 1.0:
            bad("alpha", "must be in [0, 1]")
        if number("lr") <= 0:
            bad("lr", "must be > 0")
        if not 0.0 <= number("momentum") < 1.0:
            bad("momentum", "must be in [0, 1)")
        integer("iters", 1)
        integer("batch_size", 1)
        integer("seed", 0)
        if self.seed >= 2 ** 63:
            bad("seed", "must be < 2**63 (torch generators take a 64-bit seed)")
        for field in ("project_noise", "fullgraph", "cuda_graphs", "local_statistics"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be True or False")
        for field in ("channels_last", "merge_passes", "compile", "fused_kernels", "distributed"):
            if getattr(self, field) not in (None, True, False):
                bad(field, "must be True, False or None (automatic)")
        for field, allowed in (("layers", LAYER_POLICIES), ("train_mode", TRAIN_MODES),
                               ("precision", PRECISIONS)):
            if getattr(self, field) not in allowed:
                bad(field, f"must be one of {', '.join(allowed)}")
        if self.device is not None and not isinstance(self.device, str):
            bad("device", "must be a device string such as 'cpu' or 'cuda:0', or None")

    @classmethod
    def field_names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "ANPConfig":
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ANPConfig":
        return ANPConfig(**{**self.to_dict(), **changes})


_dataclass_init = ANPConfig.__init__


def _checked_init(self, *args, **kwargs):
    unknown = sorted(set(kwargs) - set(ANPConfig.field_names()))
    if unknown:
        raise ConfigError(
            f"ANPConfig has no field {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(ANPConfig.field_names())}"
        )
    _dataclass_init(self, *args, **kwargs)


_checked_init.__doc__ = _dataclass_init.__doc__
ANPConfig.__init__ = _checked_init


def check_device(spec: Optional[str], cuda_graphs: bool = False, name: str = "--device"):
    """The one check of a device string (CLI, pipeline and engine): ``torch.device`` of it (None for None), or a
    ConfigError naming ``name`` when it is no device, asks for CUDA on a machine without, or ``cuda_graphs``
    without CUDA."""
    import torch

    device = None
    if spec:
        try:
            device = torch.device(spec)
        except (RuntimeError, ValueError):
            raise ConfigError(f"{name} {spec!r}: not a device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{name} {spec}: no CUDA device is available on this machine (no CUDA GPU, or a "
                              "torch built without CUDA)")
    if cuda_graphs and (device is None or device.type != "cuda"):
        raise ConfigError(f"{'--cuda-graphs' if name == '--device' else 'cuda_graphs=True'} needs {name} cuda "
                          "(CUDA graphs replay GPU work only)")
    return device


@dataclass(frozen=True)
class RunDefaults:
    """The defaults of the purify / prune / demo settings around the loop, each given once: the CLI's flags, the
    pipeline's and the selection's keyword defaults all read them from ``RUN``.

    clean_fraction: part of the training split used as the defender's clean data (published --val-frac 0.01).
    holdout_fraction: part of the clean data held out to check the pruning choice.
    budget: --prune auto: the largest clean-accuracy drop allowed, in points.
    prune: the pruning rule.
    """

    clean_fraction: float = 0.01
    holdout_fraction: float = 0.2
    budget: float = 2.0
    prune: str = "auto"


RUN = RunDefaults()


@dataclass
class RNPConfig:
    """RNP's settings; the defaults are the published code's (bboylyg/RNP main.py argparse).

    unlearn_lr, unlearn_momentum, unlearn_weight_decay, unlearn_schedule: SGD on every weight of the copy, the lr
        times 0.1 at each epoch of the schedule (published: 0.01, 0.9, 5e-4, [10, 20]).
    unlearn_epochs: the unlearning loop runs epochs 0 .. unlearn_epochs (published: 20, so at most 21 epochs).
    clean_threshold: unlearning stops after the first epoch whose running clean accuracy is <= this (0.2).
    unlearn_clip: the published code calls clip_grad_norm_(max_norm=20) BEFORE backward, on gradients just
        zeroed, so it clips nothing; None reproduces that, a number clips the gradient norm after backward.
    unlearn_stop: "epoch" (published: the threshold is checked on the running accuracy at the end of each
        epoch) or "batch" (checked after every batch, on that batch's accuracy: on a clean set of a few batches
        one epoch can take the accuracy from 80% to 2%, far past the threshold).
    recover_lr, recover_momentum, recover_epochs, alpha: the mask step on the unlearned copy: SGD on the masks
        of alpha x CE (published: 0.2, 0.9, 20, 0.2), clamped to [0, 1] after each step.
    batch_size: clean batches of both phases (published 128), epochs of shuffled batches, the last partial.
    """

    unlearn_lr: float = 0.01
    unlearn_momentum: float = 0.9
    unlearn_weight_decay: float = 5e-4
    unlearn_schedule: Tuple[int, ...] = (10, 20)
    unlearn_epochs: int = 20
    clean_threshold: float = 0.2
    unlearn_clip: Optional[float] = None
    unlearn_stop: str = "epoch"
    recover_lr: float = 0.2
    recover_momentum: float = 0.9
    recover_epochs: int = 20
    alpha: float = 0.2
    batch_size: int = 128

    def __post_init__(self):
        for name in ("unlearn_lr", "recover_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RNPConfig.{name}={getattr(self, name)!r}: must be > 0")
        for name in ("unlearn_epochs", "recover_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "unlearn_epochs"
                                                                                 else 1):
                raise ConfigError(f"RNPConfig.{name}={value!r}: must be a positive integer")
        if not 0 <= self.clean_threshold <= 1:
            raise ConfigError(f"RNPConfig.clean_threshold={self.clean_threshold!r}: must be in [0, 1]")
        if self.unlearn_clip is not None and not self.unlearn_clip > 0:
            raise ConfigError(f"RNPConfig.unlearn_clip={self.unlearn_clip!r}: must be > 0 or None")
        if self.unlearn_stop not in ("epoch", "batch"):
            raise ConfigError(f"RNPConfig.unlearn_stop={self.unlearn_stop!r}: must be 'epoch' or 'batch'")

    def to_dict(self) -> Dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
