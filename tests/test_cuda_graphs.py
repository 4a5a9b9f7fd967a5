"""CUDA-graph replay of the iteration (ANPConfig.cuda_graphs).

On the CPU the graph is :class:`graph_recorder.RecordingGraph`, which replays the ops recorded at capture
without running the body's Python again (what a CUDA graph does): a replayed run must give the same masks and
losses, bit for bit, as a plain run. On a GPU the real CUDA graph is checked against the plain run.
"""
import pytest
import torch

from anp_fast import ANPConfig, ANPEngine
from anp_fast.errors import ConfigError
from anp_fast.graphs import StepGraph
from anp_fast.models import resnet18

from graph_recorder import HostSyncInCapture, RecordingGraph

CONFIGS = {
    "nchw-eager-ops": dict(channels_last=False, fused_kernels=False),
    "cl-fused": dict(channels_last=True),
    "merged": dict(channels_last=True, merge_passes=True),
    "bf16": dict(channels_last=True, precision="bf16"),
    "mixed": dict(channels_last=True, precision="mixed"),
    "steps2-projected": dict(channels_last=True, steps=2, project_noise=True),
    "eps0": dict(channels_last=True, eps=0.0),
    "train-mode-norms": dict(channels_last=True, train_mode="norms"),
}


def _run(model, batches, config, graphs, iters=7, graph_factory=RecordingGraph):
    engine = ANPEngine(model, config)
    if graphs:
        engine.graphs = StepGraph(engine, warmup=2, graph_factory=graph_factory)
    losses = [engine.step(*batches[i % len(batches)]).clone() for i in range(iters)]
    return engine, torch.stack(losses)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_replayed_iterations_equal_plain_ones(name, tiny_resnet, tiny_batches):
    config = ANPConfig(seed=3, lr=0.5, compile=False, **CONFIGS[name])
    plain, plain_losses = _run(tiny_resnet, tiny_batches, config, graphs=False)
    replayed, losses = _run(tiny_resnet, tiny_batches, config, graphs=True)
    assert replayed.graphs.replays == 5 and replayed.graphs.graph.captures == 1
    assert replayed.iteration == plain.iteration == 7
    assert torch.equal(losses, plain_losses)
    assert torch.equal(replayed.state.mask, plain.state.mask)
    assert torch.equal(replayed.momentum_buffer, plain.momentum_buffer)
    if config.eps > 0:
        assert float((1 - plain.state.mask).abs().max()) > 0.01  # the masks moved: the comparison means something


def test_each_batch_shape_warms_up_before_its_own_capture(tiny_resnet, tiny_batches):
    """A ragged batch arriving third must not be captured unwarmed, nor take the place of the full batches'
    graph; past max_graphs (2) a shape runs uncaptured."""
    config = ANPConfig(seed=1, compile=False)
    full = tiny_batches
    odd = [(x[:8], y[:8]) for x, y in tiny_batches]
    third = [(x[:4], y[:4]) for x, y in tiny_batches]
    order = [full[0], full[1], odd[2], odd[3], full[4], odd[5], full[0], third[1], third[2], third[3], full[4]]
    plain, plain_losses = _run(tiny_resnet, order, config, graphs=False, iters=len(order))
    replayed, losses = _run(tiny_resnet, order, config, graphs=True, iters=len(order))
    graphs = replayed.graphs
    assert len(graphs.graphs) == 2 and {k[0][0] for k in graphs.graphs} == {12, 8}
    assert graphs.replays == 4  # full at iterations 5, 7, 11; odd at 6; the third shape never
    assert graphs.warmed[graphs._signature_of(*third[0])] == 3
    assert torch.equal(losses, plain_losses)
    assert torch.equal(replayed.state.mask, plain.state.mask)


def test_resume_into_a_replaying_engine(tiny_resnet, tiny_batches):
    """State loaded into an engine after its graph was captured: the graph reads the loaded values."""
    config = ANPConfig(seed=2, compile=False)
    plain, _ = _run(tiny_resnet, tiny_batches, config, graphs=False, iters=8)
    first, _ = _run(tiny_resnet, tiny_batches, config, graphs=False, iters=5)
    saved = first.state_dict()
    resumed, _ = _run(tiny_resnet, tiny_batches, config, graphs=True, iters=3)  # captured, at iteration 3
    resumed.load_state_dict(saved)
    for i in range(5, 8):
        resumed.step(*tiny_batches[i % len(tiny_batches)])
    assert resumed.graphs.replays == 4
    assert resumed.iteration == 8
    assert torch.equal(resumed.state.mask, plain.state.mask)


def test_cuda_graphs_need_cuda(tiny_resnet):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(ConfigError, match="cuda_graphs=True needs a CUDA device"):
        ANPEngine(tiny_resnet, ANPConfig(cuda_graphs=True, device="cpu"))
    with pytest.raises(ConfigError, match="cuda_graphs"):
        ANPConfig(cuda_graphs="yes")


# The stand-in must catch what a CUDA graph gets wrong, or the equality above proves nothing.

def test_recorder_refuses_host_reads():
    t = torch.ones(3)
    with pytest.raises(HostSyncInCapture):
        RecordingGraph().capture(lambda: t.add_(float(t.sum())))


def test_recorder_replays_without_python():
    t = torch.zeros(2)
    calls = {"n": 0}

    def body():
        calls["n"] += 1
        t.add_(calls["n"])  # depends on Python state: a graph keeps the value seen at capture

    graph = RecordingGraph()
    graph.capture(body)
    assert torch.equal(t, torch.zeros(2))  # capture executes nothing
    graph.replay()
    graph.replay()
    assert torch.equal(t, torch.full((2,), 2.0)) and calls["n"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_cuda_graph_matches_plain_run(compiled, precision, monkeypatch):
    # the noise step keeps only gradient signs: plain and graphed runs must pick the same (deterministic) kernels
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=3, width=16).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(32, 3, 16, 16, device="cuda", generator=g),
                torch.randint(0, 10, (32,), device="cuda", generator=g)) for _ in range(4)]
    base = dict(seed=4, compile=compiled, precision=precision, device="cuda")
    plain = ANPEngine(model, ANPConfig(**base))
    graphed = ANPEngine(model, ANPConfig(cuda_graphs=True, **base))
    # iterations compared from identical states (ANP amplifies rounding over many iterations; see
    # test_fast_paths): one step each, then copy the plain engine's state over
    for i in range(8):
        x, y = batches[i % len(batches)]
        graphed.load_state_dict(plain.state_dict())
        lp, lg = plain.step(x, y), graphed.step(x, y)
        torch.testing.assert_close(lg, lp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(graphed.state.mask, plain.state.mask, rtol=0, atol=1e-5)
    assert graphed.graphs.replays == 6
