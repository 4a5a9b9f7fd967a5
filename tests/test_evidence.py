"""Pre-activation evidence (anp_fast.evidence) and the clean walk that uses it."""
import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal, kl_divergence
from torch.utils.data import TensorDataset

from anp_fast.evidence import divergence, suspects
from anp_fast.evaluation import Evaluator
from anp_fast.selection import choose, walk


def _net(channels, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))
    return net


def _clean_stats(net, x):
    with torch.no_grad():
        pre = net[0](x).double()
    return pre.mean((0, 2, 3)), pre.var((0, 2, 3), unbiased=False)


def test_divergence_is_the_kl_of_clean_statistics_from_the_running_ones():
    net = _net(5)
    x = torch.randn(37, 2, 6, 7)
    mean, var = _clean_stats(net, x)
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5))
        bn.running_var.copy_(torch.rand(5) + 0.3)
    net.train()
    saved = bn.running_mean.clone(), bn.running_var.clone()
    kl = divergence(net, ["1"], x, batch_size=8)["1"]  # batched: moments are accumulated over batches
    ref = kl_divergence(Normal(mean, (var + bn.eps).sqrt()),
                        Normal(bn.running_mean.double(), (bn.running_var.double() + bn.eps).sqrt()))
    torch.testing.assert_close(kl, ref.float(), rtol=1e-5, atol=1e-6)
    assert net.training and not net[1]._forward_pre_hooks  # mode restored, hooks removed
    assert torch.equal(bn.running_mean, saved[0]) and torch.equal(bn.running_var, saved[1])  # eval mode: not updated


def test_divergence_skips_layers_without_running_statistics():
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.GroupNorm(2, 4),
                        nn.Flatten(), nn.LayerNorm(36))
    assert divergence(net, ["1", "2", "4", "absent"], torch.randn(3, 1, 3, 3)) == {}


def test_suspects_are_the_channels_whose_running_statistics_disagree_with_clean_data():
    net = _net(16)
    x = torch.randn(64, 2, 5, 5)
    mean, var = _clean_stats(net, x)
    bn = net[1]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics near the clean ones, as on a model trained on clean data ...
        bn.running_mean.copy_((mean + 0.05 * var.sqrt() * torch.randn(16, generator=g, dtype=torch.float64)).float())
        bn.running_var.copy_((var * (1 + 0.05 * torch.rand(16, generator=g, dtype=torch.float64))).float())
        bn.running_var[11] *= 4.0  # ... but channel 11 saw triggered images: a wider distribution
        bn.running_mean[11] += 2 * var[11].sqrt().float()
    masks = {"1": torch.ones(16)}
    found = suspects(net, masks, x)
    assert [(n, i) for n, i, _ in found] == [("1", 11)] and found[0][2] > 3
    assert suspects(net, masks, x, z=100.0) == []
    assert suspects(net, {"1": torch.ones(5)}, x) == []  # masks that do not match the layer: no evidence
    small = _net(6)
    with torch.no_grad():
        small[1].running_var[2] *= 100
    assert suspects(small, {"1": torch.ones(6)}, x) == []  # too few channels for a z-score


def _suspect_problem():
    """32 channels that copy the input (+1 for class 1, -1 for class 0) into a classifier that reads channels
    0-15; channel 20 is not read (free to prune) and its running statistics disagree with clean data (a
    suspect); channel 3 is read and is made a suspect too (pruning it costs clean loss)."""
    net = nn.Sequential(nn.Conv2d(1, 32, 1, bias=False), nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(32, 2, bias=False))
    y = torch.arange(80) % 2
    jitter = 1 + 0.1 * torch.rand(80, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = (2.0 * y - 1).float().view(-1, 1, 1, 1) * jitter
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(0.5, 1.5, 32).view(32, 1, 1, 1))
        reads = (torch.arange(32) < 16).float()
        net[3].weight.copy_(0.05 * torch.stack([-reads, reads]))  # a moderate margin: the loss sees each channel
        pre = net[0](x)
        net[1].running_mean.copy_(pre.mean((0, 2, 3)))
        net[1].running_var.copy_(pre.var((0, 2, 3), unbiased=False))
        for c in (3, 20):
            net[1].running_var[c] *= 9.0
    net.eval()
    halves = TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])
    evaluator = Evaluator(torch.device("cpu"), halves[0], halves[0], None, None, clean=halves[1])
    masks = {"1": torch.ones(32)}  # ANP saw nothing: every mask at 1
    return net, masks, evaluator


def test_walk_prunes_the_suspects_the_masks_miss_within_the_budget():
    net, masks, evaluator = _suspect_problem()
    plain, report = walk(net, masks, evaluator, 2.0, evidence=False, patience=1)
    assert report == {"suspects": 0, "suspects_pruned": 0, "walked": 0, "verified": True, "kept": 0}
    assert plain == {"neurons": {}}  # the first mask-order neuron is read: kept, and the walk stops
    rule, report = walk(net, masks, evaluator, 2.0, patience=1)  # evidence on by default
    assert report["suspects"] == 2 and rule == {"neurons": {"1": [3, 20]}}
    # a loss test for suspects keeps the read channel (its loss rises) and still prunes the free one
    strict, report = walk(net, masks, evaluator, 2.0, patience=1, suspect_tau=1e-6)
    assert strict == {"neurons": {"1": [20]}} and report["suspects_pruned"] == 1
    # without a loss test the read channel 3 went above: accuracy held (the other read channels keep the margin)
    chosen = choose(net, masks, evaluator, 2.0)
    assert chosen["name"] == "clean-walk+evidence" and chosen["rule"] == walk(net, masks, evaluator, 2.0)[0]
    found = chosen["evidence"]
    assert found["suspects"] == 2 and found["suspects_pruned"] == 2 and found["verified"]
    assert found["kept"] == found["walked"] == sum(len(v) for v in chosen["rule"]["neurons"].values())
    assert choose(net, masks, evaluator, 2.0, mode="masks")["name"] == "clean-walk"
    alone = choose(net, masks, evaluator, 2.0, mode="evidence")  # the suspects only: no mask is walked
    assert alone["name"] == "evidence-walk" and alone["rule"] == {"neurons": {"1": [3, 20]}}
    with pytest.raises(Exception, match="suspect_tau"):
        walk(net, masks, evaluator, 2.0, suspect_tau=-1.0)
