"""The engine against the straightforward eager published loop (benchmarks/published_loop.py)."""

import pytest
import torch

from anp_fast import ANPConfig, ANPEngine, optimize_masks, prune
from anp_fast_bench.published_loop import PublishedANP, noisy_layers


def _replay(engine_layers, iters, eps, seed=3):
    """Recorded noise draws: flat per iteration, and the same values split per layer for the reference."""
    g = torch.Generator().manual_seed(seed)
    n = sum(s.size for s in engine_layers)
    flat = [(torch.empty(n).uniform_(-eps, eps, generator=g), torch.empty(n).uniform_(-eps, eps, generator=g))
            for _ in range(iters)]
    per_layer = [[(w[s.offset:s.offset + s.size], b[s.offset:s.offset + s.size]) for s in engine_layers]
                 for w, b in flat]
    return flat, per_layer


def _replaying(engine, draws):
    """Make ``engine`` take its noise draws from ``draws`` (flat (noise_w, noise_b) per iteration)."""
    it = iter(draws)

    def replay(noise_w, noise_b, eps):
        w, b = next(it)
        noise_w.copy_(w)
        noise_b.copy_(b)
    engine.noise_init = replay
    return engine


EXACT = dict(channels_last=False, merge_passes=False, compile=False, fused_kernels=False)


def _run_both(model, batches, n_steps, **cfg):
    config = ANPConfig(**{**EXACT, **cfg})
    draws_flat, draws_layers = None, None
    engine = ANPEngine(model, config)
    if config.eps > 0:
        draws_flat, draws_layers = _replay(engine.state.slots, n_steps, config.eps)
        _replaying(engine, draws_flat)
    ref = PublishedANP(model, eps=config.eps, steps=config.steps, alpha=config.alpha, lr=config.lr,
                       momentum=config.momentum, project_noise=config.project_noise,
                       draws=iter(draws_layers) if draws_layers else None)
    assert [n for n, _ in noisy_layers(ref.net)] == [s.name for s in engine.state.slots]
    for i in range(n_steps):
        x, y = batches[i % len(batches)]
        l_eng = engine.step(x, y)
        l_ref = ref.step(x, y)
        assert torch.allclose(l_eng, l_ref, rtol=1e-5, atol=1e-6), (i, l_eng, l_ref)
    return engine.masks(), ref.masks()


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_parity_eps0(tiny_resnet, tiny_batches):
    eng, ref = _run_both(tiny_resnet, tiny_batches, 8, eps=0.0, iters=8)
    assert _max_diff(eng, ref) <= 1e-5
    # the loop must have moved the masks, or parity proves nothing
    assert max(float((1 - m).abs().max()) for m in eng.values()) > 1e-3


@pytest.mark.parametrize("steps,project", [(1, False), (2, False), (2, True)])
def test_parity_replayed_noise(tiny_resnet, tiny_batches, steps, project):
    eng, ref = _run_both(tiny_resnet, tiny_batches, 8, eps=0.4, steps=steps, project_noise=project, iters=8)
    assert _max_diff(eng, ref) <= 1e-5
    assert max(float((1 - m).abs().max()) for m in eng.values()) > 1e-3


def test_unprojected_noise_exceeds_eps(tiny_resnet, tiny_batches):
    """Published behaviour: after the sign step, d and e may leave [-eps, eps]; projected, they may not."""
    for project in (False, True):
        engine = ANPEngine(tiny_resnet, ANPConfig(eps=0.4, steps=2, project_noise=project))
        x, y = tiny_batches[0]
        engine.step(x, y)
        top = float(engine.state.noise_w.abs().max())
        assert (top <= 0.4 + 1e-6) == project, top


def test_user_model_untouched(tiny_resnet, tiny_batches):
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    flags = [p.requires_grad for p in tiny_resnet.parameters()]
    training = tiny_resnet.training
    x = torch.cat([b[0] for b in tiny_batches])
    y = torch.cat([b[1] for b in tiny_batches])
    result = optimize_masks(tiny_resnet, (x, y), ANPConfig(iters=5, batch_size=8), progress=False)
    pruned = prune(tiny_resnet, result.masks, fraction=0.3)
    after = tiny_resnet.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
        assert before[k].dtype == after[k].dtype
    assert [p.requires_grad for p in tiny_resnet.parameters()] == flags
    assert tiny_resnet.training == training
    assert all(type(m).__module__ != "anp_fast.layers" for m in tiny_resnet.modules())
    # and the pruned copy did change
    assert any(not torch.equal(before[k], v) for k, v in pruned.state_dict().items())


def test_seeded_runs_repeat(tiny_resnet, tiny_batches):
    x = torch.cat([b[0] for b in tiny_batches])
    y = torch.cat([b[1] for b in tiny_batches])
    runs = [optimize_masks(tiny_resnet, (x, y), ANPConfig(iters=4, batch_size=8, seed=s), progress=False)
            for s in (7, 7, 8)]
    assert all(torch.equal(runs[0].masks[k], runs[1].masks[k]) for k in runs[0].masks)
    assert any(not torch.equal(runs[0].masks[k], runs[2].masks[k]) for k in runs[0].masks)


def test_dataset_and_loader_inputs(tiny_resnet, tiny_batches):
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.cat([b[0] for b in tiny_batches])
    y = torch.cat([b[1] for b in tiny_batches])
    config = ANPConfig(iters=3, batch_size=8)
    for data in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)):
        result = optimize_masks(tiny_resnet, data, config, progress=False)
        assert len(result.loss_history) == 3 and all(v == v for v in result.loss_history)
        assert result.num_neurons == sum(m.numel() for m in result.masks.values())
        assert any(float((1 - m).abs().max()) > 0 for m in result.masks.values())


def test_train_mode_norms_turns_dropout_off():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(4 * 36, 3))
    x = torch.randn(6, 1, 8, 8)
    for mode, deterministic in (("all", False), ("norms", True)):
        engine = ANPEngine(model, ANPConfig(train_mode=mode, channels_last=False))
        assert engine.model.net[1].training  # batch statistics in both modes
        with torch.no_grad():
            outs = [engine.forward(x) for _ in range(2)]
        assert torch.equal(outs[0], outs[1]) == deterministic
