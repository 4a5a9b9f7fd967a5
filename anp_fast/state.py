"""MaskState: every mask and noise value of a model in ONE flat tensor each, with per-layer slots."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Slot:
    """Where one perturbable layer's neurons live in the flat storage."""

    name: str  # qualified module name in the ORIGINAL model
    kind: str  # batch_norm | layer_norm | group_norm | norm (generic) | gate
    offset: int
    size: int


class MaskState:
    """Flat mask m, noise d (``noise_w``) and relative bias noise e (``noise_b``), fp32, one value per neuron.

    Layers do not own parameters: during a forward pass each reads its slice of the current coefficient
    rows ``coef_w``/``coef_b`` (shape (G, N)), which the caller sets with :meth:`use_clean`,
    :meth:`use_perturbed` or :meth:`set_coefficients`. The mode is therefore data, not a flag per module.
    """

    def __init__(self, slots: List[Slot], device=None):
        self.slots = list(slots)
        self.size = sum(s.size for s in self.slots)
        self.mask = torch.ones(self.size, device=device)
        self.noise_w = torch.zeros(self.size, device=device)
        self.noise_b = torch.zeros(self.size, device=device)
        self._ones = torch.ones(1, self.size, device=device)
        self.coef_w: Optional[Tensor] = None
        self.coef_b: Optional[Tensor] = None
        self.fused = True  # layers run the fused kernels where available (False: the eager ops)
        self.sync = None  # a process group: the batch norms take their batch statistics over all its ranks

    @property
    def device(self):
        return self.mask.device

    def use_clean(self) -> None:
        """Coefficients of the clean pass: coef_w = m, coef_b = 1 (gradients reach ``mask`` if it requires them)."""
        self.set_coefficients(self.mask.unsqueeze(0), self._ones)

    def use_perturbed(self) -> None:
        """Coefficients of the perturbed pass: coef_w = m + d, coef_b = 1 + e."""
        self.set_coefficients((self.mask + self.noise_w).unsqueeze(0), (1.0 + self.noise_b).unsqueeze(0))

    def set_coefficients(self, coef_w: Tensor, coef_b: Tensor) -> None:
        self.coef_w, self.coef_b = coef_w, coef_b

    def coefficients(self, slot: Slot) -> Tuple[Tensor, Tensor]:
        """This slot's (G, size) coefficient rows; the clean ones if none were set."""
        if self.coef_w is None:
            self.use_clean()
        end = slot.offset + slot.size
        return self.coef_w[:, slot.offset:end], self.coef_b[:, slot.offset:end]

    def views(self, flat: Tensor) -> Dict[str, Tensor]:
        """``{layer name: its 1-D slice of flat}`` (views, not copies)."""
        return {s.name: flat[s.offset:s.offset + s.size] for s in self.slots}

    def masks(self) -> Dict[str, Tensor]:
        """Detached copies of the per-layer masks."""
        return {name: v.detach().clone() for name, v in self.views(self.mask).items()}
