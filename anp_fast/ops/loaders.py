"""The compiled backends of the fused ops, loaded lazily: the C++ CPU extension (csrc/cpu), the CUDA
extension (csrc/cuda) and the Triton kernels (kernels/). A backend that cannot load is skipped; a missing
compiled library on the device it would serve is reported once, with what to do about it."""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

_FLOAT_TYPES = (torch.float32, torch.bfloat16)
_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class _Extension:
    """Kernels of a compiled extension module, through its pybind11 functions."""

    def __init__(self, module, device_type: str, dtypes):
        self.module, self.device_type, self.dtypes = module, device_type, dtypes

    def supports(self, x) -> bool:
        return x.device.type == self.device_type and x.dtype in self.dtypes and x.dim() >= 2 and x.numel() > 0

    def forward(self, x, a, b, residual, mean_in, rstd_in, relu, training, eps):
        return tuple(self.module.perturbed_batch_norm_forward(x, a, b, residual, mean_in, rstd_in, relu, training,
                                                              eps))

    def backward(self, dy, x, y, a, mean, rstd, has_residual, relu, training):
        return tuple(self.module.perturbed_batch_norm_backward(dy, x, y, a, mean, rstd, has_residual, relu,
                                                               training))


class _TritonModule:
    """Kernels of a Triton module of kernels/, whose ``forward``/``backward`` already follow the op's contract."""

    def __init__(self, module):
        self.module = module

    def forward(self, *args):
        return self.module.forward(*args)

    def backward(self, *args):
        return self.module.backward(*args)


class _Triton(_TritonModule):
    def supports(self, x) -> bool:
        if x.dtype not in _FLOAT_TYPES + (torch.float16,) or x.dim() < 2 or x.numel() == 0:
            return False
        try:
            self.module._strides3(x)
        except ValueError:
            return False
        return True


def _import(name: str):
    """(module, None), or (None, why) when it is not built or cannot be loaded here: ImportError (not built, or
    a missing dependency such as triton) and OSError (a shared library that does not load). Anything else is a
    bug in the backend and propagates."""
    try:
        return importlib.import_module(name), None
    except (ImportError, OSError) as exc:
        return None, exc


# C++ CPU builds (setup.py), best first: x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA), the portable baseline
CPU_VARIANTS = (("v4", "anp_fast._cpu_kernels_v4", "AVX512"), ("v3", "anp_fast._cpu_kernels_v3", "AVX2"),
                ("baseline", "anp_fast._cpu_kernels", None))
cpu_variant: Optional[str] = None  # the one loaded


def _cpu_runs(capability: Optional[str]) -> bool:
    if capability is None:
        return True
    have = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ... (what ATen dispatches to)
    return have == capability or (capability == "AVX2" and have == "AVX512")


def cpp_kernels():
    """(kernels, None) or (None, the reason they did not load): the best C++ CPU build this CPU runs (runtime
    dispatch over CPU_VARIANTS, as ATen does; ``ANP_FAST_CPU_VARIANT=v4|v3|baseline`` forces one)."""
    global cpu_variant
    forced = os.environ.get("ANP_FAST_CPU_VARIANT")
    known = [v for v, _, _ in CPU_VARIANTS]
    if forced and forced not in known:
        raise ValueError(f"ANP_FAST_CPU_VARIANT={forced!r}: valid: {', '.join(known)}")
    err = None
    for variant, name, capability in CPU_VARIANTS:
        if (forced and variant != forced) or (not forced and not _cpu_runs(capability)):
            continue
        module, why = _import(name)
        if module is not None:
            cpu_variant = variant
            return _Extension(module, "cpu", _FLOAT_TYPES), None
        err = err or why
    return None, err


def cuda_kernels():
    """(kernels, None) or (None, the reason they did not load). float32 and bfloat16 only: the CUDA source
    rejects float16 (csrc/cuda/perturbed_batch_norm.cu), so fp16 input falls back instead of raising."""
    module, err = _import("anp_fast._cuda_kernels")
    return (_Extension(module, "cuda", _FLOAT_TYPES), None) if module is not None else (None, err)


def triton_kernels():
    """(kernels, None) or (None, the reason they did not load)."""
    module, err = _import("anp_fast_kernels.perturbed_batch_norm")
    return (_Triton(module), None) if module is not None else (None, err)


class _TritonLayerNorm(_TritonModule):
    def supports(self, x, features: int) -> bool:
        return (x.dtype in _FLOAT_TYPES + (torch.float16,) and x.numel() > 0 and x.dim() >= 2
                and features <= self.module.MAX_D)


def triton_layer_norm_kernels():
    """(kernels, None) or (None, the reason they did not load)."""
    module, err = _import("anp_fast_kernels.perturbed_layer_norm")
    return (_TritonLayerNorm(module), None) if module is not None else (None, err)
