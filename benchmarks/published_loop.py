"""A straightforward eager version of the published ANP loop (Wu & Wang's optimize_mask_cifar.py, rewritten):
per-module NoisyBatchNorm2d with its own mask/noise Parameters and is_perturbed flag, every weight left
requiring grad, separate perturbed and clean passes, torch.optim.SGD for the mask (momentum) and the noise
(sign of the gradient, lr = eps / steps). Used as the parity reference of the engine and as the baseline of
the benchmarks. It imports nothing from anp_fast, so it is an independent check. ``draws`` replaces the
random noise draw so recorded values can be replayed."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parameter import Parameter


class NoisyBatchNorm2d(nn.BatchNorm2d):
    def setup(self):
        n = self.num_features
        self.neuron_mask = Parameter(torch.ones(n, device=self.weight.device))
        self.neuron_noise = Parameter(torch.zeros(n, device=self.weight.device))
        self.neuron_noise_bias = Parameter(torch.zeros(n, device=self.weight.device))
        self.is_perturbed = False

    def reset(self, eps, draw=None):
        with torch.no_grad():
            if draw is None:
                nn.init.uniform_(self.neuron_noise, a=-eps, b=eps)
                nn.init.uniform_(self.neuron_noise_bias, a=-eps, b=eps)
            else:
                w, b = draw
                self.neuron_noise.copy_(w)
                self.neuron_noise_bias.copy_(b)

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        if self.is_perturbed:
            coeff_weight = self.neuron_mask + self.neuron_noise
            coeff_bias = 1.0 + self.neuron_noise_bias
        else:
            coeff_weight = self.neuron_mask
            coeff_bias = 1.0
        return F.batch_norm(
            input, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight * coeff_weight, self.bias * coeff_bias, bn_training, factor, self.eps)


def noisy_copy(model):
    """Deep copy with every BatchNorm2d turned into a NoisyBatchNorm2d (weights still require grad)."""
    net = copy.deepcopy(model)
    for m in net.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = NoisyBatchNorm2d
            m.setup()
    return net


def noisy_layers(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, NoisyBatchNorm2d)]


class PublishedANP:
    def __init__(self, model, eps=0.4, steps=1, alpha=0.2, lr=0.2, momentum=0.9, project_noise=False,
                 draws=None):
        self.net = noisy_copy(model)
        self.eps, self.steps, self.alpha, self.project = eps, steps, alpha, project_noise
        self.draws = draws  # optional iterator of per-layer [(w, b), ...] lists
        params = list(self.net.named_parameters())
        self.mask_params = [p for n, p in params if "neuron_mask" in n]
        self.noise_params = [p for n, p in params if "neuron_noise" in n]
        self.mask_opt = torch.optim.SGD(self.mask_params, lr=lr, momentum=momentum)
        self.noise_opt = torch.optim.SGD(self.noise_params, lr=eps / steps if eps > 0 else 1.0)
        self.criterion = nn.CrossEntropyLoss()

    def _perturb(self, flag):
        for _, m in noisy_layers(self.net):
            m.is_perturbed = flag

    def step(self, images, labels):
        net = self.net
        net.train()
        if self.eps > 0.0:
            draw = next(self.draws) if self.draws is not None else None
            for i, (_, m) in enumerate(noisy_layers(net)):
                m.reset(self.eps, None if draw is None else draw[i])
            for _ in range(self.steps):
                self.noise_opt.zero_grad()
                self._perturb(True)
                loss_noise = -self.criterion(net(images), labels)
                loss_noise.backward()
                for p in self.noise_params:
                    p.grad.data = torch.sign(p.grad.data)
                self.noise_opt.step()
                if self.project:
                    with torch.no_grad():
                        for p in self.noise_params:
                            p.clamp_(-self.eps, self.eps)
        self.mask_opt.zero_grad()
        if self.eps > 0.0:
            self._perturb(True)
            loss_rob = self.criterion(net(images), labels)
        else:
            loss_rob = 0.0
        self._perturb(False)
        loss_nat = self.criterion(net(images), labels)
        loss = self.alpha * loss_nat + (1 - self.alpha) * loss_rob
        loss.backward()
        self.mask_opt.step()
        with torch.no_grad():
            for p in self.mask_params:
                p.clamp_(0.0, 1.0)
        return loss.detach()

    def masks(self):
        return {n: m.neuron_mask.detach().clone() for n, m in noisy_layers(self.net)}
