"""What every stage script shares: argument parsing of paths and clean exits on user errors."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cifarpipe.config import UserError


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return p


def run_stage(main: Callable[[], int | None]) -> None:
    """Run a stage's main(); a UserError prints one clear message (no traceback) and exits 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
