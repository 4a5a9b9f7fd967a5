"""The opt-in stop rule: stop once the set the pruning rule would prune is unchanged over K checks."""
import pytest
import torch

from anp_fast import ANPConfig, optimize_masks
from anp_fast.errors import ConfigError
from anp_fast.selection import StopRule, pruned_set, simulate_stop


def _masks(values):
    return {"a": torch.tensor(values[:3]), "b": torch.tensor(values[3:])}


def test_stop_rule_needs_the_same_set_patience_plus_one_times():
    rule = StopRule(lambda m: {"threshold": 0.2}, patience=2)
    seq = [[0.1, 0.5, 0.9, 0.3, 0.1], [0.1, 0.5, 0.9, 0.1, 0.1], [0.1, 0.5, 0.9, 0.1, 0.15],
           [0.1, 0.5, 0.9, 0.15, 0.0]]
    assert [rule.observe(i, _masks(v)) for i, v in enumerate(seq)] == [False, False, False, True]
    assert [c["pruned"] for c in rule.checks] == [2, 3, 3, 3]
    assert pruned_set(_masks(seq[-1]), {"threshold": 0.2}) == {("a", 0), ("b", 0), ("b", 1)}
    with pytest.raises(ConfigError, match="patience"):
        StopRule(lambda m: {"number": 1}, patience=0)


def test_a_tolerant_rule_stops_on_overlapping_sets():
    """overlap < 1: consecutive sets that overlap (Jaccard) by at least that much count as unchanged."""
    seq = [[0.1, 0.1, 0.1, 0.1, 0.9], [0.1, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.9, 0.1],
           [0.1, 0.1, 0.1, 0.9, 0.9]]  # |sets| 4, 5, 4, 3; Jaccard 0.8, 0.8, 0.75
    exact = StopRule(lambda m: {"threshold": 0.2}, patience=2)
    assert not any(exact.observe(i, _masks(v)) for i, v in enumerate(seq))
    assert [c.get("overlap") for c in exact.checks] == [None, 0.8, 0.8, 0.75]
    loose = StopRule(lambda m: {"threshold": 0.2}, patience=2, overlap=0.8)
    assert [loose.observe(i, _masks(v)) for i, v in enumerate(seq)] == [False, False, True, False]
    looser = StopRule(lambda m: {"threshold": 0.2}, patience=3, overlap=0.75)
    assert [looser.observe(i, _masks(v)) for i, v in enumerate(seq)] == [False, False, False, True]
    for bad in (0, 1.5, True, "0.8"):
        with pytest.raises(ConfigError, match="overlap"):
            StopRule(lambda m: {"number": 1}, overlap=bad)


def test_an_empty_set_never_stops_the_run():
    """Nothing to prune yet, however long it lasts, is not convergence (a matrix cell would have stopped at
    iteration 1300 with nothing pruned, ASR 100%)."""
    rule = StopRule(lambda m: {"number": 0}, patience=2)
    assert not any(rule.observe(i, _masks([0.1, 0.5, 0.9, 0.3, 0.1])) for i in range(6))
    rule = StopRule(lambda m: {"number": 1}, patience=2)
    assert [rule.observe(i, _masks([0.1, 0.5, 0.9, 0.3, 0.2])) for i in range(3)] == [False, False, True]


def test_monitor_ends_the_loop_early(tiny_resnet, tiny_batches):
    x = torch.cat([b[0] for b in tiny_batches])
    y = torch.cat([b[1] for b in tiny_batches])
    seen = []

    def monitor(iteration, engine):
        seen.append(iteration)
        return iteration == 6

    config = ANPConfig(iters=20, batch_size=8)
    short = optimize_masks(tiny_resnet, (x, y), config, progress=False, monitor=monitor, monitor_every=3)
    assert seen == [3, 6] and short.timings["stopped_at"] == 6 and len(short.loss_history) == 6
    full = optimize_masks(tiny_resnet, (x, y), config.replace(iters=6), progress=False)
    for name in full.masks:  # the first 6 iterations are those of a 6-iteration run
        assert torch.equal(full.masks[name], short.masks[name])
    with pytest.raises(ConfigError, match="monitor_every"):
        optimize_masks(tiny_resnet, (x, y), config, progress=False, monitor=monitor, monitor_every=0)


def test_simulate_stop_replays_snapshots(tiny_resnet):
    from anp_fast.surgery import perturbable_layers

    layers = perturbable_layers(tiny_resnet)
    total = sum(n for _, n in layers)
    flat = torch.linspace(0, 1, total)
    snaps = {"iterations": [100, 200, 300, 400, 500], "layers": [n for n, _ in layers],
             "masks": torch.stack([flat.roll(s) for s in (5, 3, 0, 0, 0)])}
    masks = dict(zip(snaps["layers"], torch.split(flat, [n for _, n in layers])))

    def evaluator(model, holdout_only=False):
        pruned = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        row = {"holdout_acc": 1.0 - 0.001 * pruned}  # 0.1 point per pruned neuron: auto prunes 20
        return row if holdout_only else {**row, "acc": row["holdout_acc"]}

    out = simulate_stop(tiny_resnet, masks, snaps, evaluator, budget_points=2.0, patience=2)
    assert out["stopped_at"] == 500 and out["saved"] == 0 and out["same_set"]
    assert [c["rule"]["number"] for c in out["checks"]] == [20] * 5
    early = {**snaps, "iterations": [100, 200, 300, 400, 1000],
             "masks": torch.stack([flat.roll(s) for s in (5, 0, 0, 0, 0)])}
    out = simulate_stop(tiny_resnet, masks, early, evaluator, patience=2)
    assert out["stopped_at"] == 400 and out["saved"] == 600
    # --stop-threshold 0.5 --stop-overlap 0.9: the sets below 0.5 of the rolled masks overlap by over 0.9
    out = simulate_stop(tiny_resnet, masks, snaps, evaluator, patience=2, overlap=0.9, threshold=0.5)
    assert [c["rule"] for c in out["checks"]] == [{"threshold": 0.5}] * 3
    assert min(c["overlap"] for c in out["checks"][1:]) >= 0.9
    assert out["stopped_at"] == 300 and out["saved"] == 200 and out["rule"] == {"number": 20} and out["same_set"]
