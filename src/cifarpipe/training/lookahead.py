"""Lookahead: slow weights that the trained ("fast") weights return to every few steps.

Every `every` steps, and after the last one: slow <- slow + (1 - d_t) (fast - slow), then fast <- slow,
where d_t = decay^every x (t / T)^power for step t of T. Early in training d_t is ~0 and the slow
weights just follow; towards the end they average the last updates, like an exponential moving
average of the weights. The last step's update leaves the model holding the slow weights, so
validation, the saved weights and the MLflow model all see them. BatchNorm's running statistics
are averaged with the weights they belong to.

Four multi-tensor ops per update and no host round-trip: the weight d_t is read from a table on
the device. The slow weights are part of the checkpoint (state_dict).
"""
from __future__ import annotations

import torch
from torch import nn

from cifarpipe.config import LookaheadParams


class Lookahead:
    def __init__(self, model: nn.Module, p: LookaheadParams, total_steps: int) -> None:
        if p.every < 1:
            raise ValueError("lookahead.every must be >= 1 to make a Lookahead")
        self.fast = ([q for q in model.parameters() if q.requires_grad]
                     + [b for b in model.buffers() if b.is_floating_point()])
        self.slow = [t.detach().clone() for t in self.fast]
        self.every, self.total = p.every, total_steps
        t = torch.arange(total_steps + 1, dtype=torch.float64)
        kept = p.decay ** p.every * (t / total_steps) ** p.power
        self.pull = (1 - kept).to(self.slow[0].device, torch.float32)  # the share taken from the fast weights

    def due(self, step: int) -> bool:
        """Whether the update runs after global step `step` (1-based: the number of steps done)."""
        return step % self.every == 0 or step == self.total

    @torch.no_grad()
    def update(self, step: int) -> None:
        diff = torch._foreach_sub(self.fast, self.slow)
        torch._foreach_mul_(diff, self.pull[min(step, self.total)])  # a 0-dim view of the table: no host round-trip
        torch._foreach_add_(self.slow, diff)
        torch._foreach_copy_(self.fast, self.slow)

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for slow, saved in zip(self.slow, state["slow"], strict=True):
                slow.copy_(saved)
