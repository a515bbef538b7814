"""The optimizer and the learning-rate schedule of the course's recipe (and its SGD variant)."""
from __future__ import annotations

import torch
from torch import nn

from cifarpipe.config import OptimizerParams, SchedulerParams


def make_optimizer(model: nn.Module, p: OptimizerParams) -> torch.optim.Optimizer:
    """`p.name`'s optimizer over the model's parameters; the keys of the other optimizer are not used."""
    # fused: one kernel for all parameters instead of ~10 small ops per tensor; the same update.
    # Both Adam and SGD have it for CPU and CUDA; the unfused Adam.step takes 12 % of a course-CNN step on a 2-core CPU.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if p.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                               weight_decay=p.weight_decay, fused=fused)
    return torch.optim.Adam(model.parameters(), lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay,
                            fused=fused)


class EpochSchedule:
    """The learning rate of each epoch: a linear warm-up over the first `warmup_epochs`, then the
    plateau scheduler (or, with `none`, the configured lr throughout).

    The warm-up is per epoch, not per step: the course steps its scheduler once per epoch, each
    epoch's logged `lr` is then the one rate that whole epoch trained with, and the rate is a
    function of the epoch number alone, so a resume (at an epoch boundary or mid-epoch) needs no
    state beyond the epoch: warm-up epoch e (0-based) trains at lr * (f + (1 - f) * e / N), epoch
    N at lr. The plateau scheduler is not stepped during warm-up, so those epochs (whose accuracy
    rises with the lr) neither set its best value nor use up its patience; epoch N is its first step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, p: SchedulerParams) -> None:
        self.optimizer, self.p = optimizer, p
        # The configured rates, where the warm-up ends (like torch's schedulers' base_lrs): read before
        # anything changes them, which is why the schedule is made with the fresh optimizer.
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=p.mode, patience=p.patience,
                                                                   threshold=p.threshold, factor=p.factor)
                        if p.name == "plateau" else None)

    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.p.warmup_epochs

    def start_epoch(self, epoch: int) -> float:
        """Set the rate epoch `epoch` (0-based) trains with, during warm-up and at its end; return the rate.
        Later epochs keep what the optimizer holds: the plateau scheduler's rate (restored on resume)."""
        n, f = self.p.warmup_epochs, self.p.warmup_start_factor
        if n and epoch <= n:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * (f + (1 - f) * epoch / n)
        return self.optimizer.param_groups[0]["lr"]

    def end_epoch(self, epoch: int, val_accuracy: float, val_loss: float) -> None:
        """After validating epoch `epoch`: step the plateau scheduler on validation accuracy (mode max)
        or loss (mode min), unless the epoch was a warm-up epoch."""
        if self.plateau is not None and not self.in_warmup(epoch):
            self.plateau.step(val_accuracy if self.p.mode == "max" else val_loss)

    def state_dict(self) -> dict:
        """The plateau scheduler's state (ReduceLROnPlateau's own format, as in the course's checkpoint);
        {} with `none`. The warm-up needs none: it follows from the epoch."""
        return self.plateau.state_dict() if self.plateau is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.plateau is not None:
            self.plateau.load_state_dict(state)


def make_scheduler(optimizer: torch.optim.Optimizer, p: SchedulerParams) -> EpochSchedule:
    """The schedule of a freshly made optimizer (its rates are where the warm-up ends)."""
    return EpochSchedule(optimizer, p)
