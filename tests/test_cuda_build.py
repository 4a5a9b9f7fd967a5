"""The CUDA sources compile and link for sm_80 and sm_90 with the machine's nvcc, GPU or not (issue 4's build
check; running them needs a GPU: tests/test_fused_batch_norm.py does that where there is one)."""
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return home if Path(home, "bin", "nvcc").exists() else None


@pytest.mark.skipif(_cuda_home() is None or torch.version.cuda is None, reason="no nvcc or a CPU-only torch")
def test_cuda_extension_compiles_and_links_for_sm80_sm90(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    home = _cuda_home()
    monkeypatch.setenv("CUDA_HOME", home)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    monkeypatch.setenv("MAX_JOBS", "2")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", home)
    if shutil.which("ninja") is None:
        pytest.skip("ninja is not installed")
    sources = [str(ROOT / "csrc" / "cuda" / "bindings.cpp"), str(ROOT / "csrc" / "cuda" / "perturbed_batch_norm.cu")]
    cpp_extension.load("anp_fast_cuda_build_check", sources, extra_include_paths=[str(ROOT / "csrc")],
                       extra_cflags=["-O2"], extra_cuda_cflags=["-O3"], build_directory=str(tmp_path),
                       with_cuda=True, is_python_module=False, verbose=False)
    built = list(tmp_path.glob("*.so"))
    assert built, "no shared library was produced"
    # the object's fat binary holds one cubin per requested architecture, each naming it
    blob = next(tmp_path.glob("perturbed_batch_norm.cuda.o")).read_bytes()
    assert b"sm_80" in blob and b"sm_90" in blob
