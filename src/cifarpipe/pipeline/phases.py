"""Where a stage's wall seconds go: a lap timer of named phases.

The first phase, `start`, runs from the moment the process started (the interpreter, then the
imports) to the timer's creation; each `lap(name)` closes the phase that ran since the previous
lap. The stage prints one line at its end (CIFARPIPE_TIMINGS=1: one line per phase) and logs the
phases to its MLflow run as metrics `seconds/<stage>/<phase>`. Work done in a background thread
is timed on its own (`background`) and reported beside the laps, not added to them.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TIMINGS_ENV = "CIFARPIPE_TIMINGS"


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere), 10 ms resolution."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class Phases:
    """Laps of one stage: {phase: seconds}, in the order they ran."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        now = time.perf_counter()
        self.seconds: dict[str, float] = {"start": process_age()}
        self.background: dict[str, float] = {}  # overlapped with the laps: not part of their sum
        self._last = now

    def lap(self, name: str) -> float:
        """Close the phase `name` (the time since the previous lap); a repeated name adds up."""
        now = time.perf_counter()
        seconds = now - self._last
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self._last = now
        return seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def metrics(self) -> dict[str, float]:
        """The laps (and background timings) as MLflow metric names and values."""
        out = {f"seconds/{self.stage}/{_key(k)}": round(v, 3) for k, v in self.seconds.items()}
        out.update({f"seconds/{self.stage}/background_{_key(k)}": round(v, 3) for k, v in self.background.items()})
        return out

    def report(self, exclude: str = "") -> str:
        """One line (or, with CIFARPIPE_TIMINGS=1, a line per phase) for the end of the stage.
        `exclude`: a phase that is not finished yet and is not shown."""
        laps = {k: v for k, v in self.seconds.items() if k != exclude}
        total = sum(laps.values())
        if os.environ.get(TIMINGS_ENV) == "1":
            width = max(map(len, [*laps, *self.background]))
            lines = [f"{self.stage} stage phases (wall seconds, from the process start):"]
            lines += [f"  {k:<{width}} {v:7.2f}  {v / max(total, 1e-9):4.0%}" for k, v in laps.items()]
            lines += [f"  {k:<{width}} {v:7.2f}  (in the background)" for k, v in self.background.items()]
            return "\n".join(lines + [f"  {'total':<{width}} {total:7.2f}"])
        parts = " + ".join(f"{k} {v:.1f}" for k, v in laps.items())
        bg = "".join(f"; {k} {v:.1f} in the background" for k, v in self.background.items())
        return f"{self.stage} stage: {total:.1f} s = {parts}{bg} ({TIMINGS_ENV}=1: one line per phase)"


def timed(fn: Callable[[], T], into: dict[str, float], name: str) -> T:
    """fn(), its wall seconds stored as into[name] (for work in a background thread)."""
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        into[name] = time.perf_counter() - t0


def _key(name: str) -> str:
    return name.replace(" ", "_")
