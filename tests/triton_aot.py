"""Compile the Triton kernels of kernels/ for real GPUs, ahead of time, on a machine without one.

The CPU tests run the kernels under TRITON_INTERPRET=1, which accepts code the GPU compiler refuses (and says
nothing of registers or spills). This script records every launch the kernels' host wrappers make for a set
of cases (CPU tensors; nothing is launched), then compiles each distinct (kernel, signature, constexprs) to
a cubin for the given architectures with Triton's own compiler and ptxas, and prints one JSON object per
compiled kernel: name, arch, registers, local memory (spills), stack and shared memory (read off the cubin
by the cuobjdump that ships with Triton). Run it with TRITON_INTERPRET unset or 0:

    TRITON_INTERPRET=0 python tests/triton_aot.py [--archs 80,90]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def record_launches(cases):
    """{(kernel name, signature, constexprs, launch options): JITFunction} of every launch the cases make."""
    launches = {}

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip([p.name for p in self.params], args)) | kwargs
        signature, constexprs = {}, {}
        for p in self.params:
            value = bound[p.name]
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = value
            else:
                signature[p.name] = _type_of(value)
        key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))
        launches[key] = self
        return None

    original = JITFunction.run
    JITFunction.run = run
    try:
        for case in cases:
            case()
    finally:
        JITFunction.run = original
    return launches


def default_cases():
    import anp_fast_kernels.perturbed_batch_norm as bn
    import anp_fast_kernels.perturbed_layer_norm as ln

    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape, channels_last in (((128, 64, 32, 32), True), ((128, 64, 32, 32), False), ((8, 512, 4, 4), True),
                                     ((4, 3, 7, 7), False)):
            for groups in (1, 2):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
                a = torch.ones(groups, shape[1])
                stats = torch.ones(groups, shape[1])
                for relu, res, training in ((False, False, True), (True, True, True), (True, False, False)):
                    residual = torch.empty_like(x) if res else None

                    def case(x=x, a=a, stats=stats, relu=relu, residual=residual, training=training):
                        bn.forward(x, a, a, residual, stats[:1], stats[:1], relu, training, 1e-5)
                        bn.backward(torch.empty_like(x), x, torch.empty_like(x), a, stats, stats,
                                    residual is not None, relu, training)
                    cases.append(case)
        for rows, d, groups in ((256, 768, 2), (64, ln.MAX_D, 1), (12, 17, 2)):
            x = torch.empty(rows, d, dtype=dtype)
            a = torch.ones(groups, d)
            stats = torch.ones(rows)

            def case(x=x, a=a, stats=stats):
                ln.forward(x, a, a, 1e-5)
                ln.backward(torch.empty_like(x), x, a, stats, stats)
            cases.append(case)
    return cases


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, read by the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_all(archs, cases=None):
    rows = []
    for (name, signature, constexprs, options), fn in record_launches(cases or default_cases()).items():
        for arch in archs:
            src = ASTSource(fn, signature=dict(signature), constexprs=dict(constexprs))
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
            usage = resource_usage(kernel.asm["cubin"])
            rows.append({"kernel": name, "arch": f"sm_{arch}", "constexprs": dict(constexprs),
                         "signature": ",".join(t for _, t in signature if t != "constexpr"),
                         "registers": usage.get("reg"), "local_bytes": usage.get("local"),
                         "stack_bytes": usage.get("stack"), "shared_bytes": usage.get("shared"),
                         "num_warps": kernel.metadata.num_warps})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="80,90")
    args = p.parse_args(argv)
    for row in compile_all([int(a) for a in args.archs.split(",")]):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
