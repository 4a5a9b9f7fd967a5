"""A CPU stand-in for a CUDA graph, with a CUDA graph's replay semantics.

At capture it runs the body once under a TorchDispatchMode that records every aten op with the very tensors
it read and wrote, then puts back every tensor the body wrote (a real capture executes nothing). ``replay``
re-executes the recorded ops in order on the same tensor objects, writing the results of functional ops into
the recorded outputs: no Python of the body runs again, so a body that depends on Python state changing
between iterations, or that allocates a tensor it later reads without writing, gives other results on replay
than a fresh run. Ops that read a value back to the host (``.item()``, a data-dependent shape) are refused at
capture, as a real CUDA graph capture would fail on them.
"""
from __future__ import annotations

from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "equal", "is_nonzero"}


class HostSyncInCapture(RuntimeError):
    pass


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.written = {}  # id -> (tensor, its value before the first write)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            raise HostSyncInCapture(f"{func} reads a device value back to the host inside a captured body")
        schema = func._schema
        mutated = [a for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write]
        inputs = dict(zip([a.name for a in schema.arguments], args)) | kwargs
        for arg in mutated:
            for t in _tensors(inputs.get(arg.name)):
                if id(t) not in self.written:
                    self.written[id(t)] = (t, t.detach().clone())
        out = func(*args, **kwargs)
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        self.ops.append((func, args, kwargs, out, bool(mutated), is_view))
        return out


class RecordingGraph:
    """Made with a device and a stream (both ignored), like :class:`anp_fast.graphs.CudaGraph`."""

    def __init__(self, device=None, stream=None):
        self.ops = None
        self.captures = 0

    def capture(self, body) -> None:
        recorder = _Recorder()
        with recorder:
            body()
        with torch.no_grad():
            for t, before in recorder.written.values():
                t.copy_(before)
        self.ops = recorder.ops
        self.captures += 1

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, out, mutates, is_view in self.ops:
            if is_view:
                continue  # a view aliases its base, which the replay updates
            new = func(*args, **kwargs)
            if mutates:
                continue  # written in place into the recorded tensors
            for dst, src in zip(_tensors(out), _tensors(new)):
                dst.copy_(src)
