"""The compiled backends of the fused ops, loaded lazily: the C++ CPU extension (csrc/cpu), the CUDA
extension (csrc/cuda) and the Triton kernels (kernels/). A backend that cannot load is skipped; a missing
compiled library on the device it would serve is reported once, with what to do about it."""
from __future__ import annotations

import importlib
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


def cpp_kernels():
    """(kernels, None) or (None, the reason they did not load)."""
    module, err = _import("anp_fast._cpu_kernels")
    return (_Extension(module, "cpu", _FLOAT_TYPES), None) if module is not None else (None, err)


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
