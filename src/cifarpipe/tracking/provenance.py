"""Where and from what a run was trained: git state, installed packages, machine, workspace."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from cifarpipe.workspace import experiment_name, in_temporary_copy, repository_root

# Files DVC itself writes while it runs the pipeline (besides each stage's outputs, read from
# dvc.yaml): dvc.lock, and params.yaml, where `dvc exp run -S` writes its overrides before training.
_DVC_WRITTEN = ("params.yaml", "dvc.lock")
_TAG_FILES_MAX = 1000  # characters of the git_dirty_files tag (MLflow allows 8000 per tag value)


def _changed_files() -> list[str] | None:
    """Tracked files whose content differs from HEAD, staged or not (paths from the repository
    root); None without git or without a commit. Untracked files are not listed: no committed code
    imports them, and DVC's untracked outputs are none of the run's code."""
    try:
        out = subprocess.run(["git", "diff", "HEAD", "--name-only", "--no-renames", "-z"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [f for f in out.split("\0") if f]


def _dvc_written(path: str, dvc_yaml: Path = Path("dvc.yaml")) -> bool:
    """Whether DVC writes `path` itself: dvc.lock, a params file of a stage (params.yaml holds the
    `-S` overrides), a stage's output (outs, metrics, plots: the cache: false ones are tracked by
    git, e.g. outputs/metrics.json), or a .gitignore (DVC lists its cached outputs there). A change
    to any other tracked file is a change of the code."""
    if path in _DVC_WRITTEN or Path(path).name == ".gitignore":
        return True
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    for stage in stages.values():
        if not isinstance(stage, dict):
            continue
        for key in ("outs", "metrics", "plots", "params"):
            for item in stage.get(key) or []:
                # outs: "path" or {path: {cache: false}}; params: "key" (of params.yaml) or {file: [keys]}
                names = list(item) if isinstance(item, dict) else ([] if key == "params" else [str(item)])
                if any(path == n.rstrip("/") or path.startswith(n.rstrip("/") + "/") for n in names):
                    return True
    return False


def _file_list(files: list[str], max_len: int = _TAG_FILES_MAX) -> str:
    """'a.py, b.py ... (+3 more)': comma-separated, cut to fit an MLflow tag."""
    text = ""
    for i, f in enumerate(files):
        more = f" ... (+{len(files) - i} more)"
        item = f"{', ' if text else ''}{f}"
        if len(text) + len(item) + (len(more) if i < len(files) - 1 else 0) > max_len:
            return text + more
        text += item
    return text


@dataclass(frozen=True)
class GitState:
    """The commit and what differed from it when the run started (read once per run: see read_git_state)."""
    commit: str | None  # None: no git, or no commit
    changed: tuple[str, ...] = ()  # tracked files that differ from the commit, staged or not
    code: tuple[str, ...] = ()  # of those, the ones DVC does not write itself: code changes
    diff_sha256: str | None = None  # 12 hex digits of `git diff HEAD` of the code files

    def tags(self) -> dict[str, str]:
        """As run tags. git_dirty: any tracked file changed (every `dvc exp run` run: its overrides
        are in params.yaml); git_dirty_files: which ones; git_dirty_code: whether any of them is
        code, and git_dirty_code_files which. A run with git_dirty_code false is described fully by
        its commit and its logged params, and `cifarpipe-reproduce` reruns it. git_diff_sha256 tells
        one code change from another."""
        if self.commit is None:
            return {"mlflow.source.git.commit": "unknown", "git_dirty": "unknown", "git_dirty_code": "unknown"}
        tags = {"mlflow.source.git.commit": self.commit, "git_dirty": str(bool(self.changed)).lower(),
                "git_dirty_code": str(bool(self.code)).lower()}
        if self.changed:
            tags["git_dirty_files"] = _file_list(list(self.changed))
        if self.code:
            tags["git_dirty_code_files"] = _file_list(list(self.code))
        if self.diff_sha256:
            tags["git_diff_sha256"] = self.diff_sha256
        return tags


def read_git_state() -> GitState:
    """The working directory's git state: two or three git commands, run once per training run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return GitState(None)
    changed = _changed_files()
    if changed is None:
        return GitState(None)
    code = [f for f in changed if not _dvc_written(f)]
    diff_sha = None
    if code:
        try:
            diff = subprocess.run(["git", "diff", "HEAD", "--no-renames", "--binary", "--",
                                   *(f":(literal){f}" for f in code)], capture_output=True, check=True, timeout=60).stdout
            diff_sha = hashlib.sha256(diff).hexdigest()[:12]
        except (OSError, subprocess.SubprocessError):
            pass
    return GitState(commit, tuple(changed), tuple(code), diff_sha)


@functools.cache  # the installed packages do not change while a stage runs; reading them takes 0.3 s (2 cores)
def requirements_text() -> str:
    """`name==version` of every installed distribution: what reproduces the environment."""
    pkgs = {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()}
    return "".join(f"{n}=={v}\n" for n, v in sorted(pkgs.items()) if n)


def environment_tags(device_name: str) -> dict[str, str]:
    import torch

    # str(): torch.__version__ is a TorchVersion; pickled for train's MLflow process, it made that process import torch
    return {"device": device_name, "python": platform.python_version(), "torch": str(torch.__version__),
            "cuda": str(torch.version.cuda or "none"), "host_platform": platform.platform()}


def workspace_tags() -> dict[str, str]:
    """Which copy of the project a run trains in: tags a run at creation, so a run whose process
    was killed before its first checkpoint can be found again (see the train stage). The key is a
    hash, safe in a search filter whatever characters the folder's path has. A DVC experiment in
    a temporary copy is its repository plus its name: each run of that name (a killed one queued
    again) gets a new copy, and must find the run its killed predecessor left."""
    where = f"{platform.node()}:{Path.cwd().resolve()}"
    if in_temporary_copy():
        where = f"{platform.node()}:{repository_root()} (dvc exp {experiment_name() or Path.cwd().name})"
    return {"workspace": where, "workspace_key": hashlib.sha256(where.encode()).hexdigest()[:16]}

