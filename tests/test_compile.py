"""torch.compile of the engine's model passes: full graphs, no recompilation across iterations and
modes (the mode is data), results matching eager."""
import pytest
import torch

from anp_fast import ANPConfig, ANPEngine
from anp_fast.models import resnet18


@pytest.mark.parametrize("merge", [True, False])
def test_compiled_step_fullgraph_no_recompile(merge):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = resnet18(num_classes=5, in_channels=1, width=4)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    common = dict(channels_last=False, merge_passes=merge, seed=4)
    compiled = ANPEngine(model, ANPConfig(compile=True, fullgraph=True, **common))
    eager = ANPEngine(model, ANPConfig(compile=False, **common))
    losses = [(compiled.step(*batches[0]), eager.step(*batches[0]))]
    # every graph exists after the first iteration: later iterations (new batches, new noise, clean and
    # perturbed coefficients) must reuse them
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in batches[1:]:
            losses.append((compiled.step(x, y), eager.step(x, y)))
    for lc, le in losses:
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for name, m in eager.masks().items():
        torch.testing.assert_close(compiled.masks()[name], m, rtol=0, atol=1e-4)


def test_compiled_step_first_thing_in_a_fresh_process():
    """A compiled step before any eager call: the fused backends' imports must already have happened (they
    cannot happen inside the trace; seen as a dynamo 'import_module is skipped' error)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from anp_fast import ANPConfig, ANPEngine\n"
        "from anp_fast.models import resnet18\n"
        "torch.manual_seed(0)\n"
        "model = resnet18(num_classes=3, in_channels=1, width=4)\n"
        "x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))\n"
        "e = ANPEngine(model, ANPConfig(compile=True, fullgraph=True, fused_kernels=True, seed=1))\n"
        "print(float(e.step(x, y)))\n")  # the fused kernels: their imports are what a fresh process can miss
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.split()) == 1
