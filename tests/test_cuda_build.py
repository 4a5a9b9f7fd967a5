"""The CUDA sources compile and link for sm_80 and sm_90 with the machine's nvcc, GPU or not (issue 4's build
check; running them needs a GPU: tests/test_fused_batch_norm.py does that where there is one), and no kernel
spills registers to local memory (read off the cubins, which costs no GPU either)."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return home if Path(home, "bin", "nvcc").exists() else None


def _cuobjdump():
    """The toolkit's cuobjdump, or the one Triton ships."""
    candidates = [shutil.which("cuobjdump"), str(Path(_cuda_home() or "/nonexistent", "bin", "cuobjdump"))]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    if _cuda_home() is None or torch.version.cuda is None:
        pytest.skip("no nvcc or a CPU-only torch")
    if shutil.which("ninja") is None:
        pytest.skip("ninja is not installed")
    from torch.utils import cpp_extension

    home = _cuda_home()
    out = tmp_path_factory.mktemp("cuda_build")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_HOME", home)
        mp.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        mp.setenv("MAX_JOBS", "2")
        mp.setattr(cpp_extension, "CUDA_HOME", home)
        listed = json.loads((ROOT / "csrc" / "extensions.json").read_text())["cuda"]  # setup.py's list
        sources = [str(ROOT / name) for name in listed]
        cpp_extension.load("anp_fast_cuda_build_check", sources, extra_include_paths=[str(ROOT / "csrc")],
                           extra_cflags=["-O2"], extra_cuda_cflags=["-O3"], build_directory=str(out),
                           with_cuda=True, is_python_module=False, verbose=False)
    return out


def test_cuda_extension_compiles_and_links_for_sm80_sm90(build_dir):
    assert list(build_dir.glob("*.so")), "no shared library was produced"
    # the object's fat binary holds one cubin per requested architecture, each naming it
    blob = next(build_dir.glob("perturbed_batch_norm.cuda.o")).read_bytes()
    assert b"sm_80" in blob and b"sm_90" in blob


def test_cuda_kernels_do_not_spill(build_dir):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here")
    obj = next(build_dir.glob("perturbed_batch_norm.cuda.o"))
    usage = subprocess.run([tool, "--dump-resource-usage", str(obj)], capture_output=True, text=True,
                           check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert len(kernels) >= 2 * 6, usage[-2000:]  # every kernel template instance, for both architectures
    spilling = [k for k in kernels if int(k[2]) or int(k[3])]
    assert not spilling, spilling
