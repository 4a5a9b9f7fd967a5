import os
import sys

# Triton kernels run on the CPU through the interpreter in tests; it must be chosen before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_resnet():
    from anp_fast.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=5, in_channels=1, width=4)


@pytest.fixture
def tiny_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(6)]
