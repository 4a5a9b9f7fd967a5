"""Mask-learning methods on one backend: ANP and RNP, and the extension point for a front end's own method.

A method turns a model and a little clean data into one mask value per neuron; pruning (the ORIGINAL model's
scales set to 0, :func:`anp_fast.prune`), the choice of how much to prune (:mod:`anp_fast.selection`), mask
files and reports are the same for every method. A method is a function

    learn(model, clean, config, *, progress, state_dir, resume, save_every, monitor, monitor_every) -> ANPResult

registered with :func:`register_method`; ``clean`` is an (x, y) tensor pair or a Dataset, ``config`` an
:class:`~anp_fast.ANPConfig` (seed, device, precision and fast paths; ANP reads every field), and the keyword
arguments are optional services (``state_dir``: a folder for resumable state: the mask loop's state goes to
``state_path(state_dir, NAME)``, and ``purify --resume`` finds it there). It builds on the same pieces as
ANP: :func:`~anp_fast.perturb_model` (perturbable layers over flat mask storage), :class:`~anp_fast.ANPEngine`
(the mask step: SGD with momentum and the [0, 1] clamp, with ``eps=0`` a plain clean-loss mask step) and
:func:`~anp_fast.optimize_masks` (the loop: batches, progress, checks, resume, monitor).

- ``anp``: Adversarial Neuron Pruning (Wu & Wang 2021), the published loop.
- ``rnp``: Reconstructive Neuron Pruning (Li et al., ICML 2023; published code bboylyg/RNP): (1) unlearn a
  COPY by gradient ascent on the clean cross-entropy (every weight, SGD lr 0.01, momentum 0.9, weight decay
  5e-4, lr x 0.1 at epochs 10 and 20) until the epoch's running clean accuracy is <= 0.2 (at most 21 epochs);
  (2) recover: the unlearned copy frozen, a mask in [0, 1] per BatchNorm channel learned by minimising
  0.2 x CE on the same clean data (SGD lr 0.2, momentum 0.9, 20 epochs, clamped after each step, no noise);
  the masks then prune the ORIGINAL model.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ANPConfig
from .batches import EpochSource
from .engine import ANPResult, optimize_masks
from .errors import ConfigError, DataError
from .fileio import atomic_torch_save
from .progress import progress_bar

Method = Callable[..., ANPResult]
METHODS: Dict[str, Method] = {}
_STATE_FILES: Dict[str, Tuple[str, ...]] = {}


def register_method(name: str, learn: Method, *, state_files: Iterable[str] = ()) -> Method:
    """Make ``learn`` available as ``--method NAME`` (and to :func:`learn_masks`). Returns ``learn``.
    ``state_files``: what ``learn`` saves in ``state_dir`` to resume from besides its mask loop's state
    (:func:`state_path`); a folder holding any registered method's state files is one ``purify --resume``
    continues (the saved command's method then reads its own)."""
    from .outputs import ATTACK_OUTPUTS, COMMAND_FILE, PURIFY_OUTPUTS

    if not isinstance(name, str) or not name or not name.isascii() or not name.replace("_", "").replace(
            "-", "").isalnum():
        raise ConfigError(f"method name {name!r}: use ASCII letters, digits, '-' and '_'")
    clash = [known for known in METHODS if known != name and known.lower() == name.lower()]
    if clash:  # one state file on a case-insensitive file system
        raise ConfigError(f"method name {name!r}: {clash[0]!r} is registered (names must differ in more than case)")
    files = (state_files,) if isinstance(state_files, str) else tuple(state_files)
    reserved = {COMMAND_FILE, *PURIFY_OUTPUTS, *ATTACK_OUTPUTS}
    bad = [f for f in files if not isinstance(f, str) or f in ("", ".", "..") or "\0" in f
           or os.path.basename(f) != f or "\\" in f or f in reserved]
    if isinstance(state_files, str) or bad:
        raise ConfigError(f"method {name!r}: state_files={state_files!r} must be a tuple of plain file names, none "
                          f"of them a command's output ({', '.join(sorted(reserved))})")
    METHODS[name] = learn
    _STATE_FILES[name] = (state_file(name), *files)
    return learn


def state_file(method: str) -> str:
    """The file name of ``method``'s mask loop state (``<method>_state.pt``; the loop's ``state_path``)."""
    return f"{method}_state.pt"


def state_path(state_dir: Optional[str], method: str) -> Optional[str]:
    """Where ``method`` keeps its mask loop's state in ``state_dir`` (None without a folder): what a method
    passes to :func:`~anp_fast.optimize_masks` as ``state_path``."""
    return os.path.join(state_dir, state_file(method)) if state_dir else None


def all_state_files() -> Tuple[str, ...]:
    """Every registered method's state files."""
    return tuple(dict.fromkeys(f for files in _STATE_FILES.values() for f in files))


def state_files(method: str) -> Tuple[str, ...]:
    """Every file a run of the registered ``method`` saves to resume from, its mask loop's state first."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return _STATE_FILES[method]


def learn_masks(method: str, model: nn.Module, clean, config: ANPConfig, **services) -> ANPResult:
    """Run the registered ``method`` (``anp``, ``rnp`` or a front end's own)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method](model, clean, config, **services)


def anp(model: nn.Module, clean, config: ANPConfig, *, progress: bool = True, state_dir: Optional[str] = None,
        resume: bool = False, save_every: int = 0, monitor=None, monitor_every: int = 100) -> ANPResult:
    """Adversarial Neuron Pruning: :func:`~anp_fast.optimize_masks` with ``config``."""
    return optimize_masks(model, clean, config, progress=progress, save_every=save_every,
                          state_path=state_path(state_dir, "anp"), resume=resume, monitor=monitor,
                          monitor_every=monitor_every)


# --------------------------------------------------------------------------------------------- RNP
from .config import RNPConfig  # noqa: E402,F401  (defined torch-free, for the command line)


def _tensors(clean) -> Tuple[Tensor, Tensor]:
    if isinstance(clean, (tuple, list)) and len(clean) == 2 and all(isinstance(t, Tensor) for t in clean):
        return clean[0], clean[1].long()
    if isinstance(clean, torch.utils.data.Dataset):
        from torch.utils.data import DataLoader

        xs, ys = zip(*DataLoader(clean, batch_size=512))
        return torch.cat(xs), torch.cat(ys).long()
    raise DataError(f"RNP takes its clean data as an (images, labels) tensor pair or a Dataset, got "
                    f"{type(clean).__name__}")


def unlearn(model: nn.Module, epochs: Callable[[int], Iterable[Tuple[Tensor, Tensor]]], n_images: int,
            rnp: RNPConfig, device: torch.device, progress: bool = True) -> Tuple[nn.Module, Dict]:
    """RNP step 1 on a deep copy of ``model``: gradient ascent on the clean cross-entropy, every weight, train
    mode, epoch by epoch (``epochs(e)`` yields epoch e's batches), stopping after the first epoch whose running
    accuracy is <= ``rnp.clean_threshold``. Returns the unlearned copy and what happened."""
    net = copy.deepcopy(model).to(device)
    net.requires_grad_(True)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=rnp.unlearn_lr, momentum=rnp.unlearn_momentum,
                          weight_decay=rnp.unlearn_weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(rnp.unlearn_schedule), gamma=0.1)
    history = []
    bar = progress_bar(rnp.unlearn_epochs + 1, desc="RNP unlearning", unit="epoch", disable=not progress)
    reached = False
    try:
        for epoch in range(rnp.unlearn_epochs + 1):
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            for x, y in epochs(epoch):
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                (-loss).backward()
                if rnp.unlearn_clip is not None:
                    nn.utils.clip_grad_norm_(net.parameters(), max_norm=rnp.unlearn_clip)
                opt.step()
                if rnp.unlearn_stop == "batch" and \
                        float((logits.argmax(1) == y).float().mean()) <= rnp.clean_threshold:
                    break
            sched.step()
            acc = float(correct) / (n_images if rnp.unlearn_stop == "epoch" else seen)
            history.append(acc)
            bar.update(1)
            bar.set_postfix(clean_acc=f"{acc:.3f}", refresh=False)
            if not torch.isfinite(loss):
                raise ConfigError(f"RNP unlearning diverged at epoch {epoch} (loss {float(loss)}); try a smaller "
                                  "unlearn_lr")
            if acc <= rnp.clean_threshold:
                reached = True
                break
    finally:
        bar.close()
    net.requires_grad_(False)
    return net, {"epochs": len(history), "clean_acc_per_epoch": history, "threshold_reached": reached}


def _collective(config: ANPConfig):
    if config.distributed is False:
        return None
    from .distributed import current

    return current(config.local_statistics)


RNP_UNLEARNED = "rnp_unlearned.pt"  # the unlearned copy, saved once step 1 is done


def rnp(model: nn.Module, clean, config: ANPConfig, *, options: Optional[RNPConfig] = None,
        progress: bool = True, state_dir: Optional[str] = None, resume: bool = False, save_every: int = 0,
        monitor=None, monitor_every: int = 100) -> ANPResult:
    """Reconstructive Neuron Pruning: unlearn a copy, learn masks on it (the ANP mask step with no noise), return
    the masks; pruning them from the ORIGINAL model is the caller's (as for ANP). ``config`` gives the seed,
    device, precision and fast paths; RNP's own settings come from ``options`` (published defaults). Under
    several processes every process unlearns the whole clean set (a short phase), rank 0's copy is broadcast
    and saved; the mask step runs data-parallel like ANP's."""
    opts = options if options is not None else RNPConfig()
    x, y = _tensors(clean)
    from .engine import _device_of

    device = _device_of(config, model)
    start = time.perf_counter()
    unlearned_path = os.path.join(state_dir, RNP_UNLEARNED) if state_dir else None
    source = EpochSource(x, y, opts.batch_size, opts.recover_epochs, config.seed)
    if resume and unlearned_path and os.path.exists(unlearned_path):
        saved = torch.load(unlearned_path, map_location="cpu", weights_only=True)
        net = copy.deepcopy(model).to(device)
        net.load_state_dict(saved["state_dict"])
        info = saved["info"]
    else:
        unlearn_source = EpochSource(x, y, opts.batch_size, opts.unlearn_epochs + 1, config.seed + 1)

        def epoch_batches(epoch):
            order = unlearn_source.order(epoch)
            for b in range(unlearn_source.per_epoch):
                idx = order[b * opts.batch_size:(b + 1) * opts.batch_size]
                yield x[idx], y[idx]

        net, info = unlearn(model, epoch_batches, len(x), opts, device, progress)
        collective = _collective(config)
        if collective is not None:  # every process unlearned the same copy; rank 0's is the one (bit for bit)
            import torch.distributed as dist

            for t in net.state_dict().values():
                dist.broadcast(t, src=0, group=collective.group)
        if unlearned_path and (collective is None or collective.rank == 0):
            atomic_torch_save({"state_dict": net.state_dict(), "info": info}, unlearned_path)
    unlearn_s = time.perf_counter() - start
    recover = config.replace(eps=0.0, alpha=opts.alpha, lr=opts.recover_lr, momentum=opts.recover_momentum,
                             batch_size=opts.batch_size, iters=len(source))
    result = optimize_masks(net, source, recover, progress=progress, save_every=save_every,
                            state_path=state_path(state_dir, "rnp"), resume=resume, monitor=monitor,
                            monitor_every=monitor_every)
    result.timings["unlearn_s"] = unlearn_s
    result.timings["total_s"] += unlearn_s
    result.info = {"method": "rnp", "unlearning": info, "options": opts.to_dict()}
    return result


register_method("anp", anp)
register_method("rnp", rnp, state_files=(RNP_UNLEARNED,))
