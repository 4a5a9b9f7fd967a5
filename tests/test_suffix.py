"""SuffixRunner (anp_fast.suffix): forwards that start at the changed layer give the whole forward's outputs."""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from anp_fast import suffix
from anp_fast.archs import build_arch
from anp_fast.pruning import scale_rows
from anp_fast.suffix import SuffixRunner


def _whole(model, x, chunk):
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]).float() for i in range(0, len(x), chunk)])


def _randomise_statistics(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _change_and_compare(model, runner, x, chunk, names, steps, seed=0):
    """Zero random neurons of ``names``, keeping about half of the changes; every runner output must equal the
    whole forward's exactly."""
    modules = dict(model.named_modules())
    rng = random.Random(seed)
    cached = 0
    for step in range(steps):
        name = rng.choice(names)
        rows = scale_rows(modules[name])
        i = rng.randrange(len(rows))
        with torch.no_grad():
            saved = rows[i].clone()
            rows[i] = 0
        assert torch.equal(runner([name]), _whole(model, x, chunk)), (step, name)
        cached = max(cached, len(runner.cache))
        if rng.random() < 0.5:
            runner.commit([name])
        else:
            with torch.no_grad():
                rows[i] = saved
    assert torch.equal(runner(), _whole(model, x, chunk))
    assert runner.cache == {} and runner.used == 0  # a whole run forgets: anything may have changed
    return cached


@pytest.mark.parametrize("arch, kwargs", [("resnet18", dict(width=4)), ("preact_resnet18", dict(width=4)),
                                          ("mobilenetv2", {}), ("tv:resnet18", {})])
def test_suffix_forwards_equal_the_whole_forward_bit_for_bit(arch, kwargs):
    """Residual blocks, pre-activation blocks, inverted residuals and torchvision's in-place ReLUs (which would
    overwrite a cached value that was not copied); 2 chunks of uneven size."""
    torch.manual_seed(0)
    model = build_arch(arch, 10, **kwargs).eval()
    _randomise_statistics(model)
    x = torch.randn(13, 3, 32, 32)
    runner = SuffixRunner(model, x, chunk=8)
    assert runner.incremental and len(runner.cuts) > 5
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert _change_and_compare(model, runner, x, 8, names, steps=30) > 0  # something was cached
    assert runner.suffix_runs == 30 and runner.full_runs == 1


class _Branchy(nn.Module):
    """Input-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if out.sum() > 0:
            out = out * 2
        return self.fc(out.mean((2, 3)))


class _FunctionalGate(nn.Module):
    """A per-channel gate read as a parameter (a get_attr node in the traced graph), not a module call; it
    scales its input in place, so a cached input that were not copied would be overwritten."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x.mul_(self.weight.view(1, -1, 1, 1))


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.gate = _FunctionalGate(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        out = F.relu(self.gate(self.conv1(x)))
        out = F.relu(self.bn(self.conv2(out)))
        return self.fc(out.mean((2, 3)))


class _Twice(nn.Module):
    """One BatchNorm called before and after several cut points."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out = F.relu(self.bn(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn(out)
        return self.fc(out.mean((2, 3)))


class _Tied(nn.Module):
    """Two BatchNorms sharing one weight: changing one changes the other."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.early = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.late = nn.BatchNorm2d(4)
        self.late.weight = self.early.weight
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out = F.relu(self.early(self.conv1(x)))
        out = F.relu(self.late(self.conv2(out)))
        return self.fc(out.mean((2, 3)))


def test_a_module_called_twice_recomputes_from_its_first_call():
    torch.manual_seed(0)
    model = _Twice().eval()
    _randomise_statistics(model)
    x = torch.randn(7, 3, 8, 8)
    runner = SuffixRunner(model, x, chunk=4)
    assert runner.incremental
    _change_and_compare(model, runner, x, 4, ["bn", "bn2"], steps=20)
    assert runner.suffix_runs == 20


def test_tied_parameters_are_run_whole():
    torch.manual_seed(0)
    model = _Tied().eval()
    x = torch.randn(5, 3, 8, 8)
    runner = SuffixRunner(model, x, chunk=4)
    assert not runner.incremental
    _change_and_compare(model, runner, x, 4, ["early", "late"], steps=6)
    assert runner.suffix_runs == 0


def test_an_untraceable_model_is_run_whole():
    torch.manual_seed(0)
    model = _Branchy().eval()
    x = torch.randn(5, 3, 8, 8)
    runner = SuffixRunner(model, x, chunk=4)
    assert not runner.incremental
    _change_and_compare(model, runner, x, 4, ["bn"], steps=4)
    assert runner.suffix_runs == 0 and runner.full_runs == 5


def test_a_parameter_read_functionally_recomputes_from_its_first_use():
    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(7, 3, 8, 8)
    runner = SuffixRunner(model, x, chunk=4)
    assert runner.incremental and "gate" in runner.first_call
    with torch.no_grad():
        _change_and_compare(model, runner, x, 4, ["gate", "bn"], steps=20)
    assert runner.suffix_runs == 20


def test_no_cache_budget_still_gives_the_same_outputs():
    torch.manual_seed(0)
    model = build_arch("resnet18", 10, width=4).eval()
    x = torch.randn(6, 3, 16, 16)
    runner = SuffixRunner(model, x, chunk=4, cache_bytes=0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert _change_and_compare(model, runner, x, 4, names, steps=10) == 0
    assert runner.suffix_runs == 10


def test_the_walk_chooses_the_same_neurons_incrementally(monkeypatch):
    """The clean walk with suffix forwards (the default) and with whole forwards: same rule, same report."""
    from torch.utils.data import TensorDataset

    from anp_fast.evaluation import Evaluator
    from anp_fast.selection import walk

    torch.manual_seed(0)
    model = build_arch("resnet18", 4, width=4).eval()
    _randomise_statistics(model)
    x, y = torch.randn(48, 3, 16, 16), torch.randint(0, 4, (48,))
    with torch.no_grad():  # labels the model mostly gets right, so pruning costs accuracy
        y = model(x).argmax(1)
        y[:6] = (y[:6] + 1) % 4
    evaluator = Evaluator(torch.device("cpu"), TensorDataset(x[:16], y[:16]), TensorDataset(x[:16], y[:16]), None,
                          None, clean=TensorDataset(x[16:], y[16:]))
    g = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(m.num_features, generator=g) for n, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d)}
    kw = dict(max_fraction=1.0, patience=40, tau=0.02)
    runners = []

    class Counted(suffix.SuffixRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runners.append(self)

    monkeypatch.setattr(suffix, "SuffixRunner", Counted)
    fast = walk(model, masks, evaluator, 10.0, **kw)
    assert len(runners) == 1 and runners[0].suffix_runs > 5 and runners[0].full_runs == 0  # it was used
    slow = walk(model, masks, evaluator, 10.0, incremental=False, **kw)
    assert len(runners) == 1  # not made when off
    assert fast == slow
    assert 5 < fast[1]["walked"] < sum(len(m) for m in masks.values())  # some pruned, some kept


def test_the_cache_stays_within_its_budget():
    """A budget for part of the cut points: never exceeded (counted in bytes of the cached tensors), some cut
    points cached, the outputs still the whole forward's."""
    torch.manual_seed(0)
    model = build_arch("resnet18", 10, width=4).eval()
    _randomise_statistics(model)
    x = torch.randn(6, 3, 16, 16)
    budget = 6 * 4 * 16 * 16 * 4 * 3  # three stem-sized activations of the 6 images
    runner = SuffixRunner(model, x, chunk=4, cache_bytes=budget)
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    rng = random.Random(3)
    peak = 0
    for step in range(25):
        name = rng.choice(names)
        rows = scale_rows(modules[name])
        with torch.no_grad():
            rows[rng.randrange(len(rows))] = 0  # every change kept
        assert torch.equal(runner([name]), _whole(model, x, 4))
        runner.commit([name])
        held = sum(t.numel() * t.element_size() for values in runner.cache.values() for t in values)
        assert held == runner.used
        peak = max(peak, held)
    assert 0 < peak <= budget
