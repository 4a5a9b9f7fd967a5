"""What tests/test_distributed.py runs in each of its processes (and in the reference process): build a seeded
model and batch, run ANP iterations from given states, and record every phase (the gradients autograd returns,
the batch statistics of every perturbed BatchNorm, the mask after each step)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn


class MixedNorms(nn.Module):
    """BatchNorm and LayerNorm in one model (a conv stem with BN, a token MLP with LN)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 24)
        self.ln = nn.LayerNorm(24)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)
        return self.head(torch.relu(self.ln(self.fc(x))))


def build(case: dict) -> nn.Module:
    from anp_fast.models import resnet18

    torch.manual_seed(case.get("model_seed", 0))
    if case["model"] == "cifar_resnet18":
        model = resnet18(num_classes=10, in_channels=3, width=4)
    elif case["model"] == "digits":
        model = resnet18(num_classes=10, in_channels=1, width=16)
    else:
        model = MixedNorms()
    with torch.no_grad():  # trained-looking running statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.to(case.get("dtype", torch.float32))


def data(case: dict):
    g = torch.Generator().manual_seed(7)
    shape = (1, 16, 16) if case["model"] == "digits" else (3, 16, 16) if case["model"] == "cifar_resnet18" \
        else (3, 8, 8)
    x = torch.rand(400, *shape, generator=g, dtype=torch.float64).to(case.get("dtype", torch.float32))
    return x, torch.randint(0, 10, (400,), generator=g)


def batches(case: dict, x, y, n: int):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(len(y), (case["batch"],), generator=g) for _ in range(n)]


@contextlib.contextmanager
def recording(record: list):
    """Record what torch.autograd.grad returns and the batch statistics the perturbed batch norms use."""
    from anp_fast.ops import synced

    real_grad = torch.autograd.grad
    real_moments = synced.GlobalMoments.apply

    def grad(*args, **kwargs):
        out = real_grad(*args, **kwargs)
        record.append(("grad", [g.detach().clone() for g in out]))
        return out

    def moments(x, group):
        mean, var, n = real_moments(x, group)
        record.append(("stats", [mean.detach().clone(), var.detach().clone()]))
        return mean, var, n

    torch.autograd.grad = grad
    synced.GlobalMoments.apply = moments
    try:
        yield
    finally:
        torch.autograd.grad = real_grad
        synced.GlobalMoments.apply = real_moments


def stats_hooks(engine, record: list):
    """In the one-process reference: the per-chunk batch statistics every perturbed batch norm computes."""
    from anp_fast.layers import is_perturbable

    def hook(module, args):
        x = args[0]
        groups = module._anp_state.coef_w.shape[0] if module._anp_state.coef_w is not None else 1
        for xg in (x.chunk(groups) if groups > 1 else (x,)):
            xf = xg.double()
            dims = [0, *range(2, x.dim())]
            record.append(("stats", [xf.mean(dims), xf.var(dims, unbiased=False)]))

    return [m.register_forward_pre_hook(hook) for m in engine.model.net.modules()
            if is_perturbable(m) and m._anp_kind == "batch_norm"]


def run(case: dict, states=None):
    """Steps ``case["steps_run"]`` iterations; before step i, load ``states[i]`` when given. Returns (records
    per step, the engine state before each step, the mask after each step)."""
    from anp_fast import ANPConfig, ANPEngine

    cfg = ANPConfig(eps=0.4, steps=case["steps"], batch_size=case["batch"], fused_kernels=case["fused"],
                    seed=3)
    model = build(case)
    x, y = data(case)
    # the fused kernels check themselves against the eager op on first use (ops.verify), with autograd calls
    # the recording would catch: a throwaway step here runs those checks first
    ANPEngine(build(case), cfg).step(x[:case["batch"]], y[:case["batch"]])
    engine = ANPEngine(model, cfg)
    per_step, before, masks = [], [], []
    reference = engine.collective is None
    given = counting_given_statistics()
    try:
        for i, idx in enumerate(batches(case, x, y, case["steps_run"])):
            if states is not None:
                engine.load_state_dict(states[i])
            before.append(engine.state_dict())
            record: list = []
            hooks = stats_hooks(engine, record) if reference else []
            with recording(record):
                engine.step(x[idx], y[idx])
            for h in hooks:
                h.remove()
            per_step.append(record)
            masks.append(engine.state.mask.clone())
    finally:
        given.restore()
    return per_step, before, masks, given.calls


class counting_given_statistics:
    """Counts the fused batch-norm kernel calls that normalise with given (a process group's) statistics."""

    def __init__(self):
        from anp_fast.ops import fused

        self.fused, self.real, self.calls = fused, fused.batch_norm_op, 0

        def op(*args):
            self.calls += int(args[7] is False)  # training=False with statistics passed in
            return self.real(*args)

        fused.batch_norm_op = op

    def restore(self):
        self.fused.batch_norm_op = self.real


def worker(rank: int, world: int, init_file: str, out_dir: str, cases, states) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [run(case, states[k]) for k, case in enumerate(cases)]
        torch.save([(r[0], r[2], r[3]) for r in results], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from anp_fast.distributed import exit_now

    exit_now(0)  # not the interpreter's shutdown, which can race gloo's worker threads (see exit_now)
