"""The one dispatch point of the perturbed normalisation ops.

Layers call the functions here; which implementation runs is decided here and nowhere else. Backends
register implementations with :func:`register`; ``ANP_FAST_BACKEND=<name>`` forces one backend (an op the
forced backend lacks falls back to eager). The eager backend (``ops.eager``) is the specification.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

from . import eager

OPS = ("perturbed_batch_norm", "perturbed_layer_norm", "perturbed_group_norm", "perturbed_channel_gate")

# op name -> ordered {backend name: implementation}; earlier entries are preferred.
_REGISTRY: Dict[str, Dict[str, Callable]] = {op: {} for op in OPS}


def register(op: str, backend: str, fn: Callable, *, preferred: bool = True) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (preferred over those already there)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    table = _REGISTRY[op]
    table.pop(backend, None)
    _REGISTRY[op] = {backend: fn, **table} if preferred else {**table, backend: fn}


def backends(op: str):
    """Backend names available for ``op``, most preferred first."""
    return list(_REGISTRY[op])


def resolve(op: str) -> Callable:
    """The implementation of ``op`` that runs now."""
    forced = os.environ.get("ANP_FAST_BACKEND")
    table = _REGISTRY[op]
    if forced:
        return table.get(forced, table["eager"])
    return next(iter(table.values()))


for _op in OPS:
    register(_op, "eager", getattr(eager, _op))


def perturbed_batch_norm(*args, **kwargs):
    return resolve("perturbed_batch_norm")(*args, **kwargs)


def perturbed_layer_norm(*args, **kwargs):
    return resolve("perturbed_layer_norm")(*args, **kwargs)


def perturbed_group_norm(*args, **kwargs):
    return resolve("perturbed_group_norm")(*args, **kwargs)


def perturbed_channel_gate(*args, **kwargs):
    return resolve("perturbed_channel_gate")(*args, **kwargs)


perturbed_batch_norm.__doc__ = eager.perturbed_batch_norm.__doc__
perturbed_layer_norm.__doc__ = eager.perturbed_layer_norm.__doc__
perturbed_group_norm.__doc__ = eager.perturbed_group_norm.__doc__
perturbed_channel_gate.__doc__ = eager.perturbed_channel_gate.__doc__
