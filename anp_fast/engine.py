"""The ANP loop: ANPEngine (one iteration at a time) and optimize_masks (the whole run)."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ANPConfig, check_device
from .batches import BatchSource, batch_source, check_labels
from .errors import ConfigError, DivergenceError, Interrupted, ModelError, ProcessGroupError  # noqa: F401
from .graphs import StepGraph
from .progress import progress_bar
from .runstate import load_run_state, save_run_state
from .surgery import PerturbedModel, perturb_model

NoiseInit = Callable[[Tensor, Tensor, float], None]


def _device_of(config: ANPConfig, model: nn.Module) -> torch.device:
    if config.device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    return check_device(config.device, name="ANPConfig.device")  # the one device check (anp_fast.config)


def logits_of(output) -> Tensor:
    """The logits in a model's output: a tensor, the first item of a tuple, or an object's ``.logits``."""
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    elif isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    else:
        raise ModelError(f"cannot find logits in the model's output of type {type(output).__name__}")
    if logits.dim() != 2:
        raise ModelError(f"the model's logits must be (batch, classes); got shape {tuple(logits.shape)}")
    return logits


class ANPEngine:
    """Adversarial neuron perturbation over a perturbable copy of ``model`` (never modified).

    ``step(x, y)`` runs one iteration of the published loop (ANP.md): draw d, e; ``steps`` signed-gradient
    ascent steps on them; the mask step on alpha * CE(clean) + (1 - alpha) * CE(perturbed); SGD with
    momentum on the flat mask, clamped to [0, 1]. The phases are public (``noise_step`` = ``draw`` +
    ``noise_ascent``, ``mask_loss``, ``mask_grad``, ``update``) so profilers and other front ends can drive
    them one by one; ``body`` is everything after the draw, the part a CUDA graph replays (``cuda_graphs``).

    ``noise_init(noise_w, noise_b, eps)`` fills the flat noise tensors in place at the start of each
    iteration; the default draws U(-eps, eps) from a generator seeded by ``config.seed``. Pass your own to
    replay recorded draws.

    Under an initialised process group of several processes (``config.distributed``, :mod:`anp_fast.distributed`)
    every process calls ``step`` with the same GLOBAL batch (or its own slice and the global size ``total``):
    the processes together take the step one process would take on the whole batch. ``collective``: the
    group to run over (default: the initialised default group, when ``config.distributed`` allows).
    """

    def __init__(self, model: nn.Module, config: Optional[ANPConfig] = None,
                 noise_init: Optional[NoiseInit] = None, collective=None):
        self.config = cfg = config if config is not None else ANPConfig()
        if not isinstance(cfg, ANPConfig):
            raise ConfigError(f"config must be an ANPConfig, got {type(cfg).__name__}")
        if isinstance(model, PerturbedModel):
            self.model = model
        else:
            self.model = perturb_model(model, cfg.layers, device=_device_of(cfg, model))
        self.device = self.model.state.device
        self.model.state.fused = cfg.fused_kernels is not False
        if collective is None and cfg.distributed is not False:
            from .distributed import current

            collective = current(cfg.local_statistics)
        self.collective = collective
        self.total: Optional[int] = None  # the global batch size of the current step (several processes)
        if collective is not None:
            if cfg.cuda_graphs:
                raise ConfigError("ANPConfig.cuda_graphs is not supported with several processes yet")
            if cfg.compile:
                raise ConfigError("ANPConfig.compile is not supported with several processes yet (the batch "
                                  "statistics' collectives break the graph)")
            self.model.state.sync = collective.batch_norm_group
            collective.agree(self._fingerprint(), "models or options")
        net = self.model.net
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else any(
            isinstance(m, nn.Conv2d) for m in net.modules())
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        on_gpu = self.device.type == "cuda"
        self.merge_passes = cfg.merge_passes if cfg.merge_passes is not None else on_gpu
        self.compiled = cfg.compile if cfg.compile is not None else (on_gpu and collective is None)
        self.forward = torch.compile(net, dynamic=False, fullgraph=cfg.fullgraph) if self.compiled else net
        self.momentum_buffer = torch.zeros_like(self.state.mask)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed)
        self.noise_init = noise_init if noise_init is not None else self.draw_noise
        self.iteration = 0
        self.num_classes: Optional[int] = None
        self._set_mode()
        self.graphs: Optional[StepGraph] = None
        if cfg.cuda_graphs:
            if not on_gpu:
                raise ConfigError("ANPConfig.cuda_graphs=True needs a CUDA device; this engine runs on "
                                  f"{self.device}")
            self.graphs = StepGraph(self)

    def _fingerprint(self) -> dict:
        """What every process of one run must share: the options (but the device), the perturbable layer layout
        and the model's weights and buffers."""
        import dataclasses

        from .distributed import tensor_digest

        cfg = self.config
        parts = {f"option {f.name}": repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "device"}
        parts["perturbable layer layout"] = repr([(s.name, s.kind, s.size) for s in self.state.slots])
        parts["model weights"] = tensor_digest(list(self.model.net.state_dict().values()))
        return parts

    def _set_mode(self) -> None:
        net = self.model.net
        if self.config.train_mode == "all":
            net.train()
        else:
            net.eval()
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):  # the norms that use batch statistics
                    module.train()

    @property
    def state(self):
        return self.model.state

    def _autocast(self, low_precision: bool):
        # no cast cache under CUDA graphs, as PyTorch's notes on graphs ask (frozen weights are not cached anyway)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low_precision,
                              cache_enabled=not self.config.cuda_graphs)

    def draw_noise(self, noise_w: Tensor, noise_b: Tensor, eps: float) -> None:
        """Default noise draw: d, e ~ U(-eps, eps) from the engine's seeded generator."""
        noise_w.uniform_(-eps, eps, generator=self.generator)
        noise_b.uniform_(-eps, eps, generator=self.generator)

    def prepare(self, x: Tensor, y: Tensor):
        """The batch on the engine's device and in its memory format."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _logits(self, x: Tensor, y: Tensor) -> Tensor:
        logits = logits_of(self.forward(x))
        if self.num_classes is None:  # once: a label out of range would fail deep inside cross_entropy
            self.num_classes = logits.shape[1]
            check_labels(y, self.num_classes)
        return logits

    def _cross_entropy(self, x: Tensor, y: Tensor) -> Tensor:
        return self._loss(self._logits(x, y), y)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The mean cross-entropy; with several processes, this process's share of the global batch's."""
        if self.collective is None:
            return F.cross_entropy(logits.float(), y)
        return F.cross_entropy(logits.float(), y, reduction="sum") / self.total

    def noise_step(self, x: Tensor, y: Tensor) -> None:
        """Draw d, e and take ``steps`` signed-gradient ascent steps on them (the mask held fixed)."""
        self.draw()
        self.noise_ascent(x, y)

    def draw(self) -> None:
        """The start of an iteration: d, e from ``noise_init`` (no draw when eps = 0)."""
        if self.config.eps > 0:
            with torch.no_grad():
                self.noise_init(self.state.noise_w, self.state.noise_b, self.config.eps)

    def noise_ascent(self, x: Tensor, y: Tensor) -> None:
        """``steps`` signed-gradient ascent steps on the drawn d, e."""
        cfg, state = self.config, self.state
        lr = cfg.eps / cfg.steps
        noise_w, noise_b = state.noise_w.requires_grad_(True), state.noise_b.requires_grad_(True)
        mask = state.mask.detach()
        try:
            for _ in range(cfg.steps):
                state.set_coefficients((mask + noise_w).unsqueeze(0), (1.0 + noise_b).unsqueeze(0))
                with self._autocast(cfg.precision != "fp32"):
                    loss = -self._cross_entropy(x, y)
                # a model whose perturbed layers have no shift (bias-free convs under gates, LayerNorm(bias=False))
                # never reads noise_b: its gradient is 0 and the bias noise stays as drawn
                grad_w, grad_b = torch.autograd.grad(loss, (noise_w, noise_b), allow_unused=True,
                                                     materialize_grads=True)
                with torch.no_grad():
                    if self.collective is not None:  # the global batch's gradient, before its sign
                        self.collective.all_reduce_((grad_w, grad_b))
                    noise_w.add_(grad_w.sign(), alpha=-lr)
                    noise_b.add_(grad_b.sign(), alpha=-lr)
                    if cfg.project_noise:
                        noise_w.clamp_(-cfg.eps, cfg.eps)
                        noise_b.clamp_(-cfg.eps, cfg.eps)
        finally:
            noise_w.requires_grad_(False)
            noise_b.requires_grad_(False)
            state.use_clean()

    def mask_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """alpha * CE(clean) + (1 - alpha) * CE(perturbed), differentiable in ``state.mask``; the two passes
        run as one pass over the batch twice when ``merge_passes``."""
        cfg, state = self.config, self.state
        mask = state.mask.requires_grad_(True)
        with self._autocast(cfg.precision == "bf16"):
            if cfg.eps == 0:
                state.use_clean()
                return cfg.alpha * self._cross_entropy(x, y)
            perturbed_w, perturbed_b = mask + state.noise_w, 1.0 + state.noise_b
            if self.merge_passes:
                state.set_coefficients(torch.stack((mask, perturbed_w)),
                                       torch.stack((torch.ones_like(perturbed_b), perturbed_b)))
                logits = self._logits(torch.cat((x, x)), y).float()
                batch = x.shape[0]
                loss_nat = self._loss(logits[:batch], y)
                loss_rob = self._loss(logits[batch:], y)
            else:
                state.set_coefficients(perturbed_w.unsqueeze(0), perturbed_b.unsqueeze(0))
                loss_rob = self._cross_entropy(x, y)
                state.use_clean()
                loss_nat = self._cross_entropy(x, y)
        return cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob

    def mask_grad(self, loss: Tensor) -> Tensor:
        """d loss / d mask (input gradients only: no weight of the model requires one)."""
        mask = self.state.mask
        try:
            (grad,) = torch.autograd.grad(loss, (mask,))
        finally:
            mask.requires_grad_(False)
            self.state.use_clean()
        if self.collective is not None:
            self.collective.all_reduce_((grad,))
        return grad

    def update(self, grad: Tensor) -> None:
        """SGD with momentum on the flat mask, then clamp to [0, 1]; counts the iteration."""
        self._apply_update(grad)
        self.iteration += 1

    @torch.no_grad()
    def _apply_update(self, grad: Tensor) -> None:
        cfg = self.config
        self.momentum_buffer.mul_(cfg.momentum).add_(grad)
        self.state.mask.add_(self.momentum_buffer, alpha=-cfg.lr).clamp_(0.0, 1.0)

    def body(self, x: Tensor, y: Tensor) -> Tensor:
        """An iteration after the noise draw: noise ascent, mask loss and gradient, mask update; no host
        synchronisation and no Python state that changes between iterations (what a CUDA graph captures).
        Returns the mask loss, detached; does not count the iteration."""
        if self.config.eps > 0:
            self.noise_ascent(x, y)
        try:
            loss = self.mask_loss(x, y)
        except BaseException:
            self.state.mask.requires_grad_(False)
            self.state.use_clean()
            raise
        self._apply_update(self.mask_grad(loss))
        return loss.detach()

    def run_uncaptured(self, x: Tensor, y: Tensor) -> Tensor:
        """One iteration on a prepared batch, op by op."""
        self.draw()
        loss = self.body(x, y)
        self.iteration += 1
        return loss

    def step(self, x: Tensor, y: Tensor, total: Optional[int] = None) -> Tensor:
        """One ANP iteration on the batch (x, y); returns the mask loss (a detached device tensor).

        With several processes: (x, y) is the global batch, the same on every process (each takes its slice),
        or, with ``total`` (the global batch size), this process's slice already; the loss returned is then
        this process's share (the shares sum to the loss)."""
        x, y = self.shard(x, y, total)
        x, y = self.prepare(x, y)
        if self.graphs is not None:
            return self.graphs.step(x, y)
        return self.run_uncaptured(x, y)

    def shard(self, x: Tensor, y: Tensor, total: Optional[int] = None):
        """This process's slice of a global batch (``total`` given: (x, y) is the slice already); sets the
        global batch size the losses are shares of. One process: (x, y) unchanged."""
        if self.collective is None:
            return x, y
        if total is None:
            total = x.shape[0]
            part = self.collective.part(total)
            x, y = x[part], y[part]
        self.total = total
        return x, y

    def masks(self) -> Dict[str, Tensor]:
        """``{qualified name of the layer in the ORIGINAL model: 1-D mask}`` (copies)."""
        return self.state.masks()

    def state_dict(self) -> Dict:
        """Everything the loop carries from one iteration to the next (plain tensors and numbers only)."""
        return {"iteration": self.iteration, "mask": self.state.mask.detach().cpu().clone(),
                "momentum": self.momentum_buffer.detach().cpu().clone(),
                "noise_rng": self.generator.get_state(), "layers": [s.name for s in self.state.slots],
                "num_classes": self.num_classes}

    def load_state_dict(self, state: Dict) -> None:
        layers = [s.name for s in self.state.slots]
        if list(state["layers"]) != layers:
            raise ConfigError("the saved state is for other layers than this model's perturbable ones "
                              f"({len(state['layers'])} saved, {len(layers)} here)")
        with torch.no_grad():
            self.state.mask.copy_(state["mask"])
            self.momentum_buffer.copy_(state["momentum"])
        self.generator.set_state(state["noise_rng"])
        self.iteration = int(state["iteration"])
        self.num_classes = state.get("num_classes")


@dataclass
class ANPResult:
    """What optimize_masks returns."""

    masks: Dict[str, Tensor]
    loss_history: List[float]
    timings: Dict[str, float]
    config: ANPConfig
    num_neurons: int
    layers: List[str] = field(default_factory=list)
    info: Dict = field(default_factory=dict)  # what a method reports beyond the masks (RNP: its unlearning)


Monitor = Callable[[int, "ANPEngine"], bool]


def _describe_data(clean_data) -> str:
    """What identifies a clean set across processes: the bytes of a tensor pair, the length of a Dataset."""
    from torch.utils.data import Dataset

    from .distributed import tensor_digest

    if isinstance(clean_data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in clean_data):
        return "tensors " + tensor_digest(list(clean_data))
    if isinstance(clean_data, Dataset):
        try:
            return f"{type(clean_data).__name__} of {len(clean_data)}"
        except TypeError:
            pass
    return type(clean_data).__name__


def optimize_masks(model: nn.Module, clean_data, config: Optional[ANPConfig] = None, progress: bool = True,
                   noise_init: Optional[NoiseInit] = None, check_every: int = 50, save_every: int = 0,
                   state_path: Optional[str] = None, resume: bool = False, monitor: Optional[Monitor] = None,
                   monitor_every: int = 100, engine: Optional["ANPEngine"] = None) -> ANPResult:
    """Run ``config.iters`` iterations of ANP on batches drawn with replacement from ``clean_data``
    (a Dataset, a DataLoader, or an (x, y) tensor pair) and return the masks, the loss history and timings.

    The loss stays on the device and is checked every ``check_every`` iterations: a non-finite loss raises
    DivergenceError naming the first bad iteration. Ctrl-C raises :class:`Interrupted` carrying the result
    so far.

    ``state_path``: where the run's state (masks, momentum, noise and data RNG states, iteration, loss history,
    config) is written atomically every ``save_every`` iterations and on Ctrl-C; with ``resume=True`` the run
    continues from the state there (if present), and ends with the masks an uninterrupted run would give
    (bit-identical on the CPU in fp32 with the same seed; clean data given as tensors or a Dataset).

    ``monitor(iteration, engine)``: called after every ``monitor_every`` iterations (the loss checked first);
    returning True ends the run there (an early stop: ``timings["stopped_at"]``). It may read the engine
    (``engine.masks()``) but must not change it. ``engine``: an engine already built for ``model`` (a front end
    that configures one itself); by default one is built from ``config``.
    """
    config = config if config is not None else ANPConfig()
    if save_every < 0 or (save_every and not state_path):
        raise ConfigError("save_every needs a state_path (and must be >= 0)")
    if monitor is not None and (isinstance(monitor_every, bool) or not isinstance(monitor_every, int)
                                or monitor_every < 1):
        raise ConfigError(f"monitor_every={monitor_every!r}: must be an integer >= 1")
    engine = engine if engine is not None else ANPEngine(model, config, noise_init=noise_init)
    source: BatchSource = batch_source(clean_data, config.batch_size, config.iters, config.seed)
    collective = engine.collective
    total = None  # several processes: the global batch size when the source yields this process's slice
    if collective is not None and source.batch_size is not None and source.shard(collective.part(source.batch_size)):
        total = source.batch_size
    lead = collective is None or collective.rank == 0  # the process that writes and shows progress
    if collective is not None:
        collective.agree({"clean data": _describe_data(clean_data)}, "clean data")
    history = torch.zeros(config.iters, device=engine.device)
    start_it = 0
    if resume and state_path is not None and os.path.exists(state_path):
        saved = load_run_state(state_path, config)
        engine.load_state_dict(saved["engine"])
        start_it = int(saved["iteration"])
        source.restore(saved["source"], start_it)
        history[:start_it] = saved["history"].to(history.device)
    checked = start_it

    def check(upto: int):
        nonlocal checked
        if collective is not None and upto > checked:  # each process holds its share of every loss
            history[checked:upto] = collective.sum(history[checked:upto])
        window = history[checked:upto]
        bad = ~torch.isfinite(window)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0]) + checked
            raise DivergenceError(first + 1, float(history[first]))
        checked = upto

    def save(done: int, source_state) -> None:
        if not lead:
            return
        save_run_state(state_path, done, engine.state_dict(), source_state, history[:done], config)

    stopped_at = None

    def result(done: int, seconds: float) -> ANPResult:
        losses = history[:done].cpu().tolist()
        return ANPResult(engine.masks(), losses,
                         {"total_s": seconds, "per_iter_s": seconds / max(done - start_it, 1), "iters": done,
                          "resumed_at": start_it, "stopped_at": stopped_at},
                         config, engine.state.size, [s.name for s in engine.state.slots])

    def restore(snap) -> None:
        if snap is not None:  # stopped inside a step: back to the state before it
            with torch.no_grad():
                engine.state.mask.copy_(snap[0])
                engine.momentum_buffer.copy_(snap[1])
            engine.generator.set_state(snap[2])
            engine.iteration = snap[3]

    bar = progress_bar(total=config.iters, initial=start_it, desc="ANP masks", unit="it",
                       disable=not (progress and lead))
    start = time.perf_counter()
    done = start_it
    source_state = source.state()  # the data RNG state before the batch of iteration `done`
    snapshot = None  # the state before the current step, to save a consistent one if Ctrl-C lands inside it
    try:
        for it, (x, y) in enumerate(source, start=start_it):
            if engine.num_classes is not None and source.on_host and source.labels is None:
                check_labels(y, engine.num_classes)
            if state_path is not None:
                snapshot = (engine.state.mask.clone(), engine.momentum_buffer.clone(), engine.generator.get_state(),
                            engine.iteration)
            history[it] = engine.step(x, y, total)
            snapshot = None
            done = it + 1
            source_state = source.state()
            if done == 1 and source.labels is not None:
                check_labels(source.labels, engine.num_classes)
            if done % check_every == 0 or done == config.iters:
                check(done)
                bar.set_postfix(loss=f"{float(history[done - 1]):.4f}", refresh=False)
            if save_every and done % save_every == 0 and done < config.iters:
                check(done)  # never save a diverged state
                save(done, source_state)
            bar.update(1)
            if monitor is not None and done % monitor_every == 0:
                check(done)  # a monitor never sees a diverged state
                if monitor(done, engine):
                    stopped_at = done
                    break
    except KeyboardInterrupt:
        bar.close()
        restore(snapshot)
        if state_path is not None and done > start_it:
            save(done, source_state)
        raise Interrupted(result(done, time.perf_counter() - start)) from None
    except RuntimeError as exc:
        from .distributed import is_collective_failure

        if collective is None or not is_collective_failure(exc):
            raise
        bar.close()
        restore(snapshot)  # every process holds the same state: the lead saves the one before the broken step
        if state_path is not None and done > start_it:
            save(done, source_state)
        where = f"; the run state after iteration {done} is in {state_path}" if state_path and lead else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # the library's "[file.cc:129]" prefix
        raise ProcessGroupError(f"process {collective.rank} of {collective.world}: another process of the run "
                                f"stopped at iteration {done + 1} ({first[:160]}){where}") from None
    finally:
        bar.close()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return result(done, time.perf_counter() - start)
