"""One ANP iteration replayed as one CUDA graph (``ANPConfig.cuda_graphs``).

An iteration launches hundreds of small kernels (two per norm layer per pass, the noise and mask updates,
the loss); on a GPU the launch gaps between them cost as much as the work at CIFAR sizes. The iteration body
after the noise draw (the signed-gradient noise ascent, the clean and perturbed mask passes, their backward,
the mask SGD and clamp) is captured once and then replayed, reading the batch from static buffers.

The noise draw itself stays outside the graph: it is two launches, it keeps drawing from the engine's own
generator exactly as without graphs (so a run with graphs draws the same noise, and resumes restore it with
``generator.set_state`` as usual), and a user's ``noise_init`` (replayed draws) may do anything.

The first ``warmup`` iterations run uncaptured on a side stream (they are real iterations: the autograd
engine, cuDNN/cuBLAS handles, torch.compile and Triton autotuning all settle there, as capture requires).
A batch of another shape, layout or dtype than the captured one runs uncaptured.

The graph is made by ``graph_factory`` (default: :class:`CudaGraph`); a stand-in that records the body and
calls it on replay lets the CPU tests check that capture-and-replay computes what the plain step does.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


class CudaGraph:
    """``torch.cuda.CUDAGraph`` with the capture recipe of the PyTorch docs (warm-up elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, body: Callable[[], None]) -> None:
        # thread_local: a DataLoader's pin-memory thread may call into CUDA while we capture.
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            body()

    def replay(self) -> None:
        self.graph.replay()


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Run the block on a fresh side stream, ordered after the current stream's work and before its next."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


class StepGraph:
    """Capture-once, replay-every-iteration driver of one engine's iterations.

    ``engine`` provides ``draw(x, y)`` (the noise draw, eager), ``body(x, y) -> loss`` (the rest of the
    iteration, no host synchronisation, no iteration counter), ``iteration`` and ``run_uncaptured(x, y)``.
    """

    def __init__(self, engine, warmup: int = 2,
                 graph_factory: Optional[Callable[[torch.device], object]] = None):
        self.engine = engine
        self.warmup = warmup
        self.graph_factory = graph_factory if graph_factory is not None else CudaGraph
        self.graph = None
        self.warmed = 0
        self.replays = 0
        self._x: Optional[Tensor] = None
        self._y: Optional[Tensor] = None
        self._loss: Optional[Tensor] = None
        self._signature: Optional[Tuple] = None

    @staticmethod
    def _signature_of(x: Tensor, y: Tensor) -> Tuple:
        return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.stride(), y.dtype, x.device)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        engine = self.engine
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()  # static buffers take the batch's strides: no overlapping or gapped ones
        y = y.contiguous()
        signature = self._signature_of(x, y)
        if self.graph is None and self.warmed < self.warmup:
            self.warmed += 1
            on_gpu = engine.device.type == "cuda"
            with _side_stream(engine.device) if on_gpu else contextlib.nullcontext():
                return engine.run_uncaptured(x, y)
        if self.graph is None:
            self._capture(x, y, signature)
        elif signature != self._signature:
            return engine.run_uncaptured(x, y)
        self._x.copy_(x)
        self._y.copy_(y)
        engine.draw(self._x, self._y)
        self.graph.replay()
        self.replays += 1
        engine.iteration += 1
        return self._loss.clone()

    def _capture(self, x: Tensor, y: Tensor, signature: Tuple) -> None:
        engine = self.engine
        # the batch's own strides (a layout change could change the kernels picked, and their rounding)
        self._x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        self._y = torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device)
        self._loss = torch.zeros((), device=engine.device, dtype=torch.float32)
        self._x.copy_(x)  # real values in the static batch (a capture reads none, but nothing is left undefined)
        self._y.copy_(y)
        graph = self.graph_factory(engine.device)

        def body():
            self._loss.copy_(engine.body(self._x, self._y))

        graph.capture(body)
        self.graph, self._signature = graph, signature
        if engine.device.type == "cuda":  # the warm-up's cached blocks: the graph has its own pool now
            torch.cuda.empty_cache()
