"""One ANP iteration replayed as one CUDA graph (``ANPConfig.cuda_graphs``).

An iteration launches hundreds of small kernels (two per norm layer per pass, the noise and mask updates,
the loss); on a GPU the launch gaps between them cost as much as the work at CIFAR sizes. The iteration body
after the noise draw (the signed-gradient noise ascent, the clean and perturbed mask passes, their backward,
the mask SGD and clamp) is captured once and then replayed, reading the batch from static buffers.

The noise draw itself stays outside the graph: it is two launches, it keeps drawing from the engine's own
generator exactly as without graphs (so a run with graphs draws the same noise, and resumes restore it with
``generator.set_state`` as usual), and a user's ``noise_init`` (replayed draws) may do anything.

Each batch signature (shape, strides, dtype) gets its own graph, captured after ``warmup`` uncaptured runs of
that signature (real iterations: the autograd engine, cuDNN plans, cuBLAS workspaces, torch.compile and
Triton autotuning settle there, as capture requires). Warm-up and capture use ONE side stream, as
``torch.cuda.make_graphed_callables`` does: state kept per (handle, stream) is then made before the capture.
At most ``max_graphs`` signatures are captured (each graph keeps its own memory pool); others run uncaptured.

A graph keeps what it saw at capture: the config's numbers (lr, eps, alpha, ...), the model's modes and the
addresses of the mask, noise, momentum and weights. They are updated in place (``load_state_dict`` copies into
them); do not replace them, move the model or change the config of an engine that has captured.

The graph is made by ``graph_factory`` (default: :class:`CudaGraph`); the CPU tests use a stand-in that
records the body's ops at capture and re-executes them on replay without the body's Python, to check that
capture-and-replay computes what the plain step does.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor


class CudaGraph:
    """``torch.cuda.CUDAGraph`` captured on the given stream (the one the warm-up ran on)."""

    def __init__(self, device: torch.device, stream=None):
        self.device, self.stream = device, stream
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, body: Callable[[], None]) -> None:
        # thread_local: a DataLoader's pin-memory thread may call into CUDA while we capture.
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, stream=self.stream,
                                                              capture_error_mode="thread_local"):
            body()

    def replay(self) -> None:
        self.graph.replay()


@contextlib.contextmanager
def _on_stream(stream):
    """Run the block on ``stream``, ordered after the current stream's work and before its next (also when
    the block raises: a Ctrl-C handler's copies must not race the block's kernels)."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)


class _Captured:
    """One signature's graph and static buffers."""

    def __init__(self, graph, x: Tensor, y: Tensor, loss: Tensor):
        self.graph, self.x, self.y, self.loss = graph, x, y, loss


class StepGraph:
    """Capture-once, replay-every-iteration driver of one engine's iterations.

    ``engine`` provides ``device``, ``draw()`` (the noise draw, eager), ``body(x, y) -> loss`` (the rest of
    the iteration, no host synchronisation, no iteration counter), ``iteration`` and ``run_uncaptured(x, y)``.
    ``graph_factory(device, stream)`` makes a graph with ``capture(body)`` and ``replay()``.
    """

    def __init__(self, engine, warmup: int = 2, max_graphs: int = 2,
                 graph_factory: Optional[Callable[..., object]] = None):
        self.engine = engine
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graph_factory = graph_factory if graph_factory is not None else CudaGraph
        self.stream = torch.cuda.Stream(engine.device) if engine.device.type == "cuda" else None
        self.graphs: Dict[Tuple, _Captured] = {}
        self.warmed: Dict[Tuple, int] = {}
        self.replays = 0

    @property
    def graph(self):
        """The graph of the first captured signature (None before any capture)."""
        return next(iter(self.graphs.values())).graph if self.graphs else None

    @staticmethod
    def _signature_of(x: Tensor, y: Tensor) -> Tuple:
        return (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.stride(), y.dtype, x.device)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        engine = self.engine
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()  # static buffers take the batch's strides: no overlapping or gapped ones
        y = y.contiguous()
        signature = self._signature_of(x, y)
        captured = self.graphs.get(signature)
        if captured is None:
            warmed = self.warmed.get(signature, 0)
            if warmed < self.warmup or len(self.graphs) >= self.max_graphs:
                self.warmed[signature] = warmed + 1
                with _on_stream(self.stream):
                    return engine.run_uncaptured(x, y)
            captured = self.graphs[signature] = self._capture(x, y)
        captured.x.copy_(x)
        captured.y.copy_(y)
        engine.draw()
        captured.graph.replay()
        self.replays += 1
        engine.iteration += 1
        return captured.loss.clone()

    def _capture(self, x: Tensor, y: Tensor) -> _Captured:
        engine = self.engine
        # the batch's own strides (a layout change could change the kernels picked, and their rounding)
        static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
        static_y = torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device).copy_(y)
        loss = torch.zeros((), device=engine.device, dtype=torch.float32)
        graph = self.graph_factory(engine.device, self.stream)

        def body():
            loss.copy_(engine.body(static_x, static_y))

        graph.capture(body)
        return _Captured(graph, static_x, static_y, loss)
