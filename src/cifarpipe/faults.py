"""Deterministic fault injection, for the tests that prove training survives SIGKILL.

Set CIFARPIPE_FAULT=<point>:<epoch>[:<step>[:<signal>]] and the training process sends itself
SIGKILL (no cleanup, no atexit: exactly like `kill -9` or a pre-empted machine) when it reaches
that point; a signal name such as INT or TERM sends that signal instead. Points: `step` (after optimizer step <step> of epoch <epoch>, 1-based),
`validation` (in the middle of validating epoch <epoch>), `checkpoint_write` (checkpoint
bytes written to the temporary file, not yet renamed), `after_checkpoint` (checkpoint of
<epoch> in place, before anything else), `evaluate` (epoch 0: evaluate's outputs partly written),
`delivery` (epoch 0: evaluate's delivery process, the evaluation journaled, nothing delivered),
`mlflow_process` (train's MLflow process, as epoch <epoch>'s metrics reach it). Unset (the normal
case), it does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "CIFARPIPE_FAULT"


def hit(point: str, epoch: int, step: int = 0) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, at_epoch, *rest = spec.split(":")
    at_step = int(rest[0]) if rest and rest[0] else None
    sig = signal.Signals[f"SIG{rest[1]}"] if len(rest) > 1 else signal.SIGKILL
    if name == point and int(at_epoch) == epoch and at_step in (None, step):
        os.kill(os.getpid(), sig)
