from setuptools import find_packages, setup

setup(
    name="anp_fast",
    version="0.1.0",
    description="Adversarial Neuron Pruning (backdoor defense) for any PyTorch model, fast",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # benchmarks/ installs as anp_fast_bench, kernels/ (Triton) as anp_fast_kernels: `anp-fast bench` and the tests use its published loop
    packages=find_packages(include=["anp_fast", "anp_fast.*"]) + ["anp_fast_bench", "anp_fast_kernels"],
    package_dir={"anp_fast_bench": "benchmarks", "anp_fast_kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "numpy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["anp-fast=anp_fast.cli:main"]},
)
