"""The training step: one optimizer step on a batch, with the epoch's metric sums kept on the device.

`TrainStep` is what `engine.train_one_epoch` calls for every batch: zero the gradients, forward,
loss, backward, (per-step rates,) optimizer step, (Lookahead,) metric sums. Nothing in it reads a
value back to the host: the rates and the step position are device tensors (optim.StepRates), the
sums are device tensors the loop reads once per epoch. `GraphedStep` runs the same step from fixed
input buffers, the form a CUDA graph needs: on CUDA it captures the step once and replays it (one
launch instead of ~100 host-side op launches per step); on other devices it calls the same code,
which is what the CPU tests compare with the eager step, bit for bit.

`warm_up` runs a few steps and then puts back every tensor they changed, so cuDNN's autotuning,
CUDA's lazy start-up and the graph's capture happen before the timed epochs and change nothing.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from cifarpipe.training.lookahead import Lookahead
from cifarpipe.training.optim import StepRates


class TrainStep:
    """One optimizer step per call; `global_step` (host) counts the steps of the whole training."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *, amp: bool = False,
                 rates: StepRates | None = None, lookahead: Lookahead | None = None, running_loss: bool = True) -> None:
        self.model, self.optimizer, self.loss_fn, self.amp = model, optimizer, loss_fn, amp
        self.rates, self.lookahead = rates, lookahead
        self.running_loss = running_loss  # False (train.log_every 0): one kernel less per step
        self.device = next(model.parameters()).device
        self.loss_sum = torch.zeros((), device=self.device)  # plain cross-entropy x images, this epoch
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.running = torch.zeros((), device=self.device)  # the course's running loss, between prints
        self.global_step = 0

    def begin(self, loss_sum: float, correct: int) -> None:
        """Start (or continue, after a resume) an epoch's sums; the rates continue at global_step."""
        self.loss_sum.fill_(loss_sum)
        self.correct.fill_(correct)
        self.running.zero_()
        if self.rates:
            self.rates.seek(self.global_step)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward_update(x, y)
        self.after_update()

    def forward_backward_update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The device work of a step (what a CUDA graph captures). The step minimizes `loss_fn` (with
        label smoothing if configured); the summed loss is the plain cross-entropy of the same logits,
        the definition validation uses, so train and validation losses are comparable on one chart."""
        # cache_enabled=False: a captured graph must not keep autocast's cast weights from capture
        # time; each weight is cast once per forward anyway, so eager steps compute the same.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
        loss.backward()
        if self.rates:
            self.rates.advance()
        self.optimizer.step()
        logits = logits.detach().float()
        plain_ce = F.cross_entropy(logits, y)  # 10 classes: a tiny extra op
        self.loss_sum += plain_ce * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        if self.running_loss:
            self.running += plain_ce

    def after_update(self) -> None:
        self.global_step += 1
        if self.lookahead and self.lookahead.due(self.global_step):
            self.lookahead.update(self.global_step)


class GraphedStep(TrainStep):
    """The step from fixed input buffers: each call copies the batch in and replays the captured graph
    (CUDA), or runs forward_backward_update on the buffers (elsewhere). The Lookahead update, every few
    steps, stays outside the graph: four multi-tensor ops, no host round-trip either."""

    x: torch.Tensor | None = None  # the input buffers, shaped (and strided) as the batches: set by `capture`
    y: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Make the buffers from a batch, then record the step on CUDA (after warm_up: optimizer state
        exists, kernels are tuned). Gradients are dropped first, so backward writes them afresh from
        inside the graph on every replay."""
        self.x, self.y = x.clone(), y.clone()
        if self.device.type != "cuda":
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.forward_backward_update(self.x, self.y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.x is None:
            raise RuntimeError("GraphedStep.capture (through warm_up) must run before the first step")
        self.x.copy_(x)
        self.y.copy_(y)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.forward_backward_update(self.x, self.y)
        self.after_update()


def _snapshot(step: TrainStep) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Every tensor a training step changes: weights and buffers, Lookahead's slow weights, the rates
    and their position, the sums; and the optimizer's state per parameter."""
    tensors = [t.data for t in step.model.state_dict(keep_vars=True).values()]
    if step.lookahead:
        tensors += step.lookahead.slow
    if step.rates:
        tensors += [step.rates.rates, step.rates.position]
    tensors += [step.loss_sum, step.correct, step.running]
    optimizer_state = {id(p): {k: v for k, v in state.items() if torch.is_tensor(v)}
                       for p, state in step.optimizer.state.items()}
    return tensors, optimizer_state


@torch.no_grad()
def warm_up(step: TrainStep, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Run `steps` steps on (x, y) (on a side stream on CUDA, as capture requires), with a Lookahead
    update among them, then put back every tensor they changed, in place; a GraphedStep then captures.
    What remains: tuned kernels, CUDA's context, allocated memory, and optimizer state the steps
    created, as zeros, which the next step treats exactly as absent state (momentum x 0 + g = g; Adam's
    moments and step count start at 0)."""
    if steps < 1:
        return
    tensors, optimizer_state = _snapshot(step)
    saved = [t.clone() for t in tensors]
    saved_state = {i: {k: v.clone() for k, v in state.items()} for i, state in optimizer_state.items()}
    stream = torch.cuda.Stream() if step.device.type == "cuda" else None
    if stream:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if stream else contextlib.nullcontext(), torch.enable_grad():
        for _ in range(steps):
            step.optimizer.zero_grad(set_to_none=True)
            step.forward_backward_update(x, y)
        if step.lookahead:
            step.lookahead.update(step.global_step)
    if stream:
        torch.cuda.current_stream().wait_stream(stream)
    torch._foreach_copy_(tensors, saved)
    for i, state in _snapshot(step)[1].items():
        for key, value in state.items():
            if i in saved_state:
                value.copy_(saved_state[i][key])
            else:
                value.zero_()
    step.optimizer.zero_grad(set_to_none=True)
    if isinstance(step, GraphedStep):
        step.capture(x, y)
