"""An exponential moving average of the weights (train.ema_decay): what is evaluated and saved.

Every floating-point entry of the state dict (parameters and BatchNorm statistics, as torchvision's
reference recipe averages buffers) moves toward the model's after each optimizer step; integer
entries (batches tracked) are copied. The decay warms up as ``min(decay, (1 + n) / (10 + n))``
after n updates, so a short run's average is not dominated by the initial weights. The model is
the same on every rank after a step, so every rank's average is too; the update count travels in
the resume state, so a resumed run continues the same average.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, updates
        self._pairs = self._match(model)

    def _match(self, model: torch.nn.Module):
        mine, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        floats = [(mine[k], theirs[k]) for k in mine if mine[k].is_floating_point()]
        ints = [(mine[k], theirs[k]) for k in mine if not mine[k].is_floating_point()]
        return floats, ints

    def rate(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        floats, ints = self._pairs
        weight = 1.0 - self.rate()
        torch._foreach_lerp_([a.data for a, _ in floats], [b.data.to(a.dtype) for a, b in floats], weight)
        for a, b in ints:
            a.data.copy_(b.data)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
