"""Deterministic fault injection, for the tests that prove training survives SIGKILL.

Set CIFARPIPE_FAULT=<point>:<epoch>[:<step>] and the training process kills itself with
SIGKILL (no cleanup, no atexit: exactly like `kill -9` or a pre-empted machine) when it reaches
that point. Points: `step` (after optimizer step <step> of epoch <epoch>, 1-based),
`validation` (in the middle of validating epoch <epoch>), `checkpoint_write` (checkpoint
bytes written to the temporary file, not yet renamed), `after_checkpoint` (checkpoint of
<epoch> in place, before anything else). Unset (the normal case), it does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "CIFARPIPE_FAULT"


def hit(point: str, epoch: int, step: int = 0) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, at_epoch, *at_step = spec.split(":")
    if name == point and int(at_epoch) == epoch and (not at_step or int(at_step[0]) == step):
        os.kill(os.getpid(), signal.SIGKILL)
