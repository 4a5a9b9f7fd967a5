"""Kernels that check themselves (issue 12.3).

The first time a compiled backend is used for a signature (device type, dtype, memory layout, epilogue,
train/eval), it runs once on a small problem of that signature against the eager op: the output, every
gradient (input, affine, coefficients, residual) and the running statistics, with the test suite's tolerance
(an error against an fp64 eager run at most twice eager's own at the dtype, or a floor of 1e-5 in fp32 / one
rounding step in bf16 and fp16, relative to the tensor's scale). A mismatch or an error disables that backend
for that signature, with one warning naming op, backend, signature and error; the eager op then runs.
``ANP_FAST_VERIFY=0`` turns the check off. Inside a ``torch.compile`` trace or a CUDA graph capture nothing is
checked (the kernel runs as it is; the eager warm-up of either checks it first).

:func:`report` lists what was checked in this process; ``anp-fast doctor`` runs the checks for the usual
signatures and prints it.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import eager

_CHECKING = "checking"
# (op, backend, signature) -> None (verified), _CHECKING (under way), or why it is disabled
_state: Dict[Tuple[str, str, Tuple], Optional[str]] = {}
_seconds: Dict[Tuple[str, str, Tuple], float] = {}
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}


def enabled() -> bool:
    """Whether first uses are checked (``ANP_FAST_VERIFY`` unset or not 0)."""
    value = os.environ.get("ANP_FAST_VERIFY", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        raise ValueError(f"ANP_FAST_VERIFY={value!r}: use 1 (check each kernel on first use, the default) or 0")
    return value not in ("0", "false", "no", "off")


def _tracing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def layout(x) -> str:
    if x.dim() == 4 and x.shape[2] * x.shape[3] > 1 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"


def usable(op: str, backend: str, signature: Tuple, check: Callable[[], None], force: bool = False) -> bool:
    """Whether ``backend`` may run ``op`` for ``signature``: checked once (``check()`` raises on a mismatch;
    ``force``: check even with ``ANP_FAST_VERIFY=0``)."""
    if torch.compiler.is_compiling():
        return True  # nothing runs inside a trace; see the module's docstring
    key = (op, backend, signature)
    state = _state.get(key, "")
    if state is None or state == _CHECKING:
        return True  # verified, or the check itself is calling the kernel
    if state:
        return False
    if not (force or enabled()) or _tracing():
        return True
    _state[key] = _CHECKING
    t0 = time.perf_counter()
    try:
        # the first call may come from inside no_grad / inference_mode (evaluation) or autocast: the check
        # needs gradients and the plain dtypes it compares
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
                torch.autocast("cuda", enabled=False):
            check()
        _state[key] = None
    except Exception as exc:  # noqa: BLE001 - any failure of a kernel disables it for this signature
        _state[key] = f"{type(exc).__name__}: {exc}".strip()
        warnings.warn(f"anp_fast: {op} backend {backend!r} disabled for {describe(signature)}: it failed its "
                      f"check against the eager op ({_state[key]}); the eager op runs instead",
                      RuntimeWarning, stacklevel=4)
    finally:
        _seconds[key] = time.perf_counter() - t0
    return _state[key] is None


def describe(signature: Tuple) -> str:
    return "/".join(str(s) for s in signature)


def report() -> List[Dict]:
    """What was checked in this process: op, backend, signature, ok, error, seconds."""
    return [{"op": op, "backend": backend, "signature": describe(sig), "ok": state is None,
             "error": None if state is None else state, "seconds": _seconds.get((op, backend, sig), 0.0)}
            for (op, backend, sig), state in _state.items() if state != _CHECKING]


def forget() -> None:
    """Drop every result (tests; a later use checks again)."""
    _state.clear()
    _seconds.clear()


# --------------------------------------------------------------------------------------------- comparison
def _compare(names, got, ref, ref64, dtype, factor: float = 2.0) -> None:
    for name, g, r, r64 in zip(names, got, ref, ref64):
        if g is None or r64 is None:
            if (g is None) != (r64 is None):
                raise AssertionError(f"{name}: missing")
            continue
        if g.shape != r64.shape:
            raise AssertionError(f"{name}: shape {tuple(g.shape)}, eager {tuple(r64.shape)}")
        r64 = r64.double()
        eager_err = float((r.double() - r64).abs().max()) if r.numel() else 0.0
        err = float((g.double() - r64).abs().max()) if g.numel() else 0.0
        scale = max(1.0, float(r64.abs().max()) if r64.numel() else 1.0)
        tol = max(factor * eager_err, FLOOR.get(dtype, 1e-5) * scale)
        if not err <= tol:  # catches NaN too
            raise AssertionError(f"{name} differs from the eager op by {err:.3g} (allowed {tol:.3g})")


def _batch_norm_case(channels: int, dtype, channels_last: bool, residual: bool):
    gen = torch.Generator().manual_seed(20261203)
    shape = (4, channels, 3, 5)
    t = dict(x=torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.7,
             scale=torch.randn(channels, generator=gen, dtype=torch.float64),
             shift=torch.randn(channels, generator=gen, dtype=torch.float64),
             coef_w=torch.rand(2, channels, generator=gen, dtype=torch.float64) + 0.5,
             coef_b=torch.rand(2, channels, generator=gen, dtype=torch.float64) + 0.5,
             residual=torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None,
             dy=torch.randn(shape, generator=gen, dtype=torch.float64),
             running_mean=torch.randn(channels, generator=gen, dtype=torch.float64),
             running_var=torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
    # the fp64 reference sees the values the tested call sees: activations at the dtype, parameters in fp32
    return {k: None if v is None else (v.to(dtype) if k in ("x", "residual", "dy") else v.float()).double()
            for k, v in t.items()}


def _run_batch_norm(fn, t, dtype, channels_last, training, relu, device):
    mf = torch.channels_last if channels_last else torch.contiguous_format
    act = lambda v: v.to(device, dtype).contiguous(memory_format=mf).requires_grad_()  # noqa: E731
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    par = lambda v: v.to(device, pdt).requires_grad_()  # noqa: E731
    x = act(t["x"])
    leaves = [x, par(t["scale"]), par(t["shift"]), par(t["coef_w"]), par(t["coef_b"])]
    residual = act(t["residual"]) if t["residual"] is not None else None
    if residual is not None:
        leaves.append(residual)
    rm, rv = t["running_mean"].to(device, pdt), t["running_var"].to(device, pdt)
    y = fn(x, leaves[1], leaves[2], leaves[3], leaves[4], rm, rv, training, 0.1, 1e-5, residual=residual, relu=relu)
    grads = torch.autograd.grad(y, leaves, t["dy"].to(device, dtype).contiguous(memory_format=mf))
    return [v.detach().cpu() for v in (y, *grads, rm, rv)]


def batch_norm_signature(x, residual, relu: bool, training) -> Tuple:
    """``training``: True (batch statistics), False (running ones) or "given" (statistics given by the caller,
    differentiable: the op's ``with_statistics``)."""
    return (x.device.type, str(x.dtype).replace("torch.", ""), layout(x),
            ("residual+" if residual is not None else "") + ("relu" if relu else "plain"),
            "given" if training == "given" else "train" if training else "eval")


def _through_given_statistics(with_statistics: Callable) -> Callable:
    """The batch-norm op's signature in training mode, computed by ``with_statistics`` from per-group batch
    statistics taken here (differentiably): it must equal the eager op's training mode, every gradient
    included (the gradients reaching the statistics are what a process group's global statistics need)."""
    def fn(x, scale, shift, coef_w, coef_b, running_mean, running_var, training, momentum, eps, residual=None,
           relu=False):
        groups = coef_w.shape[0]
        xs = x.float().unflatten(0, (groups, -1))
        dims = [1, *range(3, xs.dim())]
        mean, var = xs.mean(dims), xs.var(dims, unbiased=False)
        y = with_statistics(x, scale, shift, coef_w, coef_b, mean, var, eps, residual, relu)
        if y is None:
            raise AssertionError("the kernels declined a supported input")
        n = x.numel() // x.shape[1] // groups
        with torch.no_grad():
            for g in range(groups):
                running_mean.mul_(1 - momentum).add_(mean[g].to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var[g] * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
        return y
    return fn


def batch_norm_check(fn: Callable, signature: Tuple, device, with_statistics: Optional[Callable] = None
                     ) -> Callable[[], None]:
    """A check of ``fn`` (the fused op-level function) for ``signature`` against the eager op (mode "given":
    of ``with_statistics``, through statistics taken from the batch, against the eager training mode)."""
    _, dtype_name, lay, epilogue, mode = signature
    dtype = getattr(torch, dtype_name)
    channels_last, residual, relu, training = lay == "channels_last", "residual" in epilogue, "relu" in epilogue, \
        mode != "eval"
    if mode == "given":
        fn = _through_given_statistics(with_statistics)

    def check() -> None:
        t = _batch_norm_case(7, dtype, channels_last, residual)
        if relu and dtype != torch.float32:  # no gradient where the ReLU decision is within rounding of 0
            pre = _run_batch_norm(eager.perturbed_batch_norm, t, torch.float64, channels_last, training, False,
                                  "cpu")[0]
            t = dict(t, dy=t["dy"] * (pre.abs() > 2.0 ** -6 * float(pre.abs().max())))
        ref64 = _run_batch_norm(eager.perturbed_batch_norm, t, torch.float64, channels_last, training, relu, "cpu")
        ref = _run_batch_norm(eager.perturbed_batch_norm, t, dtype, channels_last, training, relu, "cpu")
        got = _run_batch_norm(fn, t, dtype, channels_last, training, relu, device)
        names = ["output", "grad input", "grad scale", "grad shift", "grad coef_w", "grad coef_b"]
        names += (["grad residual"] if residual else []) + ["running_mean", "running_var"]
        # given statistics at bf16/fp16: the gradient of x is the kernel's term plus the statistics' term, each
        # rounded to the dtype before autograd adds them (eager rounds once)
        _compare(names, got, ref, ref64, dtype, 3.0 if mode == "given" and dtype != torch.float32 else 2.0)
    return check


def layer_norm_signature(x) -> Tuple:
    return (x.device.type, str(x.dtype).replace("torch.", ""), "contiguous", "plain", "any")


def layer_norm_check(fn: Callable, signature: Tuple, features: int, device) -> Callable[[], None]:
    dtype = getattr(torch, signature[1])

    def run(f, t, dt, dev):
        x = t["x"].to(dev, dt).requires_grad_()
        p = torch.float64 if dt == torch.float64 else torch.float32
        leaves = [x] + [t[k].to(dev, p).requires_grad_() for k in ("scale", "shift", "coef_w", "coef_b")]
        y = f(x, (features,), *leaves[1:], 1e-5)
        grads = torch.autograd.grad(y, leaves, t["dy"].to(dev, dt))
        return [v.detach().cpu() for v in (y, *grads)]

    def check() -> None:
        gen = torch.Generator().manual_seed(20261203)
        t = dict(x=torch.randn(6, 3, features, generator=gen, dtype=torch.float64) + 0.3,
                 scale=torch.randn(features, generator=gen, dtype=torch.float64),
                 shift=torch.randn(features, generator=gen, dtype=torch.float64),
                 coef_w=torch.rand(2, features, generator=gen, dtype=torch.float64) + 0.5,
                 coef_b=torch.rand(2, features, generator=gen, dtype=torch.float64) + 0.5,
                 dy=torch.randn(6, 3, features, generator=gen, dtype=torch.float64))
        t = {k: (v.to(dtype) if k in ("x", "dy") else v.float()).double() for k, v in t.items()}
        ref64 = run(eager.perturbed_layer_norm, t, torch.float64, "cpu")
        ref = run(eager.perturbed_layer_norm, t, dtype, "cpu")
        got = run(fn, t, dtype, device)
        _compare(["output", "grad input", "grad scale", "grad shift", "grad coef_w", "grad coef_b"], got, ref, ref64,
                 dtype)
    return check
