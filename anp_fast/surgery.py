"""Surgery: a perturbable copy of any model, with all masks and noises in one :class:`MaskState`."""
from __future__ import annotations

import copy
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import LAYER_POLICIES
from . import ops
from .errors import ConfigError, ModelError
from .fusion import fuse_blocks
from .layers import gate_kind, make_perturbable, neuron_count, norm_kind
from .state import MaskState, Slot


class PerturbedModel(nn.Module):
    """A frozen perturbable copy of a model. Calling it runs the copy with the coefficients currently set
    on ``state`` (clean ones by default). ``slots`` name the layers of the ORIGINAL model."""

    def __init__(self, net: nn.Module, state: MaskState, policy: str):
        super().__init__()
        self.net = net
        self.state = state
        self.policy = policy

    @property
    def slots(self) -> List[Slot]:
        return self.state.slots

    @property
    def num_neurons(self) -> int:
        return self.state.size

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def layers(self):
        """(name, module) of every perturbable layer of the copy, in flat-storage order."""
        modules = dict(self.net.named_modules())
        return [(s.name, modules[s.name]) for s in self.slots]


def _candidates(model: nn.Module, policy: str, exclude: set):
    norms = [(n, m, k) for n, m in model.named_modules() if n not in exclude and (k := norm_kind(m))]
    # The last conv/linear layer produces the logits: gating it would prune classes, not neurons.
    gates = [(n, m, k) for n, m in model.named_modules() if (k := gate_kind(m))][:-1]
    gates = [g for g in gates if g[0] not in exclude]
    if policy == "norms" or (policy == "auto" and norms):
        return norms, "norms"
    return gates, "gates"


def _discover(model: nn.Module, layers: str, exclude: Iterable[str]):
    """The (name, module, kind) of every layer to perturb and the policy used; the argument checks and the
    nothing-to-perturb error of :func:`perturb_model`."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if layers not in LAYER_POLICIES:
        raise ConfigError(f"layers={layers!r}: must be one of {', '.join(LAYER_POLICIES)}")
    exclude = set(exclude)
    unknown = exclude - {n for n, _ in model.named_modules()}
    if unknown:
        raise ModelError(f"exclude names modules the model does not have: {', '.join(sorted(unknown))}")
    found, policy = _candidates(model, layers, exclude)
    if not found:
        what = {"norms": "no BatchNorm/LayerNorm/GroupNorm layer with an affine scale",
                "gates": "no conv/linear layer to gate (the last one, the classifier, is never gated)",
                "auto": "no norm layer with an affine scale and no conv/linear layer to gate"}[layers]
        raise ModelError(f"nothing to perturb in {type(model).__name__}: it has {what}")
    return found, policy


def perturbable_layers(model: nn.Module, layers: str = "auto",
                       exclude: Iterable[str] = ()) -> List[Tuple[str, int]]:
    """(name, neuron count) of every layer :func:`perturb_model` would make perturbable, without copying the
    model (what a front end needs to check a pruning amount or a mask file before running anything)."""
    found, _ = _discover(model, layers, exclude)
    return [(name, neuron_count(module, kind)) for name, module, kind in found]


def perturb_model(model: nn.Module, layers: str = "auto", exclude: Iterable[str] = (),
                  device: Optional[torch.device] = None) -> PerturbedModel:
    """A perturbable, frozen deep copy of ``model`` (which is never modified).

    layers: "auto" perturbs every norm layer with an affine scale (BatchNorm, LayerNorm, GroupNorm and their
    subclasses) if the model has one, else puts channel gates on the outputs of its conv/linear layers
    (all but the last, which makes the logits); "norms"/"gates" force one kind. ``exclude`` names modules
    to leave alone. Raises ModelError when nothing can be perturbed.
    """
    found, policy = _discover(model, layers, exclude)
    try:
        net = copy.deepcopy(model)
    except Exception as exc:  # a model holding handles that cannot be copied
        raise ModelError(f"cannot copy {type(model).__name__} for surgery: {exc}") from exc
    if device is not None:
        net = net.to(device)
    net.requires_grad_(False)
    offset, slots = 0, []
    for name, module, kind in found:
        size = neuron_count(module, kind)
        slots.append(Slot(name, "gate" if kind.endswith("gate") else kind, offset, size))
        offset += size
    param = next(net.parameters(), None)
    state = MaskState(slots, device=param.device if param is not None else device)
    modules = dict(net.named_modules())
    for slot, (name, _, kind) in zip(slots, found):
        make_perturbable(modules[name], kind, state, slot)
    fuse_blocks(net)  # residual add + ReLU into the batch norms of known residual blocks
    ops.load()  # the compiled backends' imports must not happen inside a later torch.compile trace
    return PerturbedModel(net, state, policy)
