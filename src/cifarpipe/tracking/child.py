"""A stage's MLflow process: how a stage starts it, and how it dies with the stage.

`import mlflow` and opening the store are 2-3 s of Python import work on a 2-core CPU. Import
work holds the GIL, so in a thread of the stage it runs no faster than before the stage's own
work (measured: the same wall time); in a second process it runs on the other core while the
stage imports torch and loads its data. The train stage (tracking.job_process) and the evaluate
stage (tracking.delivery_process) each start one before they import torch.

The child's stdout and stderr are the stage's, so what MLflow and our tracking code print shows
as before; requests and answers travel on pipes of their own. The child never outlives the stage:
on Linux the kernel kills it when the stage dies (PR_SET_PDEATHSIG), also in the middle of a store
call; elsewhere its request pipe reaches end-of-file and it exits. It ignores SIGINT and SIGTERM:
a Ctrl-C or a `kill` of the process group is the stage's to handle, and the stage then tells the
child what to record (a run KILLED at its checkpoint).

This module imports no MLflow.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import cifarpipe

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def start(module: str, fds: tuple[int, ...], **popen: object) -> subprocess.Popen:
    """`python -m module <fds...> <this pid>` with this checkout's cifarpipe first on its path (an
    installed copy could differ), the fds passed on; they are closed here once the child has them."""
    env = dict(os.environ)
    package_root = str(Path(cifarpipe.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    try:
        return subprocess.Popen([sys.executable, "-m", module, *map(str, fds), str(os.getpid())], env=env,
                                pass_fds=fds, **popen)
    finally:
        for fd in fds:
            os.close(fd)


def how_it_ended(status: int) -> str:
    """A child's exit status in words, for the stage's message."""
    return (f"was killed by signal {-status}" if status < 0
            else f"failed with exit status {status} (its error is above)")


def become_child(stage_pid: int) -> None:
    """The child's first step: die when the stage that started it dies (Linux), exit now if it is
    gone already; leave SIGINT and SIGTERM to the stage."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != stage_pid:  # it died before the line above took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_now(code: int) -> None:
    """The child's last step: flush what it printed and exit without tearing down MLflow's modules
    (1-3 s, see pipeline.stage.run_stage)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
