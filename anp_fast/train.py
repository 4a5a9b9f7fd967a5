"""Plain supervised training (for the demo and for making backdoored models to test on); evaluation is
:mod:`anp_fast.evaluation`."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .progress import progress_bar


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, epochs: int = 20, batch_size: int = 64,
                     lr: float = 0.05, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True,
                     augment_shift: int = 0) -> nn.Module:
    """SGD with momentum and a cosine schedule; trains ``model`` in place and returns it."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    model.train()
    bar = progress_bar(epochs * steps_per_epoch, desc="training", unit="batch", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if augment_shift:
                dx, dy = torch.randint(-augment_shift, augment_shift + 1, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(-2, -1))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model
