"""A straightforward eager version of the published RNP loops (bboylyg/RNP main.py and models/mask_batchnorm.py,
read from the source, written here independently of anp_fast): the model is rebuilt with a MaskBatchNorm2d
holding a ``neuron_mask`` parameter, every weight requires grad, torch.optim.SGD does the steps."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskBatchNorm2d(nn.BatchNorm2d):
    """y = batch_norm(x, weight * neuron_mask, bias * 1.0): the published recovering layer (mask on the scale
    only, initialised to 1)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.neuron_mask = nn.Parameter(torch.ones(num_features))

    def forward(self, input):
        self._check_input_dim(input)
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked = self.num_batches_tracked + 1
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        coeff_weight = self.neuron_mask
        coeff_bias = 1.0
        return F.batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight * coeff_weight, self.bias * coeff_bias, bn_training, exponential_average_factor, self.eps)


def with_mask_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` built with MaskBatchNorm2d in place of every BatchNorm2d (same state)."""
    net = copy.deepcopy(model)
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                new = MaskBatchNorm2d(child.num_features, child.eps, child.momentum)
                new.load_state_dict(child.state_dict(), strict=False)
                setattr(module, child_name, new)
    return net


def train_step_unlearning(model, criterion, optimizer, batches):
    """The published unlearning epoch: its clip_grad_norm_ call comes after zero_grad and before backward."""
    model.train()
    total_correct, n = 0, 0
    for images, labels in batches:
        optimizer.zero_grad()
        output = model(images)
        loss = criterion(output, labels)
        pred = output.data.max(1)[1]
        total_correct += pred.eq(labels.view_as(pred)).sum()
        n += len(labels)
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=20, norm_type=2)
        (-loss).backward()
        optimizer.step()
    return float(total_correct) / n


def unlearn(model, epoch_batches, unlearning_epochs=20, lr=0.01, clean_threshold=0.2, schedule=(10, 20)):
    """main.py's unlearning: epochs 0..unlearning_epochs, MultiStepLR stepped after each, stop at the first
    epoch whose running accuracy is <= clean_threshold. ``epoch_batches(e)`` gives epoch e's batches."""
    net = copy.deepcopy(model)
    net.requires_grad_(True)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule), gamma=0.1)
    accs = []
    for epoch in range(0, unlearning_epochs + 1):
        acc = train_step_unlearning(net, criterion, optimizer, epoch_batches(epoch))
        scheduler.step()
        accs.append(acc)
        if acc <= clean_threshold:
            break
    return net, accs


def recover(unlearned, batches, lr=0.2, alpha=0.2):
    """main.py's recovering over ``batches``: SGD(momentum 0.9) on the neuron masks of alpha * CE, masks
    clamped to [0, 1] after every step. Returns {BN name: mask}."""
    net = with_mask_batchnorm(unlearned)
    net.requires_grad_(True)
    criterion = nn.CrossEntropyLoss()
    mask_params = [v for n, v in net.named_parameters() if "neuron_mask" in n]
    mask_opt = torch.optim.SGD(mask_params, lr=lr, momentum=0.9)
    net.train()
    for images, labels in batches:
        mask_opt.zero_grad()
        output = net(images)
        loss = alpha * criterion(output, labels)
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for p in mask_params:
                p.clamp_(0, 1)
    return {n: m.neuron_mask.detach().clone() for n, m in net.named_modules() if isinstance(m, MaskBatchNorm2d)}
