"""The one dispatch point of the perturbed normalisation ops.

Layers call the functions here; which implementation runs is decided here and nowhere else, per op and per
device type. Backends register with :func:`register`; the fused ones (C++ CPU, CUDA, Triton: custom ops, see
``ops.fused``) load on first use, and a missing compiled library is reported once (the op then runs eagerly).
``ANP_FAST_BACKEND=<name>`` forces one backend (where it lacks the op or the device, eager runs); a call with
``fused=False`` runs eagerly. :func:`load` defines the fused backends up front (model surgery calls it, so
no library import happens inside a ``torch.compile`` trace). The eager backend (``ops.eager``) is the specification.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple

from . import eager
from .loaders import warn_once

OPS = ("perturbed_batch_norm", "perturbed_layer_norm", "perturbed_group_norm", "perturbed_channel_gate")
ALL_DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")

# op name -> ordered {backend name: (implementation, device types)}; earlier entries are preferred.
_REGISTRY: Dict[str, Dict[str, Tuple[Callable, Tuple[str, ...]]]] = {op: {} for op in OPS}
_loaded = False
_cpp_error: Optional[BaseException] = None  # why the C++ CPU kernels did not load (None: they did)
_missing: Dict[str, BaseException] = {}  # compiled backend -> why it did not load
COMPILED = ("cpp", "cuda", "triton")  # the compiled backends ANP_FAST_BACKEND may name, besides eager


def register(op: str, backend: str, fn: Callable, *, devices: Sequence[str] = ALL_DEVICES,
             preferred: bool = True) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` on ``devices`` (preferred over those there)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    table = _REGISTRY[op]
    table.pop(backend, None)
    entry = {backend: (fn, tuple(devices))}
    _REGISTRY[op] = {**entry, **table} if preferred else {**table, **entry}


def load() -> None:
    """Define the custom ops of every compiled backend that loads (once; later calls cost nothing).

    Runs on first use anyway, but importing a library cannot happen inside a ``torch.compile`` trace, so
    model surgery calls it up front: a model compiled before its first eager call then traces cleanly."""
    _load_fused()


def _load_fused() -> None:
    """Define the custom ops of every compiled backend that loads (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    global _cpp_error
    from . import fused, loaders
    cpp, _cpp_error = loaders.cpp_kernels()
    triton, triton_error = loaders.triton_kernels()
    cuda, cuda_error = loaders.cuda_kernels()
    for name, kernels, err, devices in (("triton", triton, triton_error, ("cuda",)),
                                        ("cuda", cuda, cuda_error, ("cuda",)),
                                        ("cpp", cpp, _cpp_error, ("cpu",))):
        if kernels is not None:
            register("perturbed_batch_norm", name, fused.define_batch_norm(name, kernels), devices=devices)
        else:
            _missing[name] = err
    layer_norm, _ = loaders.triton_layer_norm_kernels()
    if layer_norm is not None:
        register("perturbed_layer_norm", "triton", fused.define_layer_norm("triton", layer_norm), devices=("cuda",))


def backends(op: str, device_type: Optional[str] = None):
    """Backend names available for ``op`` (on ``device_type``, if given), most preferred first."""
    _load_fused()
    return [name for name, (_, devices) in _REGISTRY[op].items() if device_type is None or device_type in devices]


def implementation(op: str, backend: str) -> Callable:
    """``backend``'s implementation of ``op``, whatever the device (tests and benchmarks compare them)."""
    _load_fused()
    if backend not in _REGISTRY[op]:
        raise KeyError(f"{op} has no backend {backend!r} here; available: {', '.join(_REGISTRY[op])}")
    return _REGISTRY[op][backend][0]


def custom_ops(backend: str, op: str = "perturbed_batch_norm"):
    """(forward, backward) custom ops ``backend`` is registered to for ``op`` (one pair per op, shared by every
    backend: their last argument names the backend)."""
    _load_fused()
    from . import fused

    if backend not in fused.KERNELS.get(op, {}):
        raise KeyError(f"{op} has no compiled backend {backend!r} here")
    return fused.CUSTOM_OPS[op]


def resolve(op: str, device_type: str = "cpu", fused: bool = True) -> Callable:
    """The implementation of ``op`` that runs now on ``device_type``."""
    _load_fused()
    table = _REGISTRY[op]
    if not fused:
        return table["eager"][0]
    forced = os.environ.get("ANP_FAST_BACKEND")
    if forced:
        _check_forced(forced)
        fn, devices = table.get(forced, table["eager"])
        return fn if device_type in devices else table["eager"][0]
    for name, (fn, devices) in table.items():
        if device_type in devices:
            if name == "eager" and op == "perturbed_batch_norm" and device_type == "cpu" and _cpp_error:
                err = _cpp_error
                warn_once("cpp", f"anp_fast: the C++ CPU kernels are not built ({type(err).__name__}: {err}); "
                                 "the perturbed batch norm runs eagerly on the CPU (slower). Build them with "
                                 "`pip install --no-build-isolation -e .` in the source tree.")
            return fn
    return table["eager"][0]


def _check_forced(name: str) -> None:
    """ANP_FAST_BACKEND must name a backend (raises ValueError naming the valid ones) that loaded here (raises
    RuntimeError with the reason it did not). A backend that lacks the op or the device still runs eagerly."""
    if name != "eager" and name not in COMPILED:
        raise ValueError(f"ANP_FAST_BACKEND={name!r}: unknown backend; valid: eager, {', '.join(COMPILED)}")
    if name in _missing:
        err = _missing[name]
        raise RuntimeError(f"ANP_FAST_BACKEND={name!r} was requested but that backend did not load here "
                           f"({type(err).__name__}: {err})")


for _op in OPS:
    register(_op, "eager", getattr(eager, _op))


def perturbed_batch_norm(x, *args, fused: bool = True, sync=None, **kwargs):
    """``sync``: a process group whose ranks' batches together are the batch (their batch statistics are
    reduced across it by :mod:`anp_fast.ops.synced`, the chosen backend normalising with them)."""
    fn = resolve("perturbed_batch_norm", x.device.type, fused)
    if sync is not None:
        from . import synced

        return synced.perturbed_batch_norm(x, *args, group=sync, normalise=getattr(fn, "with_statistics", None),
                                           **kwargs)
    return fn(x, *args, **kwargs)


def perturbed_layer_norm(x, *args, fused: bool = True, **kwargs):
    return resolve("perturbed_layer_norm", x.device.type, fused)(x, *args, **kwargs)


def perturbed_group_norm(x, *args, fused: bool = True, **kwargs):
    return resolve("perturbed_group_norm", x.device.type, fused)(x, *args, **kwargs)


def perturbed_channel_gate(z, *args, fused: bool = True, **kwargs):
    return resolve("perturbed_channel_gate", z.device.type, fused)(z, *args, **kwargs)


perturbed_batch_norm.__doc__ = eager.perturbed_batch_norm.__doc__ + "\n\n" + perturbed_batch_norm.__doc__
perturbed_layer_norm.__doc__ = eager.perturbed_layer_norm.__doc__
perturbed_group_norm.__doc__ = eager.perturbed_group_norm.__doc__
perturbed_channel_gate.__doc__ = eager.perturbed_channel_gate.__doc__
