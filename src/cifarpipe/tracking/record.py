"""The run's record: what makes a run findable and explainable in MLflow's own UI (its name,
Source, Created by, Description) and ties it to its DVC experiment, each set the way MLflow itself
sets it, so the UI's columns and filters fill themselves."""
from __future__ import annotations

import getpass
import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

from cifarpipe.config import Params, UserError, flatten, flatten_mapping, read_yaml_text
from cifarpipe.tracking.provenance import GitState

_RUN_NAME_MAX = 60  # characters: what the runs table shows without cutting


@dataclass(frozen=True)
class RunRecord:
    """The name and tags that tie a run to its DVC experiment and say how to reproduce it."""
    name: str
    tags: dict[str, str]


def dvc_experiment() -> tuple[str | None, str | None]:
    """(experiment name, baseline commit) that `dvc exp run` passes to its stages, queued or not,
    named with -n or not (DVC 3.67 sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV; `dvc repro` sets neither)."""
    return os.environ.get("DVC_EXP_NAME") or None, os.environ.get("DVC_EXP_BASELINE_REV") or None


def baseline_params(ref: str = "HEAD", path: str = "params.yaml") -> dict[str, Any] | None:
    """params.yaml as committed at `ref`, flattened to dotted keys; None when git can't give it.
    Under `dvc exp run` (workspace or queued) HEAD is the experiment's baseline commit. Not
    validated: a commit from before a schema change still gives the keys both versions have."""
    try:
        text = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True, check=True,
                              timeout=30).stdout
        raw = read_yaml_text(text, f"{ref}:{path}")
    except (OSError, subprocess.SubprocessError, UserError):
        return None  # no git, no commit: no diff rather than a wrong one
    return flatten_mapping(raw) if isinstance(raw, dict) else None


def changed_params(flat: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """The params whose value differs from `baseline` (keys in both), in params.yaml's order."""
    if not baseline:
        return {}
    return {k: v for k, v in flat.items() if k in baseline and baseline[k] != v}


def _value_text(value: Any) -> str:
    """A value as `dvc exp run -S` and params.yaml spell it: 0.003, true, [0.9,0.99]."""
    if isinstance(value, (bool, list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, longer only where two keys would read the same."""
    out = {}
    for key in keys:
        parts = key.split(".")
        n = 1
        while n < len(parts) and any(o != key and o.split(".")[-n:] == parts[-n:] for o in keys):
            n += 1
        out[key] = ".".join(parts[-n:])
    return out


def descriptive_name(model: str, changed: dict[str, Any], max_len: int = _RUN_NAME_MAX) -> str:
    """'course_cnn lr=0.003 batch_size=128': the model and the params that differ from the commit;
    params that don't fit in `max_len` characters are counted ('+2')."""
    shown = {k: v for k, v in changed.items() if k != "model.name"}
    short = _short_keys(list(shown))
    name = model
    items = [f"{short[k]}={_value_text(v)}" for k, v in shown.items()]
    for i, item in enumerate(items):
        rest = len(items) - i - 1
        if len(f"{name} {item}") + (len(f" +{rest}") if rest else 0) > max_len:
            return f"{name} +{len(items) - i}"
        name = f"{name} {item}"
    return name


def reproduce_note(commit: str, experiment: str | None, changed: dict[str, Any], dirty_files: list[str]) -> str:
    """The run's description (Markdown): the commands that reproduce it."""
    sets = " ".join(f"-S {shlex.quote(f'{k}={_value_text(v)}')}" for k, v in changed.items())
    lines = []
    if commit == "unknown":  # no git where it ran (a copied folder, a GPU machine without git)
        return ("Trained outside a git checkout, so no commit records its code. To reproduce it, write this "
                "run's params (Parameters below) into params.yaml of the project at the same code and run "
                "`dvc repro`.\n")
    if experiment:
        lines += [f"DVC experiment **{experiment}**, baseline commit `{commit[:12]}`. Reproduce it:", "",
                  "```", f"git checkout {commit}", f"dvc exp run {sets}".rstrip(), "```", "",
                  "or, where the experiment itself is at hand (`dvc exp pull` from the DVC remote):", "",
                  "```", f"dvc exp apply {experiment}", "dvc repro", "```"]
    else:
        run = f"dvc exp run {sets}" if sets else "dvc repro"
        lines += [f"Trained at commit `{commit[:12]}`" + (" with these params changed in params.yaml" if sets else "")
                  + ". Reproduce it:", "", "```", f"git checkout {commit}", run, "```"]
    if dirty_files:
        lines += ["", "Uncommitted code changes when it ran (not in the commit above, so these commands do not "
                  "reproduce it exactly): " + ", ".join(f"`{f}`" for f in dirty_files[:10])
                  + (" ..." if len(dirty_files) > 10 else "")]
    else:  # commit + logged params describe it fully (uncommitted params.yaml changes are in the params)
        lines += ["", "Rerun it in a fresh git worktree and compare the metrics: `cifarpipe-reproduce <this run's id>`"]
    return "\n".join(lines) + "\n"


def run_record(params: Params, git: GitState, script: str = "stages/train.py") -> RunRecord:
    """Run name and tags: under `dvc exp run` the experiment's name, else the model and the params
    that differ from params.yaml at HEAD; MLflow's source/user tags; the reproduce commands."""
    experiment, baseline_rev = dvc_experiment()
    changed = changed_params(flatten(params), baseline_params())
    name = experiment or descriptive_name(params.model.name, changed)
    commit = baseline_rev or git.commit or "unknown"
    source = "dvc exp run" if experiment else ("dvc repro" if os.environ.get("DVC_STAGE") else script)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    tags = {MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: user,
            MLFLOW_RUN_NOTE: reproduce_note(commit, experiment, changed, list(git.code))}
    if experiment:
        tags["dvc_experiment"] = experiment
    if baseline_rev:
        tags["dvc_baseline_rev"] = baseline_rev
    return RunRecord(name, tags)


def log_record(client: MlflowClient, run_id: str, record: RunRecord) -> None:
    """Name and tags on a new run, or on the run `mlflow run .` created (its random name becomes the
    experiment's; the source and user tags MLflow set there are kept)."""
    existing = client.get_run(run_id).data.tags
    keep = (MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER)
    tags = {k: v for k, v in record.tags.items() if not (k in keep and existing.get(k))}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if existing.get(MLFLOW_RUN_NAME) != record.name:
        client.update_run(run_id, name=record.name)

