"""One ANP loop over N processes with torch.distributed, with the result of a single process.

Data-parallel semantics (the default): every rank draws the SAME global batch of ``batch_size`` from the same
seeded sampler and takes its own contiguous slice (:meth:`Collective.part`: uneven splits allowed); the noise
draw is the same on every rank (same seed); each rank's losses are its images' summed cross-entropy over the
GLOBAL batch size, so the gradients summed across ranks are the single process's; the noise-ascent gradient is
summed BEFORE its sign is taken and the mask gradient before the update, so every rank takes the same step.
The batch statistics of every perturbed BatchNorm are the global batch's (the op layer gathers the per-channel
moments in the forward pass and sums the two per-channel gradients in the backward pass, as SyncBatchNorm
does). LayerNorm, GroupNorm and gates need no collective.

``ANPConfig.local_statistics=True`` instead normalises each rank's slice with its own statistics (what DDP
without SyncBatchNorm does): one collective fewer per BatchNorm and pass, but the masks are no longer the
single process's: the statistics of a slice of B/N images are noisier than those of B images, the noise
ascent and the mask step see a different function, and the result changes with N.

A single-process run never touches any of this: :func:`current` is None unless a process group of more than
one process is initialised.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from .errors import ConfigError


@dataclass(frozen=True)
class Collective:
    """The process group an ANP loop runs over: this process's ``rank`` of ``world``."""

    group: Any
    rank: int
    world: int
    local_statistics: bool = False

    def part(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of ``n`` (sizes differ by at most one)."""
        if n < self.world:
            raise ConfigError(f"a batch of {n} cannot be split over {self.world} processes (one image each at "
                              "least): give a larger batch size or fewer processes")
        return self.share(n)

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (sizes differ by at most one; empty when n < world)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor across the ranks, in place, with ONE collective."""
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` across the ranks (a new tensor)."""
        out = t.clone()
        self.all_reduce_([out])
        return out

    def agree(self, parts: Dict[str, str], what: str) -> None:
        """Refuse to go on unless every rank gives the same ``parts`` (name -> a description of this process's
        value): each is hashed, the digests are gathered (fixed-size tensors, nothing unpickled), and a
        :class:`ConfigError` names the parts that differ and the ranks that differ from rank 0. Every rank
        raises the same error, so the run stops everywhere at once."""
        import torch.distributed as dist

        names = sorted(parts)
        mine = torch.tensor([list(hashlib.blake2b(parts[n].encode(), digest_size=16).digest()) for n in names],
                            dtype=torch.uint8).reshape(len(names), 16)
        device = _collective_device(self.group)
        gathered = [torch.empty_like(mine, device=device) for _ in range(self.world)]
        dist.all_gather(gathered, mine.to(device), group=self.group)
        ref = gathered[0].cpu()
        differ = {}
        for r, digests in enumerate(gathered):
            for i in torch.nonzero((digests.cpu() != ref).any(dim=1)).flatten().tolist():
                differ.setdefault(names[i], []).append(r)
        if differ:
            first = sorted(differ)[:4]
            listed = "; ".join(f"{n} (rank{'s' if len(differ[n]) > 1 else ''} {', '.join(map(str, differ[n]))} "
                               f"differ{'' if len(differ[n]) > 1 else 's'} from rank 0)" for n in first)
            more = f" and {len(differ) - len(first)} more" if len(differ) > len(first) else ""
            raise ConfigError(f"the {self.world} processes were given different {what}: {listed}{more}; every "
                              f"process must load the same model, data and options")

    @property
    def batch_norm_group(self):
        """What the perturbed BatchNorm reduces its statistics over (None: each rank's own slice)."""
        return None if self.local_statistics else self.group


def _collective_device(group) -> torch.device:
    """Where this group's collectives take their tensors: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tensor_digest(tensors: Sequence[Tensor], max_bytes: int = 1 << 28) -> str:
    """A digest of the shapes, dtypes and bytes of ``tensors`` (exact; beyond ``max_bytes`` in all, 64 evenly
    spaced rows of each large tensor stand for it)."""
    h = hashlib.blake2b(digest_size=16)
    total = sum(t.numel() * t.element_size() for t in tensors)
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        if total > max_bytes and t.dim() > 0 and t.shape[0] > 64:
            t = t[torch.linspace(0, t.shape[0] - 1, 64).long().to(t.device)]
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def current(local_statistics: bool = False) -> Optional[Collective]:
    """The initialised default process group as a :class:`Collective`, or None (not initialised, or one
    process)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    dist = torch.distributed
    world = dist.get_world_size()
    if world == 1:
        return None
    return Collective(dist.group.WORLD, dist.get_rank(), world, local_statistics)


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun, torch.distributed.run) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


DEFAULT_TIMEOUT_S = 600.0


def init_from_env(timeout_s: Optional[float] = None) -> bool:
    """Initialise the default process group from a launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    when started as one of several processes and none is initialised yet; gloo for CPU tensors, NCCL for CUDA
    ones. ``timeout_s`` bounds every collective (default :data:`DEFAULT_TIMEOUT_S`): a process that hangs (not
    one that dies: that is seen at once) stops the others after that long. Returns whether this call
    initialised it."""
    import datetime

    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"the process group timeout must be > 0 seconds, got {timeout_s}")
    if not launched() or torch.distributed.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S)
    torch.distributed.init_process_group(backend=backend, timeout=timeout)
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return True


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def standalone_launch(nproc: int, argv: Sequence[str], monitor_interval: float = 0.5) -> None:
    """Run ``python ARGV`` in ``nproc`` processes on this machine through torch's elastic launcher (what
    ``torchrun --standalone`` does: free port, no restarts), its own logging silenced. Raises torch's
    ChildFailedError when a process fails."""
    import logging
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=monitor_interval)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # callers say it in one line
    elastic_launch(config, sys.executable)(*argv)


def exit_now(code: int) -> None:
    """End this process with ``code`` now, skipping the interpreter's shutdown: a gloo worker thread can still
    be releasing the tensors of the last collective when the interpreter finalises, and it then aborts the
    process (SIGABRT, "terminate called without an active exception": seen in about 1 of 15 two-process runs
    on 2 cores). For launched processes whose outputs are all written; the standard streams are flushed."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a broken collective (a peer process died, was killed or timed out)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out"))


def rank() -> int:
    """This process's rank (0 without a process group)."""
    c = current()
    return 0 if c is None else c.rank
