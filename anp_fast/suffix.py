"""Forward passes that start where a change starts: the clean walk's evaluations, run incrementally.

The clean walk (:func:`anp_fast.selection.walk`) evaluates the same images hundreds of times, each time with one
more neuron's scale changed. Nothing upstream of the changed module moves, so :class:`SuffixRunner` keeps the
activations at the model's *cut points* (graph positions through which every later value depends on earlier
ones only: block outputs of a ResNet, the stage boundaries of a VGG) and recomputes only from the last cut
point before the changed module. On a CIFAR ResNet-18 most neurons sit in the last stages, where a suffix is a
fraction of the whole forward.

The results are the full forward's, bit for bit: the same modules run on the same tensors in the same chunks,
only the upstream part is not run again. Cached values are copied in and out, so a model's in-place ops
(``ReLU(inplace=True)``) cannot corrupt them.

A model ``torch.fx`` cannot trace (input-dependent control flow, say) is run whole, as before; so is one whose
changed module is not called in the traced graph. ``cache_bytes`` bounds the memory the cached activations may
take, on the model's device (cut points are admitted in graph order while it lasts, judged by their first chunk;
the others are recomputed when needed).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

CACHE_BYTES = 2 << 30   # at most 2 GiB of cached activations


def _nbytes(values: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in values)


def _trace(model: nn.Module):
    try:
        import torch.fx

        return torch.fx.Tracer().trace(model)
    except Exception:  # any model fx cannot trace is simply run whole
        return None


class SuffixRunner:
    """``runner(changed=None)``: ``model``'s outputs on ``x`` (in ``chunk``-row slices, on ``device``),
    concatenated on the CPU as float; ``changed``: the module names whose parameters changed since the last
    call that *kept* the change (:meth:`commit`), the only ones downstream of which anything is recomputed.

    Protocol: change a module's parameters, call ``runner(changed=[name])``; then either keep the change and
    call :meth:`commit` with the same names, or undo it (nothing to tell the runner). ``runner()`` runs the
    whole model and forgets every cached value (anything may have changed).

    Models with tied parameters or buffers (one tensor in two modules) are always run whole."""

    def __init__(self, model: nn.Module, x: Tensor, chunk: int = 256, device=None, cache_bytes: int = CACHE_BYTES):
        self.model, self.x, self.chunk, self.device = model, x, chunk, device
        self.slices = [x[i:i + chunk] for i in range(0, len(x), chunk)]
        self.cache_bytes = cache_bytes
        self.graph = _trace(model)
        self.nodes: List = list(self.graph.nodes) if self.graph is not None else []
        self.cuts: List[int] = []
        self.cut_set: set = set()
        self.incremental = self.graph is not None and self._plan()
        self.cache: Dict[int, List[Tensor]] = {}    # cut position -> its value per chunk (accepted state)
        self.used = 0                               # bytes in the cache
        self.sizes: Dict[int, int] = {}             # cut position -> bytes of its values for all chunks (bound)
        self.full_runs = self.suffix_runs = 0

    # ---------------------------------------------------------------------------------------------- plan
    def _plan(self) -> bool:
        nodes = self.nodes
        pos = {n: i for i, n in enumerate(nodes)}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1 or nodes[-1].op != "output":
            return False
        # a tensor shared by two modules (tied weights) changes both: positions per module would miss that
        seen = set()
        for _, t in list(self.model.named_parameters(remove_duplicate=False)) + list(
                self.model.named_buffers(remove_duplicate=False)):
            if id(t) in seen:
                return False
            seen.add(id(t))
        # constants (parameters, buffers) can be fetched anywhere: they never cross a cut
        self.const = {n for n in nodes if n.op == "get_attr"}
        last_use = {}
        for n in nodes:
            for user in n.users:
                last_use[n] = max(last_use.get(n, -1), pos[user])
        self.last_use = last_use
        # position i is a cut when the only non-constant value defined at or before i and used after i is
        # node i itself
        live: set = set()
        cuts = []
        for i, n in enumerate(nodes[:-1]):
            if n not in self.const and last_use.get(n, -1) > i:
                live.add(n)
            live = {v for v in live if last_use[v] > i}
            if live == {n}:
                cuts.append(i)
        self.cuts = cuts
        self.cut_set = set(cuts) - {pos[placeholders[0]]}  # the input itself is never worth a copy
        # where each module's parameters are first read: its first call, or the first user of a get_attr of
        # one of its parameters (a functional layer)
        self.first_call: Dict[str, int] = {}
        for i, n in enumerate(nodes):
            if n.op == "call_module":
                name = str(n.target)
            elif n.op == "get_attr" and n.users:
                name, i = str(n.target).rpartition(".")[0], min(pos[u] for u in n.users)
            else:
                continue
            self.first_call[name] = min(self.first_call.get(name, i), i)
        self.modules = dict(self.model.named_modules())
        return bool(cuts)

    # ----------------------------------------------------------------------------------------------- run
    def _fetch(self, target: str):
        obj = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _arg(self, env: Dict, node):
        if node in env:
            return env[node]
        if node.op == "get_attr":
            return self._fetch(node.target)
        raise RuntimeError(f"SuffixRunner: value of {node} is not available (a bad cut point)")

    def _run(self, start: int, value: Optional[Tensor], xs: Tensor, keep: Callable[[int, object], bool],
             stop: Optional[int]):
        """Run the nodes after position ``start`` (whose value is ``value``; ``start`` -1: from the input
        ``xs``) up to position ``stop`` (None: the output). Returns its value and copies of the values at the
        positions ``keep(position, value)`` accepts."""
        from torch.fx.node import map_arg

        env: Dict = {}
        if start >= 0:
            env[self.nodes[start]] = value.clone()
        kept: Dict[int, Tensor] = {}
        end = len(self.nodes) - 1 if stop is None else stop
        for i in range(start + 1, end + 1):
            n = self.nodes[i]
            if n.op == "placeholder":
                out = xs
            elif n.op == "get_attr":
                out = self._fetch(n.target)
            else:
                args = map_arg(n.args, lambda a: self._arg(env, a))
                kwargs = map_arg(n.kwargs, lambda a: self._arg(env, a))
                if n.op == "output":
                    return args[0], kept
                if n.op == "call_module":
                    out = self.modules[n.target](*args, **kwargs)
                elif n.op == "call_function":
                    out = n.target(*args, **kwargs)
                else:  # call_method
                    out = getattr(args[0], n.target)(*args[1:], **kwargs)
            env[n] = out
            if keep(i, out):
                kept[i] = out.clone()
            for a in n.all_input_nodes:  # free what nothing later reads
                if a in env and self.last_use.get(a, -1) <= i:
                    del env[a]
        return env[self.nodes[end]], kept

    def _to(self, xs: Tensor) -> Tensor:
        return xs.to(self.device) if self.device is not None else xs

    def _position(self, names: Sequence[str]) -> Optional[int]:
        starts = [self.first_call.get(name) for name in names]
        return None if not starts or any(s is None for s in starts) else min(starts)

    def _whole(self) -> Tensor:
        self.full_runs += 1
        return torch.cat([self.model(self._to(xs)).float().cpu() for xs in self.slices])

    @torch.no_grad()
    def __call__(self, changed: Optional[Sequence[str]] = None) -> Tensor:
        if changed is None:
            self._forget()
        first = self._position(changed) if self.incremental and changed is not None else None
        before = [c for c in self.cuts if c < first] if first is not None else []
        if not before:
            return self._whole()
        cut = before[-1]
        cached = [c for c in self.cache if c <= cut]
        start = max(cached) if cached else -1
        # which cut values to keep is decided on the first chunk (the largest), its bytes times the number of
        # chunks, while the budget lasts: the cut this call starts its suffix from first (when its size is known
        # from an earlier call), then the others in graph order; the other chunks follow that decision
        n_chunks = len(self.slices)
        decided: Dict[int, bool] = {}
        projected = [self.used]
        if cut != start and cut in self.sizes and self.used + self.sizes[cut] <= self.cache_bytes:
            decided[cut] = True
            projected[0] += self.sizes[cut]

        def keep(i: int, out) -> bool:
            if i not in decided:
                ok = i in self.cut_set and i not in self.cache and isinstance(out, Tensor)
                if ok:
                    size = self.sizes[i] = out.numel() * out.element_size() * n_chunks
                    ok = projected[0] + size <= self.cache_bytes
                    projected[0] += size if ok else 0
                decided[i] = ok
            return decided[i]

        fresh: Dict[int, List[Tensor]] = {}
        outs = []
        for k, xs in enumerate(self.slices):
            xs = self._to(xs)
            if start == cut:
                value = self.cache[cut][k]
            else:
                value, kept = self._run(start, self.cache[start][k] if start >= 0 else None, xs, keep, cut)
                for c, v in kept.items():
                    fresh.setdefault(c, []).append(v)
            if not isinstance(value, Tensor):  # a cut whose value is no tensor cannot be started from
                self.cuts = [c for c in self.cuts if c != cut]
                self.cut_set.discard(cut)
                return self._whole()
            out, _ = self._run(cut, value, xs, lambda i, v: False, None)
            outs.append(out.float().cpu())
        self.suffix_runs += 1
        for c, values in fresh.items():
            self.cache[c] = values
            self.used += _nbytes(values)
        return torch.cat(outs)

    def _forget(self) -> None:
        self.cache.clear()
        self.used = 0

    def commit(self, changed: Sequence[str]) -> None:
        """The change to ``changed`` is kept: cached values downstream of it are stale."""
        if not self.incremental:
            return
        first = self._position(changed)
        for c in list(self.cache):
            if first is None or c >= first:
                self.used -= _nbytes(self.cache.pop(c))
