"""Counting what a training step asks of the device: the operators it dispatches, and the host syncs.

A TorchDispatchMode sees every aten operator below autograd (forward, backward and optimizer alike),
on any device, so the count of a CUDA step can be taken on the CPU. Each operator that is not a view
or an allocation is a kernel launch on a GPU, ~5-50 us of host time each: the bound of a step that
is too small to keep the GPU busy. A host sync is an operator whose result the host must wait for:
`_local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`, `if t:`) and the operators whose output size
depends on the data (`nonzero`, `masked_select`, `unique`, ...).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
         "aten.unique_consecutive", "aten.repeat_interleave"}
NO_KERNEL = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.empty_permuted", "aten.detach",
             "aten.lift_fresh", "aten.set_", "aten.resize_"}


class OpCounter(TorchDispatchMode):
    """with OpCounter() as ops: step(...) -> ops.launches, ops.syncs, ops.counts (operator -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.launches = 0
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("aten."):
            self.counts[name] += 1
            if name in SYNCS:
                self.syncs.append(name)
            if not func.is_view and name not in NO_KERNEL:
                self.launches += 1
        return func(*args, **(kwargs or {}))

    def summary(self, per: int = 1) -> dict:
        """Launches and syncs per call when the counted block ran `per` steps; the ten most frequent operators."""
        return {"launches_per_step": self.launches / per, "syncs_per_step": len(self.syncs) / per,
                "ops_per_step": sum(self.counts.values()) / per, "most_frequent": self.counts.most_common(10)}
