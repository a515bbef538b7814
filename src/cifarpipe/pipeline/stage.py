"""What every stage script shares: argument parsing of paths and clean exits on user errors."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from cifarpipe.config import UserError


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return p


def run_stage(main: Callable[[], int | None]) -> None:
    """Run a stage's (or command's) main(); a UserError prints one clear message (no traceback) and
    exits 2. The exit skips the interpreter's teardown of its modules: for a process that imported
    torch and MLflow it took 1-3 s of wall time on a 2-core CPU, and everything the stage wrote is
    complete by then (written atomically, MLflow answered synchronously, no thread of ours still
    running). An exception other than UserError takes Python's normal way out, traceback included."""
    try:
        code = main() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
