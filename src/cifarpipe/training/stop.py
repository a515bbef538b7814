"""Stop requests: SIGINT/SIGTERM ask the training loop for a checkpoint at the next safe point."""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator


class StopRequest:
    """A signal handler: the first SIGINT/SIGTERM sets `requested` (the loop checkpoints and stops
    after the current batch); a second SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self, say: Callable[[str], None] | None = print) -> None:
        self.requested = False
        self.exit_code = 0
        self.say = say  # None: quiet (ranks other than 0: rank 0 says it once)

    def __call__(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        if self.say:
            self.say(f"{signal.Signals(signum).name}: saving a checkpoint after the current batch ...")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """This handler for SIGINT and SIGTERM inside the block; the previous handlers after it."""
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
