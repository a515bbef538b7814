"""The training loop: one function trains one epoch, one evaluates. No file or MLflow I/O here.

Both keep their running sums on the device and read them back once, at the end: a `.item()`
per step would make the GPU wait for the host every step. The one exception is the course's
running loss, printed (and so read back) once every `log_every` batches.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cifarpipe.config import EarlyStoppingParams, ModelParams, TrainParams, UserError
from cifarpipe.training.distributed import Group
from cifarpipe.training.lookahead import Lookahead
from cifarpipe.training.models import build_model
from cifarpipe.training.optim import EpochSchedule, StepRates, linear_rates, make_optimizer, make_scheduler
from cifarpipe.training.step import GraphedStep, TrainStep

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EpochProgress:
    """Sums of a (possibly unfinished) training epoch; saved in a mid-epoch checkpoint."""
    step: int = 0  # optimizer steps done in this epoch
    loss_sum: float = 0.0  # sum over images of the plain cross-entropy (no label smoothing), as val_loss
    correct: int = 0
    seen: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray  # predicted class per image, in batch order
    confidences: np.ndarray | None = None  # softmax probability of each predicted class (evaluate(confidences=True))


def pick_device(name: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available (use 'auto')")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is 'mps' but MPS is not available (use 'auto')")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What runs record as their device: the GPU's model name, else 'cpu' / 'mps'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def make_deterministic() -> None:
    """The settings that make CUDA runs bitwise repeatable (slower: no autotuned kernels)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this for fixed reductions
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def amp_enabled(requested: bool, device: torch.device) -> bool:
    """bf16 autocast: CUDA only, and only on GPUs with native bf16 (Ampere or newer).

    `is_bf16_supported()` alone also says yes where bf16 is only emulated (V100, T4: slower than
    fp32 there), so emulation is excluded explicitly.
    """
    return requested and device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass
class TrainingSetup:
    model: nn.Module  # the module whose state_dict is saved
    step_model: nn.Module  # what the loop trains: `model`, or its DDP and/or torch.compile wrapper
    eval_model: nn.Module  # what validates: `step_model` in one process; `model` under DDP, whose
    # forward would otherwise broadcast BatchNorm buffers, a collective every rank must join
    optimizer: torch.optim.Optimizer  # Adam or SGD
    scheduler: EpochSchedule
    loss_fn: nn.Module
    amp: bool
    step: TrainStep | None = None  # what train_one_epoch calls per batch (with the per-step rates, Lookahead)
    init_seconds: float = 0.0  # set-up that counts as training: airnet's whitening from the training images


def build_training(model_params: ModelParams, p: TrainParams, device: torch.device, group: Group = Group(), *,
                   steps_per_epoch: int | None = None, init_images: torch.Tensor | None = None) -> TrainingSetup:
    """The course's recipe on `device`, seeded: the one setup the train stage and the benchmarks share.
    With a process `group`, the module is wrapped in DistributedDataParallel. `steps_per_epoch` is
    needed by the per-step schedule and Lookahead; `init_images` (normalised training images) by
    airnet's whitening layer, computed here, before the model is copied to other processes."""
    if p.deterministic:
        make_deterministic()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: autotuned kernels pay off after one batch
    torch.manual_seed(p.seed)
    model = build_model(model_params)
    init_seconds = 0.0  # no set-up counts as training unless the model has a whitening layer
    if hasattr(model, "init_whitening"):
        if init_images is None:
            raise ValueError(f"model {model_params.name} needs training images for its whitening layer")
        t0 = time.perf_counter()
        model.init_whitening(init_images)
        init_seconds = time.perf_counter() - t0
        model.whiten.bias.requires_grad_(p.optimizer.whiten_bias_epochs > 0)
    model = model.to(device)
    if p.channels_last and device.type in ("cuda", "cpu"):
        # The loader's batches are already NHWC in memory. Measured on a 2-core CPU: the course CNN
        # at batch 64 trains at ~10k img/s with NHWC weights vs ~7k img/s NCHW (oneDNN's
        # native layout); on CUDA it lets the convs use tensor cores without transposes.
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, p.optimizer)
    wrapped = group.wrap(model, device)
    step_model = torch.compile(wrapped) if p.compile else wrapped
    setup = TrainingSetup(model=model, step_model=step_model, eval_model=model if group.active else step_model,
                          optimizer=optimizer, scheduler=make_scheduler(optimizer, p.scheduler),
                          loss_fn=nn.CrossEntropyLoss(label_smoothing=p.label_smoothing), amp=amp_enabled(p.amp, device),
                          init_seconds=init_seconds)
    setup.step = make_step(setup, p, steps_per_epoch)
    return setup


def make_step(setup: TrainingSetup, p: TrainParams, steps_per_epoch: int | None) -> TrainStep:
    """The step of `p`: eager, or GraphedStep with train.cuda_graph; with per-step rates and Lookahead if set."""
    rates = lookahead = None
    per_step = p.scheduler.name == "linear" or p.lookahead.every
    if per_step and not steps_per_epoch:
        raise ValueError("the per-step schedule and Lookahead need steps_per_epoch")
    total = p.epochs * (steps_per_epoch or 0)
    if p.scheduler.name == "linear":
        stops = {"whiten_bias": p.optimizer.whiten_bias_epochs * steps_per_epoch}
        rates = StepRates(setup.optimizer, linear_rates(setup.optimizer, p.scheduler, total, stops))
    if p.lookahead.every:
        lookahead = Lookahead(setup.model, p.lookahead, total)
    kind = GraphedStep if p.cuda_graph else TrainStep
    return kind(setup.step_model, setup.optimizer, setup.loss_fn, amp=setup.amp, rates=rates, lookahead=lookahead,
                running_loss=p.log_every > 0)


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    *, progress: EpochProgress | None = None, amp: bool = False, log_every: int = 0,
                    log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None,
                    should_stop: Callable[[], bool] = lambda: False, step: TrainStep | None = None) -> EpochProgress:
    """Train over `batches`; continue the sums of `progress` if the epoch was interrupted before.

    Each batch is one call of `step` (step.py: zero_grad, forward, loss, backward, optimizer step and
    the metric sums, on the device; by default a plain TrainStep of `model`, `optimizer`, `loss_fn`).
    `on_step(step)` runs after every optimizer step (progress bar, fault injection);
    `should_stop()` is checked after every step: True ends the epoch early (a safe point).
    The sums are read back once, at the end; the running loss every `log_every` batches.
    """
    progress = progress or EpochProgress()
    step_fn = step or TrainStep(model, optimizer, loss_fn, amp=amp)
    step_fn.begin(progress.loss_sum, progress.correct)
    done, seen = progress.step, progress.seen
    model.train()
    for x, y in batches:
        step_fn(x, y)
        seen += len(y)
        done += 1
        if log_every and done % log_every == 0:
            log(f"  batch {done:5d}: running loss {step_fn.running.item() / log_every:.3f}")
            step_fn.running.zero_()
        if on_step:
            on_step(done)
        if should_stop():
            break
    return EpochProgress(done, step_fn.loss_sum.item(), int(step_fn.correct.item()), seen)


TTA_MODES = ("none", "flip", "flip_translate")


def views_for(model_tta: str, tta_flip: bool) -> str:
    """The views evaluation averages: the model's own (model.tta, in its weights file), else the
    mirror pair of evaluate.tta_flip (an evaluation setting for models without TTA), else none."""
    return model_tta if model_tta != "none" else "flip" if tta_flip else "none"


def eval_logits(model: nn.Module, x: torch.Tensor, *, amp: bool = False, tta: str = "none") -> torch.Tensor:
    """The model's fp32 logits for `x` (call under no_grad, model in eval mode), averaged over the
    test-time views of `tta` (flips and small shifts are label-preserving in CIFAR-10):
    none: x alone; flip: x and its mirror, 1/2 each; flip_translate: that pair at weight 1/2, and
    the pairs of x shifted by one pixel up-left and down-right (edge mirrored) at 1/4 each, 6 views."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")

    def pair(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
            flipped = model(images.flip(3)) if tta != "none" else None
        # fp32 from here: bf16 keeps 8 significant bits, so a flip average in bf16 rounds (1.0 +
        # 1.0078 is 2.0, a tie with 1.0 + 1.0) and argmax then takes the lower class index.
        logits = logits.float()
        return logits if flipped is None else (logits + flipped.float()) / 2

    if tta != "flip_translate":
        return pair(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = pair(padded[:, :, :32, :32]) + pair(padded[:, :, 2:, 2:])
    return pair(x) / 2 + shifted / 4


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, *, amp: bool = False, tta: str = "none",
             confidences: bool = False) -> EvalResult:
    """Mean cross-entropy and accuracy over `batches`, with the model in eval mode; with
    `confidences`, also each prediction's softmax probability (from the same logits)."""
    device = next(model.parameters()).device
    model.eval()
    loss_sum = torch.zeros((), device=device)
    preds, probs, n, correct = [], [], 0, torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches:
        logits = eval_logits(model, x, amp=amp, tta=tta)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        preds.append(pred)
        if confidences:
            probs.append(torch.softmax(logits, 1).gather(1, pred[:, None])[:, 0])
        n += len(y)
    predictions = torch.cat(preds).cpu().numpy() if preds else np.empty(0, np.int64)  # a rank may get no images
    conf = (torch.cat(probs).cpu().numpy() if probs else np.empty(0, np.float32)) if confidences else None
    return EvalResult(loss_sum.item() / max(n, 1), correct.item() / max(n, 1), predictions, conf)


# ---------------------------------------------------------------- the epoch loop
@dataclass
class TrainState:
    """Where a training stands, between epochs or inside one: what a checkpoint records of the loop."""
    epoch: int = 0  # epochs finished
    progress: EpochProgress = field(default_factory=EpochProgress)  # the unfinished epoch: its step and sums
    seconds: float = 0.0  # training time the unfinished epoch took before an interruption
    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics per finished epoch
    best_val_accuracy: float = -1.0
    # Early stopping's counter: epochs in a row since the last one that improved by more than
    # min_delta on the best of those improving epochs; True once it reached the patience.
    epochs_without_improvement: int = 0
    early_stopping_best: float = -1.0
    stopped_early: bool = False


class LoopHooks:
    """What `fit` calls out to. The train stage checkpoints, logs and shows progress here; the
    benchmark times. Each method does nothing by default."""

    def epoch_started(self, epoch: int, state: TrainState) -> None:
        """Before training epoch `epoch` (0-based); state.progress.step > 0 when it resumes mid-epoch."""

    def step_done(self, epoch: int, step: int) -> None:
        """After optimizer step `step` (1-based) of epoch `epoch`."""

    def stop_requested(self, inside_epoch: bool) -> bool:
        """Asked after every step (`inside_epoch`) and after every epoch: True stops the loop at that
        safe point."""
        return False

    def stopped_in_epoch(self, state: TrainState) -> None:
        """The loop stopped inside epoch state.epoch: state.progress has its step and (all processes') sums."""

    def validation_started(self, epoch: int) -> None:
        """The epoch's training is done; validation begins."""

    def epoch_finished(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        """Epoch row["epoch"] (1-based) is validated and the scheduler stepped; `state` is that epoch
        boundary (with state.stopped_early if early stopping ends training here) and `improved`
        says whether it has the best validation accuracy so far."""


# Under DDP the processes agree on stopping with a collective call, every this many steps: one
# call per step would make a GPU wait for the host every step (the loop reads the answer).
_STOP_CHECK_STEPS = 10


def count_for_early_stopping(state: TrainState, val_accuracy: float, rule: EarlyStoppingParams | None) -> None:
    """Lightning's EarlyStopping on validation accuracy (mode max): an epoch that beats the best
    improving epoch by more than rule.min_delta resets the counter, any other adds one; at
    rule.patience, state.stopped_early. rule None or patience 0: off, nothing counted."""
    if not rule or not rule.patience:
        return
    if val_accuracy > state.early_stopping_best + rule.min_delta:
        state.early_stopping_best, state.epochs_without_improvement = val_accuracy, 0
    else:
        state.epochs_without_improvement += 1
    state.stopped_early = state.epochs_without_improvement >= rule.patience


def stop_check(hooks: LoopHooks, group: Group, device: torch.device) -> Callable[[], bool]:
    """train_one_epoch's should_stop: asks hooks.stop_requested after every step; under DDP every
    _STOP_CHECK_STEPS steps, all processes together (a signal may reach only one)."""
    steps_seen = 0

    def should_stop() -> bool:
        nonlocal steps_seen
        steps_seen += 1
        if not group.active:
            return hooks.stop_requested(True)
        return steps_seen % _STOP_CHECK_STEPS == 0 and group.any(hooks.stop_requested(True), device)
    return should_stop


def validate(setup: TrainingSetup, batches: Batches, group: Group, device: torch.device) -> EvalResult:
    """Loss and accuracy on the validation set; under DDP each process evaluates its part and the
    sums are added up, so every rank gets the whole set's figures."""
    group.sync_buffers(setup.model)
    val = evaluate(setup.eval_model, batches, amp=setup.amp)
    if group.active:
        n = len(val.predictions)
        loss_sum, correct, n = group.sum([val.loss * n, val.accuracy * n, n], device)
        val = EvalResult(loss_sum / n, round(correct) / n, val.predictions)
    return val


def fit(setup: TrainingSetup, state: TrainState, epochs: int, train_batches: Callable[[int, int], Batches],
        val_batches: Callable[[], Batches], steps_per_epoch: int, hooks: LoopHooks, *, group: Group = Group(),
        log_every: int = 0, log: Callable[[str], None] = print, early_stopping: EarlyStoppingParams | None = None
        ) -> bool:
    """Train from `state` to `epochs` epochs, or until `early_stopping` ends it (its counter is part
    of `state`, so a resumed training stops where an uninterrupted one would): per epoch
    train_one_epoch, validate, step the scheduler.

    `train_batches(epoch, start_step)` gives this process's batches of an epoch from a step on;
    `val_batches()` this process's validation batches. Under DDP the sums of every process are
    added up, so every rank sees the metrics of the whole batch. Returns True when all epochs are
    done or early stopping ended training, False when `hooks.stop_requested()` stopped it (after
    hooks.stopped_in_epoch inside an epoch, or at an epoch boundary). `state` is updated in place.
    """
    device = next(setup.model.parameters()).device
    should_stop = stop_check(hooks, group, device)
    if state.stopped_early:  # early stopping ended this training: it is finished
        return True
    for epoch in range(state.epoch, epochs):
        setup.scheduler.start_epoch(epoch)  # the warm-up's rate; a function of the epoch, so exact on resume
        hooks.epoch_started(epoch, state)
        # Every process continues the step; the sums so far (all processes') continue on rank 0 only.
        done = state.progress if group.is_main else EpochProgress(step=state.progress.step)
        t0 = time.perf_counter()
        done = train_one_epoch(setup.step_model, train_batches(epoch, done.step), setup.optimizer, setup.loss_fn,
                               progress=done, amp=setup.amp, log_every=log_every, log=log,
                               on_step=lambda step: hooks.step_done(epoch, step), should_stop=should_stop,
                               step=setup.step)
        seconds = state.seconds + time.perf_counter() - t0
        if group.active:
            loss_sum, correct, seen = group.sum([done.loss_sum, done.correct, done.seen], device)
            done = EpochProgress(done.step, loss_sum, int(correct), int(seen))
        if done.step < steps_per_epoch:  # stopped at a safe point inside the epoch
            state.progress, state.seconds = done, seconds
            hooks.stopped_in_epoch(state)
            return False

        hooks.validation_started(epoch)
        val = validate(setup, val_batches(), group, device)
        lr = float(setup.optimizer.param_groups[0]["lr"])  # the rate this epoch trained with (per-step: its last)
        setup.scheduler.end_epoch(epoch, val.accuracy, val.loss)  # the plateau scheduler, after warm-up
        row = {"epoch": epoch + 1, "train_loss": done.loss, "train_accuracy": done.accuracy,
               "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": lr, "epoch_seconds": seconds,
               "images_per_second": done.seen / seconds}
        improved = val.accuracy > state.best_val_accuracy
        state.history.append(row)
        state.epoch, state.progress, state.seconds = epoch + 1, EpochProgress(), 0.0
        state.best_val_accuracy = max(state.best_val_accuracy, val.accuracy)
        count_for_early_stopping(state, val.accuracy, early_stopping)  # the same sums on every rank: the same answer
        hooks.epoch_finished(state, row, improved)
        if group.any(hooks.stop_requested(False), device):
            return False
        if state.stopped_early:
            break
    return True
