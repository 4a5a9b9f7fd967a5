import os
import sys

# Triton kernels run on the CPU through the interpreter in tests; it must be chosen before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
# CI runs the suite in two pytest-xdist processes on two cores, each with up to two torch threads: OpenMP
# threads that sleep rather than spin while they wait keep the oversubscribed cores from being burnt on waiting
# (set before torch loads its OpenMP runtime).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

# The longest files first (by their 2026-12-07 durations): with --no-loadscope-reorder (pytest-xdist >= 3.8;
# by default it orders files by their number of tests) --dist loadfile hands files out in collection order, so
# the demo's two runs (about 380 s alone) start at once, not at the end.
_LONGEST_FIRST = ["test_cli_demo.py", "test_cuda_build.py", "test_distributed.py", "test_quality.py",
                  "test_published_prune.py", "test_pipeline.py", "test_bench_harness.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise


@pytest.fixture
def tiny_resnet():
    from anp_fast.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=5, in_channels=1, width=4)


@pytest.fixture
def tiny_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(6)]
