"""The optimizer and the learning-rate schedules: the course's per epoch (warm-up, plateau), and a per-step
schedule whose rates live on the device."""
from __future__ import annotations

import torch
from torch import nn

from cifarpipe.config import OptimizerParams, SchedulerParams


def param_groups(model: nn.Module, p: OptimizerParams) -> list:
    """What the optimizer trains: the model's trainable parameters as one group (the course's case), or,
    with bias_lr_factor != 1 or a whitening bias, named groups: "weights", "biases" (1-D parameters:
    lr x bias_lr_factor, weight decay / bias_lr_factor) and "whiten_bias" (its own row of rates, which
    stop after train.optimizer.whiten_bias_epochs). Frozen parameters (requires_grad False) are left out."""
    whiten_bias = getattr(getattr(model, "whiten", None), "bias", None)
    trainable = [(name, q) for name, q in model.named_parameters() if q.requires_grad]
    if p.bias_lr_factor == 1 and (whiten_bias is None or not whiten_bias.requires_grad):
        return [q for _, q in trainable]
    groups = {"weights": {"name": "weights", "params": []},
              "biases": {"name": "biases", "params": [], "lr": p.lr * p.bias_lr_factor,
                         "weight_decay": p.weight_decay / p.bias_lr_factor},
              "whiten_bias": {"name": "whiten_bias", "params": []}}
    for _, q in trainable:
        groups["whiten_bias" if q is whiten_bias else "biases" if q.ndim == 1 else "weights"]["params"].append(q)
    return [g for g in groups.values() if g["params"]]


def make_optimizer(model: nn.Module, p: OptimizerParams) -> torch.optim.Optimizer:
    """`p.name`'s optimizer over the model's parameters; the keys of the other optimizer are not used."""
    # fused: one kernel for all parameters instead of ~10 small ops per tensor; the same update.
    # Both Adam and SGD have it for CPU and CUDA; the unfused Adam.step takes 12 % of a course-CNN step on a 2-core CPU.
    # Fused, both also take the rate as a device tensor (StepRates) without reading it back to the host.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    groups = param_groups(model, p)
    if p.name == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                               weight_decay=p.weight_decay, fused=fused)
    return torch.optim.Adam(groups, lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay, fused=fused)


def linear_rates(optimizer: torch.optim.Optimizer, p: SchedulerParams, total_steps: int,
                 stops: dict[str, int] | None = None) -> torch.Tensor:
    """The per-step schedule `linear` as a table (groups x total_steps + 1, float64): row g, column t is
    group g's rate at step t (0-based). A linear warm-up over round(warmup_fraction x T) steps from
    lr x warmup_start_factor, then a straight line to lr x end_factor at the last step, T - 1.
    `stops` {group name: step}: that group's rate is 0 from that step on. Column T repeats T - 1."""
    t = torch.arange(total_steps + 1, dtype=torch.float64).clamp(max=total_steps - 1)
    warm = round(p.warmup_fraction * total_steps)
    rising = p.warmup_start_factor + (1 - p.warmup_start_factor) * t / max(warm, 1)
    falling = 1 + (p.end_factor - 1) * (t - warm) / max(total_steps - 1 - warm, 1)
    factor = torch.where(t < warm, rising, falling)
    rows = []
    for group in optimizer.param_groups:
        stop = (stops or {}).get(group.get("name"), total_steps + 1)
        # initial_lr (torch's schedulers' name for it): the configured rate, kept once the group holds a tensor
        rows.append(group.setdefault("initial_lr", float(group["lr"])) * factor * (t < stop))
    return torch.stack(rows)


class StepRates:
    """Per-step learning rates read on the device: before each optimizer step, `advance` copies column
    t of the table into the rate tensors the optimizer's groups hold, and counts t up, both device ops.
    So an eager step never waits for the host to set a rate, and a captured CUDA graph, which replays
    fixed pointers, sees each step's rate. The position t is the global step (checkpointed as such)."""

    def __init__(self, optimizer: torch.optim.Optimizer, table: torch.Tensor) -> None:
        device = optimizer.param_groups[0]["params"][0].device
        self.table = table.to(device, torch.float32)  # groups x (steps + 1)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.rates = self.table[:, :1].clone()  # groups x 1; group g's rate is the view rates[g, 0]
        self.attach(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the groups their rate tensors again: Optimizer.load_state_dict replaces them with the file's."""
        for g, group in enumerate(optimizer.param_groups):
            group["lr"] = self.rates[g, 0]

    def seek(self, step: int) -> None:
        self.position.fill_(step)

    def advance(self) -> None:
        torch.index_select(self.table, 1, self.position, out=self.rates)
        self.position += 1


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
