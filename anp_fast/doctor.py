"""``anp-fast doctor``: what this machine has and whether the compiled kernels give the eager op's results here.

Prints the torch / CUDA / Triton versions, which compiled backends are built (and why not), checks every built
backend on this machine's devices for the usual signatures (fp32 and bf16, both memory layouts, plain / ReLU
/ residual+ReLU epilogues, train and eval; :mod:`anp_fast.ops.verify`) and lists any that were disabled. Exit
status 1 when a backend requested with ``ANP_FAST_BACKEND`` is not built or failed a check, else 0.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional

import torch

DTYPES = (torch.float32, torch.bfloat16)
EPILOGUES = ((False, False), (False, True), (True, True))  # (residual, relu)


def _triton_version() -> Optional[str]:
    try:
        import triton
    except (ImportError, OSError):
        return None
    return getattr(triton, "__version__", "?")


def _devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def diagnose(check: bool = True) -> Dict:
    """The doctor's findings as a dict (see the module's docstring); ``check=False`` skips the kernel checks."""
    from . import ops
    from .ops import loaders, verify

    ops.load()
    requested = os.environ.get("ANP_FAST_BACKEND") or None
    built = {}
    for name in ops.COMPILED:
        error = ops._missing.get(name)
        built[name] = {"built": error is None,
                       "error": None if error is None else f"{type(error).__name__}: {error}",
                       "devices": [d for d in _devices() if name in ops.backends("perturbed_batch_norm", d)]}
    if built["cpp"]["built"]:
        built["cpp"]["variant"] = loaders.cpu_variant
    checks: List[Dict] = []
    if check:
        for name, info in built.items():
            for device in info["devices"]:
                if name == "triton" and device == "cpu":
                    continue  # the interpreter is for tests; it never runs a real model
                fn = ops.implementation("perturbed_batch_norm", name)
                for dtype in DTYPES:
                    for channels_last in (False, True):
                        for residual, relu in EPILOGUES:
                            for training in (True, False):
                                x = torch.empty(4, 7, 3, 5, device=device, dtype=dtype)
                                if channels_last:
                                    x = x.contiguous(memory_format=torch.channels_last)
                                sig = verify.batch_norm_signature(x, x if residual else None, relu, training)
                                verify.usable("perturbed_batch_norm", name, sig,
                                              verify.batch_norm_check(fn, sig, device), force=True)
        if "triton" in ops.backends("perturbed_layer_norm", "cuda") and torch.cuda.is_available():
            fn = ops.implementation("perturbed_layer_norm", "triton")
            for dtype in DTYPES:
                x = torch.empty(2, 64, device="cuda", dtype=dtype)
                sig = verify.layer_norm_signature(x)
                verify.usable("perturbed_layer_norm", "triton", sig, verify.layer_norm_check(fn, sig, 64, "cuda"),
                              force=True)
        checks = verify.report()
    problems = []
    if requested and requested != "eager":
        if requested not in built:
            problems.append(f"ANP_FAST_BACKEND={requested!r}: unknown backend; valid: eager, "
                            f"{', '.join(ops.COMPILED)}")
        elif not built[requested]["built"]:
            problems.append(f"ANP_FAST_BACKEND={requested!r}: not built here ({built[requested]['error']})")
        else:
            bad = [c for c in checks if c["backend"] == requested and not c["ok"]]
            if bad:
                problems.append(f"ANP_FAST_BACKEND={requested!r}: failed {len(bad)} check(s), first "
                                f"{bad[0]['signature']}: {bad[0]['error']}")
    return {"versions": {"anp_fast": __import__("anp_fast").__version__, "python": platform.python_version(),
                         "torch": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                         "triton": _triton_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                         "threads": torch.get_num_threads()},
            "requested": requested, "verify": verify.enabled(), "backends": built, "checks": checks,
            "problems": problems}


def format_report(found: Dict) -> str:
    v = found["versions"]
    lines = [f"anp_fast {v['anp_fast']}, python {v['python']}, torch {v['torch']} (CPU capability "
             f"{v['cpu_capability']}, {v['threads']} threads), CUDA {v['cuda'] or 'none'}"
             + (f" ({v['cuda_device']})" if v["cuda_device"] else " (no GPU)")
             + f", Triton {v['triton'] or 'not installed'}",
             f"backend requested: {found['requested'] or 'none (the best available)'}; first-use checks "
             f"{'on' if found['verify'] else 'off (ANP_FAST_VERIFY=0)'}"]
    for name, info in found["backends"].items():
        if info["built"] and info["devices"]:
            extra = f" ({info['variant']} build)" if info.get("variant") else ""
            lines.append(f"  {name}: built{extra}, serves {', '.join(info['devices'])}")
        elif info["built"]:
            lines.append(f"  {name}: importable, but it serves CUDA GPUs and this machine has none: not checked "
                         f"here" + (" (the test suite runs it under TRITON_INTERPRET=1)" if name == "triton" else ""))
        else:
            lines.append(f"  {name}: not built ({info['error']})")
    by_backend: Dict[str, List[Dict]] = {}
    for c in found["checks"]:
        by_backend.setdefault(f"{c['op']} on {c['backend']}", []).append(c)
    for key, rows in by_backend.items():
        bad = [r for r in rows if not r["ok"]]
        seconds = sum(r["seconds"] for r in rows)
        lines.append(f"  {key}: {len(rows) - len(bad)}/{len(rows)} signatures match the eager op ({seconds:.2f} s)")
        lines += [f"    DISABLED {r['signature']}: {r['error']}" for r in bad]
    if not found["checks"]:
        lines.append("  no compiled backend was checked on this machine's devices")
    lines += [f"problem: {p}" for p in found["problems"]]
    return "\n".join(lines)


def main() -> int:
    found = diagnose()
    print(format_report(found))
    return 1 if found["problems"] else 0
