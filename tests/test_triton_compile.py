"""The Triton kernels compile for real GPUs (sm_80, sm_90) with Triton's own compiler and ptxas, here, with
no GPU: the interpreter the other Triton tests use accepts code the GPU compiler refuses and says nothing of
registers. Every launch the host wrappers make for a set of cases (fp32/bf16, NCHW/channels_last, G 1/2,
every epilogue, train/eval, layer-norm widths up to MAX_D) is compiled, and none may spill to local memory."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not (os.path.exists(os.path.join(TOOLS, "ptxas"))
                                     and os.path.exists(os.path.join(TOOLS, "cuobjdump"))),
                                reason="this Triton build ships no NVIDIA ptxas/cuobjdump")

KERNELS = {"_stats_kernel", "_normalize_kernel", "_grad_sums_kernel", "_input_grad_kernel",  # batch norm
           "_forward_kernel", "_backward_kernel"}  # layer norm


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    done = subprocess.run([sys.executable, script, "--archs", "80,90"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in compiled if r["arch"] == arch} == KERNELS
    assert {r["signature"].split(",")[0] for r in compiled} >= {"*fp32", "*bf16"}
    assert len(compiled) >= 40  # every epilogue / layout / dtype variant, twice


def test_no_kernel_spills(compiled):
    spilled = [r for r in compiled if r["local_bytes"] or r["stack_bytes"]]
    assert not spilled, "\n".join(f"{r['kernel']} {r['arch']} {r['constexprs']} warps {r['num_warps']}: "
                                  f"{r['registers']} registers, stack {r['stack_bytes']} B" for r in spilled)
    assert all(0 < r["registers"] <= 255 for r in compiled)
