"""Which repository a stage belongs to, also when DVC runs it in a temporary copy.

`dvc exp run --queue` (then `dvc queue start`) and `dvc exp run --temp` run the stages in a
temporary copy, <repo>/.dvc/tmp/exps/tmpXXXX/, which DVC deletes when the experiment ends, also
when it was killed: whatever must outlive a killed experiment (the MLflow store, the checkpoints,
the journal of pending deliveries) lives in the original repository instead.

DVC 3.x passes the original repository's root to the stages as DVC_ROOT (checked with dvc 3.67.1:
the queue stores it with the experiment, dvc/repo/experiments/queue/base.py; the stage's cwd is
the temporary copy and DVC_EXP_NAME / DVC_EXP_BASELINE_REV are set too); `dvc repro` sets
DVC_ROOT to the repository root, which is then the working directory. Without a usable DVC_ROOT
(a stage script run by hand, an older DVC) a working directory inside <repo>/.dvc/tmp/exps/ still
means <repo>; anything else is the working directory.
"""
from __future__ import annotations

import os
from pathlib import Path


def repository_root() -> Path:
    """The repository the stage belongs to: the original one when the working directory is DVC's
    temporary copy of it, else the working directory."""
    root = os.environ.get("DVC_ROOT")
    if root and Path(root, ".dvc").is_dir():
        return Path(root).resolve()
    cwd = Path.cwd().resolve()
    for i in range(len(cwd.parts) - 3):
        if cwd.parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*cwd.parts[:i])
    return cwd


def in_temporary_copy() -> bool:
    """Whether the working directory is DVC's temporary copy of another repository."""
    return repository_root() != Path.cwd().resolve()


def beside_repository(path: str | Path) -> Path:
    """`path` (relative to the working directory) in the original repository when the stage runs
    in DVC's temporary copy, so it outlives the copy; unchanged otherwise, and when absolute."""
    path = Path(path)
    if path.is_absolute() or not in_temporary_copy():
        return path
    return repository_root() / path


def experiment_name() -> str | None:
    """The DVC experiment being run (DVC_EXP_NAME), or None outside `dvc exp run`."""
    return os.environ.get("DVC_EXP_NAME") or None


def safe_name(name: str, empty: str = "unnamed") -> str:
    """`name` as a file-name part: letters, digits, '-', '_' and '.' kept, anything else '-';
    `empty` when nothing is left."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or empty
