"""Everything MLflow: one run per training job, resumed as the same run, logged without stalling.

Store: whatever MLflow resolves (MLFLOW_TRACKING_URI, else MLflow 3's default `sqlite:///mlflow.db`
in the working directory, which `mlflow ui` started in the repo root shows with no arguments), with
one exception: a stage that DVC runs in a temporary copy of the repository (`dvc exp run --queue` /
`--temp`) uses the original repository's ./mlflow.db and ./mlruns/, never the copy's (see store_root).

Metrics are logged from a background thread once per epoch. If the store goes away mid-run,
training goes on: the values stay queued and are sent with the next epoch's batch; whatever is
still unsent at the end goes into the pending-deliveries journal (below), with a message.
Because the checkpoint's history is the source of truth, a resumed job re-sends exactly the
(metric, epoch) pairs the run lacks: no duplicates, no gaps.

Pending deliveries: what a stage could not deliver to the store (metric values, artifact files, the
model to log from the weights file, a terminal status, a run to mark KILLED, an evaluation) is kept
in one atomic JSON file, `mlflow_pending.json` beside the run-id file (outputs/), and delivered by
the next stage that reaches the store: train at its start and end, evaluate at its start. Each
delivery is idempotent (metrics already in the run, a model the run already has, are skipped), so
an item whose answer was lost is redelivered safely. Only a definite "no such run" from the store
means a run is gone; any other error (a 5xx, a timeout) is an outage, never a reason to start a
new run.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import getpass
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, LoggedModelStatus, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (MLFLOW_DATASET_CONTEXT, MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE,
                                      MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER)

from cifarpipe import atomic
from cifarpipe.config import Params, UserError, flatten, read_yaml_text

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                 "images_per_second")
_MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
# While training, a remote store that stops answering must cost seconds, not MLflow's default
# 7 retries x 120 s per call: 2 retries, 20 s each. A user's own settings win.
_TRAINING_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_DRAIN_WAIT_S = 120.0  # at most this long for queued logging at the end, then fall back to the journal
PENDING_NAME = "mlflow_pending.json"
EVALUATION_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent


_REBASED_URI: str | None = None  # set when tracking_uri() moved the default store out of a DVC temp copy


def store_root() -> Path:
    """The folder whose ./mlflow.db is the default store: the repository the stage belongs to.

    `dvc exp run --queue` (then `dvc queue start`) and `dvc exp run --temp` run the stages in a
    temporary copy, <repo>/.dvc/tmp/exps/tmpXXXX/, deleted when the experiment ends: a store there is
    lost. DVC 3.x passes the original repository's root to the stages as DVC_ROOT (checked with
    dvc 3.67.1: the queue stores it with the experiment, dvc/repo/experiments/queue/base.py; the
    stage's cwd is the temporary copy and DVC_EXP_NAME / DVC_EXP_BASELINE_REV are set too);
    `dvc repro` sets DVC_ROOT to the repository root, which is then the working directory. Without
    a usable DVC_ROOT (a stage script run by hand, an older DVC) a working directory inside
    <repo>/.dvc/tmp/exps/ still means <repo>; anything else is the working directory, as in MLflow.
    """
    root = os.environ.get("DVC_ROOT")
    if root and Path(root, ".dvc").is_dir():
        return Path(root).resolve()
    cwd = Path.cwd().resolve()
    for i in range(len(cwd.parts) - 3):
        if cwd.parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*cwd.parts[:i])
    return cwd


def tracking_uri() -> str:
    """The store: the user's (MLFLOW_TRACKING_URI, mlflow.set_tracking_uri) if set, else MLflow's
    default, `sqlite:///mlflow.db`, taken in store_root() instead of the working directory."""
    global _REBASED_URI
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    uri = mlflow.get_tracking_uri()
    if is_tracking_uri_set() or not uri.startswith("sqlite:///"):
        return uri
    root = store_root()
    if root == Path.cwd().resolve():
        return uri
    # Exported, not only returned: MLflow's fluent API (the model logging's start_run) and any
    # process MLflow starts resolve the store themselves and must reach the same one.
    _REBASED_URI = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = _REBASED_URI
    return _REBASED_URI


def _artifact_location(client: MlflowClient, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: MLflow's default (./mlruns/<id> of the working
    directory, resolved when the store is opened) except in a DVC temp copy, whose ./mlruns goes
    with it: there <repo>/mlruns/<experiment name>, beside the default experiments' folders."""
    if _REBASED_URI is None or _uri(client) != _REBASED_URI:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in experiment).strip(".") or "experiment"
    return (store_root() / "mlruns" / safe).as_uri()


def _create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if new. Two queued trainings may create it at the same
    moment: the one that loses gets MLflow's RESOURCE_ALREADY_EXISTS and takes the winner's."""
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(client, name))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def _store_open_lock(uri: str):
    """One process at a time opens a SQLite store for the first time.

    MLflow 3.17's SQLite tracking store creates the tables of a new database file without a lock
    (its lock-taking _safe_initialize_tables serves other stores): 4 processes opening one fresh
    file at once left 3 failing with "table _alembic_tmp_runs already exists" (measured), which is
    what `dvc queue start -j 2` does on a repository without ./mlflow.db yet. Once the tables exist
    the lock is held only while one query runs (milliseconds). Writes to an existing store need no
    lock of ours: MLflow opens every SQLite session with `PRAGMA busy_timeout = 20000`, so a write
    waits up to 20 s for another process's transaction (each of ours takes milliseconds; 4 processes
    x 150 log_batch calls at once: no "database is locked"), and whatever still fails is kept by the
    Tracker's queue and the pending-deliveries journal and sent again.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; MLflow's own behaviour
        yield
        return
    if not uri.startswith("sqlite:///"):
        yield
        return
    # Beside the database (`mlflow.db.lock`): it goes wherever the store goes, also a temporary one.
    db = Path(uri[len("sqlite:///"):].split("?")[0])
    if not db.parent.is_dir():  # MLflow itself will say that the folder is missing
        yield
        return
    lock = db.with_name(db.name + ".lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_not_found(e: BaseException) -> bool:
    """The store's definite "no such run/model" answer: RESOURCE_DOES_NOT_EXIST, which MLflow 3 raises
    for a SQLite store and relays from a server (HTTP 404). A 5xx, a timeout or a refused connection
    arrive as other codes (INTERNAL_ERROR after the retries) and mean "don't know"."""
    return isinstance(e, MlflowException) and e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _is_refusal(e: BaseException) -> bool:
    """An answer that will not change on retry (4xx other than 429): the item can never be delivered."""
    if not isinstance(e, MlflowException) or "Max retries exceeded" in str(e):
        return False
    code = e.get_http_status_code()
    return 400 <= code < 500 and code != 429


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:300]}"


def client() -> MlflowClient:
    """A client for MLflow's resolved store, without a reachability check (evaluate writes its
    outputs first and journals what the store does not take)."""
    return MlflowClient(tracking_uri())


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables for a block (MLflow reads several settings only from the environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fail_fast_http():
    """For the reachability check: one try, 10 s, instead of MLflow's default 7 retries with backoff."""
    return _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


def connect() -> MlflowClient:
    """A client for the store, after proving it answers; a clear error naming the URI if not."""
    uri = tracking_uri()
    try:
        with _fail_fast_http(), _store_open_lock(uri):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception as e:
        raise UserError(f"the MLflow tracking store {uri} is unreachable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Start it, or unset MLFLOW_TRACKING_URI "
                        "to use the local ./mlflow.db. Nothing was trained.") from None
    return client


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


def git_state() -> dict[str, str]:
    """The commit and what differed from it when the run started, as run tags:

    git_dirty: any tracked file changed (every `dvc exp run` run: its overrides are in params.yaml);
    git_dirty_files: which ones; git_dirty_code: whether any of them is code, i.e. not a file DVC
    writes itself (see _dvc_written), and git_dirty_code_files which. A run with git_dirty_code false
    is described fully by its commit and its logged params, and `cifarpipe-reproduce` reruns it.
    git_diff_sha256 (code changes only): 12 hex digits of `git diff HEAD` of those files, to tell one
    such change from another.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    changed = _changed_files() if commit else None
    if changed is None:
        return {"mlflow.source.git.commit": "unknown", "git_dirty": "unknown", "git_dirty_code": "unknown"}
    code = [f for f in changed if not _dvc_written(f)]
    tags = {"mlflow.source.git.commit": commit, "git_dirty": str(bool(changed)).lower(),
            "git_dirty_code": str(bool(code)).lower()}
    if changed:
        tags["git_dirty_files"] = _file_list(changed)
    if code:
        tags["git_dirty_code_files"] = _file_list(code)
        try:
            diff = subprocess.run(["git", "diff", "HEAD", "--no-renames", "--binary", "--", *(f":(literal){f}" for f in code)],
                                  capture_output=True, check=True, timeout=60).stdout
            tags["git_diff_sha256"] = hashlib.sha256(diff).hexdigest()[:12]
        except (OSError, subprocess.SubprocessError):
            pass
    return tags


def requirements_text() -> str:
    """`name==version` of every installed distribution: what reproduces the environment."""
    pkgs = {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()}
    return "".join(f"{n}=={v}\n" for n, v in sorted(pkgs.items()) if n)


def environment_tags(device_name: str) -> dict[str, str]:
    import torch

    return {"device": device_name, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "host_platform": platform.platform()}


def workspace_tags() -> dict[str, str]:
    """Which copy of the project a run trains in: tags a run at creation, so a run whose process
    was killed before its first checkpoint can be found again (see the train stage). The key is a
    hash, safe in a search filter whatever characters the folder's path has."""
    where = f"{platform.node()}:{Path.cwd().resolve()}"
    return {"workspace": where, "workspace_key": hashlib.sha256(where.encode()).hexdigest()[:16]}


def running_runs(client: MlflowClient, experiment: str, workspace_key: str) -> list:
    """Runs of `experiment` created in this workspace that are still RUNNING, newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              filter_string=f"attributes.status = 'RUNNING' and tags.workspace_key = '{workspace_key}'")


def has_epoch_metrics(client: MlflowClient, run_id: str) -> bool:
    return any(k in EPOCH_METRICS for k in client.get_run(run_id).data.metrics)


def mark_abandoned(client: MlflowClient, run_id: str, why: str, journal: "Pending | None" = None) -> None:
    """A killed job's run that will not be continued: KILLED instead of RUNNING forever.

    A store that does not answer must neither stop the job (this is bookkeeping of a run nobody
    continues; the training to come does not depend on it) nor pass for "the run is gone": the
    tidy-up is journaled in `journal` and done by the next delivery, with a warning now.
    """
    try:
        _abandon(client, run_id, why)
    except Exception as e:
        if is_not_found(e):
            return  # the run is gone from this store: nothing to tidy
        print(f"warning: could not mark MLflow run {run_id} KILLED ({_short(e)})"
              + (f"; kept in {journal.path} and done when the store answers" if journal else ""), file=sys.stderr)
        if journal is not None:
            journal.add({"run_id": run_id, "kind": "abandon", "why": why})


def _abandon(client: MlflowClient, run_id: str, why: str) -> None:
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "abandoned", why)
        client.set_terminated(run_id, "KILLED")


# ====================================================================== the run's record
# What makes a run findable and explainable in MLflow's own UI (its name, Source, Created by,
# Description, Datasets, system metrics, registered versions), each set the way MLflow itself
# sets it, so the UI's columns and filters fill themselves.

SYSTEM_METRICS_INTERVAL_S = 10.0  # one sample per 10 s (MLflow's default); measured cost: see README
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
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", raw)
    return out


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
                  f"or, where the experiment itself is at hand (`dvc exp pull` from the DVC remote):", "",
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


def _dirty_files() -> list[str]:
    """Tracked files whose uncommitted changes are code (not written by DVC itself: see _dvc_written)."""
    return [f for f in _changed_files() or [] if not _dvc_written(f)]


def run_record(params: Params, script: str = "stages/train.py") -> RunRecord:
    """Run name and tags: under `dvc exp run` the experiment's name, else the model and the params
    that differ from params.yaml at HEAD; MLflow's source/user tags; the reproduce commands."""
    experiment, baseline_rev = dvc_experiment()
    changed = changed_params(flatten(params), baseline_params())
    name = experiment or descriptive_name(params.model.name, changed)
    commit = baseline_rev or git_state()["mlflow.source.git.commit"]
    source = "dvc exp run" if experiment else ("dvc repro" if os.environ.get("DVC_STAGE") else script)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    tags = {MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: user,
            MLFLOW_RUN_NOTE: reproduce_note(commit, experiment, changed, _dirty_files())}
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


# ---------------------------------------------------------------- dataset inputs
def _dataset_source(url: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if urlparse(url).scheme in ("http", "https"):
        return HTTPDatasetSource(url)
    with warnings.catch_warnings():  # "" and file:// both resolve to the local source: MLflow warns
        warnings.simplefilter("ignore")
        return resolve_dataset_source(url)


def dataset_input(context: str, url: str, md5: str, n_images: int, split_hash: str | None = None) -> DatasetInput:
    """One part of CIFAR-10 as an MLflow dataset input: name 'cifar10', source the archive's URL,
    a digest from what defines the images (the archive's MD5, and for the training and validation
    parts the split's hash and the part), context 'training' | 'validation' | 'test'. Nothing is
    hashed again: the MD5 is the one the download stage verified."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    defined_by = {"archive_md5": md5, "part": context}
    if split_hash is not None:
        defined_by["split_hash"] = split_hash
    digest = hashlib.sha256(json.dumps(defined_by, sort_keys=True).encode()).hexdigest()[:12]
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    ds = MetaDataset(_dataset_source(url), name="cifar10", digest=digest, schema=schema).to_dict()
    profile = json.dumps({"num_images": n_images, **defined_by})
    entity = DatasetEntity(name=ds["name"], digest=ds["digest"], source_type=ds["source_type"],
                           source=ds["source"], schema=ds.get("schema"), profile=profile)
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_datasets(client: MlflowClient, run_id: str, inputs: list[DatasetInput]) -> None:
    """Idempotent: MLflow reuses a dataset (name, digest) and an input already on the run."""
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as e:  # lineage must never cost the training or its metrics
        print(f"warning: could not log the dataset inputs to MLflow ({type(e).__name__}: {e})", file=sys.stderr)


# ---------------------------------------------------------------- system metrics
class SystemMetrics:
    """MLflow's own SystemMetricsMonitor (CPU, memory, disk, network; NVIDIA GPUs through
    nvidia-ml-py) for a run we hold by id: mlflow.start_run(log_system_metrics=True) would make it
    the process's active run. It samples in a daemon thread every SYSTEM_METRICS_INTERVAL_S
    (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it, as in MLflow) and stops by itself once
    the run is no longer RUNNING; a SIGKILL ends the thread with the process."""

    def __init__(self, monitor) -> None:
        self._monitor = monitor
        self._first_step = monitor._logging_step

    @classmethod
    def start(cls, client: MlflowClient, run_id: str, resume: bool) -> "SystemMetrics | None":
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a resumed run's samples continue after its last step, not over it.
            monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                           resume_logging=resume, tracking_uri=client.tracking_uri)
            monitor.start()
            return cls(monitor)
        except Exception as e:
            print(f"warning: MLflow system metrics are off ({type(e).__name__}: {e})", file=sys.stderr)
            return None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Flush the last samples; never wait more than `timeout_s` (a store that hangs)."""
        def finish() -> None:
            m = self._monitor
            m.finish()  # stops MLflow's thread and flushes what it recorded
            if m._logging_step == self._first_step:
                # Its thread published nothing: the run was shorter than one interval, or it gave
                # up on one failed status look-up (a busy SQLite store). One sample, so a run with
                # system metrics on always has them.
                m.collect_metrics()
                m.publish_metrics(m.aggregate_metrics())
                m.mlflow_logger.flush()

        worker = threading.Thread(target=finish, daemon=True, name="system-metrics-stop")
        worker.start()
        worker.join(timeout_s)


# ---------------------------------------------------------------- model registry
def register_model_version(client: MlflowClient, name: str, run_id: str, model_uri: str) -> str | None:
    """Register the run's logged model as a version of `name` (created if new); once per run: a
    second call returns the run's existing version. Returns the version, None if it failed."""
    try:
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return mv.version
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # MLflow 3's log_model returns models:/<model_id>: the version links to that logged model.
        rest = model_uri.removeprefix("models:/")
        model_id = rest if rest != model_uri and "/" not in rest else None
        mv = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
        if model_id:  # as mlflow.register_model does: the logged model's page links to its versions
            linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
                linked + [{"name": mv.name, "version": mv.version}])})
        return mv.version
    except Exception as e:
        print(f"warning: could not register the model as a version of {name!r} ({type(e).__name__}: {e})",
              file=sys.stderr)
        return None


def tag_model_versions(client: MlflowClient, name: str, run_id: str, tags: dict[str, Any]) -> list[str]:
    """Tag the versions of `name` registered from `run_id` (evaluate's test accuracy); the versions tagged."""
    try:
        versions = [mv.version for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")]
        for version in versions:
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, str(value))
        return versions
    except Exception as e:
        print(f"warning: could not tag the registered model {name!r} ({type(e).__name__}: {e})", file=sys.stderr)
        return []


class Tracker:
    """One MLflow run of a training job (new, resumed, or the one `mlflow run` created)."""

    def __init__(self, client: MlflowClient, run_id: str, journal: "Pending | None" = None) -> None:
        self.client = client
        self.run_id = run_id
        self.journal = journal  # where undeliverable metrics, artifacts, model and status go
        for key, value in _TRAINING_HTTP.items():
            os.environ.setdefault(key, value)
        self._pending: list[Metric] = []
        self._queued: set[Hashable] = set()  # keys of the jobs waiting in the pool (see _submit_once)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-log")
        self._warned = False
        self.system_metrics: SystemMetrics | None = None  # set by the train stage when tracking.system_metrics
        self.background_cpu_seconds = 0.0  # CPU time the logging thread used: what tracking costs training

    def _submit(self, job):
        def timed():
            start = time.thread_time()
            try:
                return job()
            finally:
                self.background_cpu_seconds += time.thread_time() - start

        return self._pool.submit(timed)

    def _submit_once(self, key: Hashable, job) -> None:
        """Queue `job` unless a job with the same `key` is still waiting: the waiting one sends the
        newest state when it runs (all pending metrics; the file as it is then), so a store that is
        down for many epochs leaves one job per key queued, not one per epoch."""
        def run_once():
            with self._lock:
                self._queued.discard(key)
            return job()

        with self._lock:
            if key in self._queued:
                return
            self._queued.add(key)
        self._submit(run_once)

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, client: MlflowClient, experiment: str, resume_run_id: str | None, log=print,
              journal: "Pending | None" = None, create_tags: dict[str, str] | None = None,
              run_name: str | None = None) -> "Tracker":
        """Adopt MLFLOW_RUN_ID (the run `mlflow run .` created: it must not stay empty); else resume
        `resume_run_id` if the store still has it; else create a new run in `experiment`, tagged
        with `create_tags` in the same call (no moment exists where the run lacks them).

        Only the store's definite "no such run" starts a new run. Any other error (a 5xx, a
        timeout) stops here with a UserError, before anything is trained or changed: continuing
        in a new run would split the job and mark the real run KILLED. First, whatever `journal`
        holds from earlier jobs is delivered (best effort: what fails stays in the journal).
        """
        uri = _uri(client)
        if journal is not None and journal.items:
            deliver(client, journal, log=log)
        try:
            for run_id, why in ((os.environ.get("MLFLOW_RUN_ID"), "mlflow run"), (resume_run_id, "resuming")):
                if not run_id:
                    continue
                try:
                    run = client.get_run(run_id)
                except MlflowException as e:
                    if not is_not_found(e):
                        raise
                    log(f"MLflow run {run_id} ({why}) is not in {uri}; starting a new run")
                    continue
                if run.info.lifecycle_stage != "active":
                    log(f"MLflow run {run_id} ({why}) was deleted; starting a new run")
                    continue
                client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                if journal is not None:  # a journaled KILLED/FAILED or abandon of an earlier attempt is obsolete now
                    journal.remove(lambda it: it["run_id"] == run_id and it["kind"] in ("status", "abandon"))
                return cls(client, run_id, journal)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else _create_experiment(client, experiment)
            run = client.create_run(exp_id, tags=create_tags or {}, run_name=run_name)
        except Exception as e:
            raise UserError(f"the MLflow store {uri} did not answer as expected ({_short(e)}). Nothing was "
                            "trained and no run was changed; run again when the store answers.") from None
        return cls(client, run.info.run_id, journal)

    def log_start(self, params: dict[str, Any], tags: dict[str, str], requirements: str) -> None:
        """Params (flattened, dotted), reproducibility tags and the requirements artifact."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.log_text(requirements, "environment/requirements.txt")

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`; a store that does not answer gets it later from the journal."""
        self.close()
        if self.journal is None:
            self.client.set_terminated(self.run_id, status)
            return
        self.journal.add({"run_id": self.run_id, "kind": "status", "status": status})
        deliver(self.client, self.journal, runs={self.run_id})

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)  # drain() ran first; never hang the exit
        if self.system_metrics is not None:
            self.system_metrics.stop()

    # ------------------------------------------------------------ metrics
    def logged_steps(self) -> dict[str, set[int]]:
        return {k: {m.step for m in self.client.get_metric_history(self.run_id, k)} for k in EPOCH_METRICS}

    def queue_history(self, history: list[dict[str, float]], skip: dict[str, set[int]] | None = None) -> None:
        """Queue per-epoch rows (each with 'epoch', 1-based) and send them in the background."""
        now = int(time.time() * 1000)
        skip = skip or {}
        with self._lock:
            for row in history:
                step = int(row["epoch"])
                self._pending += [Metric(k, float(row[k]), now, step) for k in EPOCH_METRICS
                                  if k in row and step not in skip.get(k, ())]
        self._submit_once("metrics", self._flush)

    def _flush(self) -> bool:
        while True:
            with self._lock:
                chunk = self._pending[:_MAX_BATCH]
            if not chunk:
                return True
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as e:  # store down: keep the values, try again with the next epoch
                if not self._warned:
                    print(f"warning: MLflow store {tracking_uri()} failed ({type(e).__name__}); training goes on, "
                          "metrics are kept and sent when it answers again", file=sys.stderr)
                    self._warned = True
                return False
            with self._lock:  # drop each chunk as soon as it landed: a later failure never resends it
                del self._pending[:len(chunk)]

    def _wait_queue(self, timeout_s: float) -> bool:
        try:
            self._pool.submit(lambda: None).result(timeout=timeout_s)
            return True
        except TimeoutError:
            return False

    def drain(self, attempts: int = 3, pause_s: float = 2.0, timeout_s: float = _DRAIN_WAIT_S) -> bool:
        """Wait (at most `timeout_s`) for queued logging; retry a few times; else journal the metrics."""
        deadline = time.monotonic() + timeout_s
        if self._wait_queue(timeout_s):
            for attempt in range(attempts):
                with self._lock:
                    if not self._pending:
                        return True
                try:
                    if self._submit(self._flush).result(timeout=max(deadline - time.monotonic(), 0.1)):
                        return True
                except TimeoutError:
                    break
                time.sleep(pause_s * (attempt + 1))
        with self._lock:
            rows = [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in self._pending]
        if self.journal is not None and rows:
            self.journal.add({"run_id": self.run_id, "kind": "metrics", "metrics": rows})
            with self._lock:
                self._pending.clear()  # the journal has them now: a later drain must not add them twice
            print(f"warning: {len(rows)} metric values could not be sent to {_uri(self.client)}; they are "
                  f"kept in {self.journal.path} and sent when it answers", file=sys.stderr)
        return False

    # ------------------------------------------------------------ artifacts
    def log_artifact(self, path: Path, artifact_path: str | None = None, background: bool = False) -> None:
        def job() -> None:
            try:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
            except Exception as e:  # an artifact failing must never cost the checkpoint on disk
                print(f"warning: could not log artifact {path} to MLflow ({type(e).__name__}: {e})", file=sys.stderr)

        if background:
            self._submit_once(("artifact", str(path), artifact_path), job)
        else:
            self._wait_queue(_DRAIN_WAIT_S)  # keep order with queued jobs
            job()

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_model(self, weights: Path, input_example) -> str:
        """The run's MLflow model: the inference path from uint8 images (N, 32, 32, 3) to class names
        and probabilities (cifarpipe.pyfunc), with the weights file as its artifact, our package as
        its code, a signature and `input_example` (real images, uint8) as its example."""
        import numpy as np

        import cifarpipe
        from cifarpipe import checkpoint, pyfunc

        example = np.ascontiguousarray(input_example, dtype=np.uint8)
        signature = pyfunc.signature(example, checkpoint.load(Path(weights))["classes"])
        versions = {name: importlib.metadata.version(name) for name in ("torch", "numpy", "pandas", "pydantic", "pyyaml")}
        with tempfile.TemporaryDirectory() as tmp:
            # The package's sources only: no bytecode caches or temporaries in the model.
            package = Path(tmp) / "cifarpipe"
            shutil.copytree(Path(cifarpipe.__file__).parent, package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
            # start_run's exit marks the run FINISHED: deliver() logs the model only once everything
            # journaled before it for this run has landed, and the status item follows it.
            with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
                info = mlflow.pyfunc.log_model(name="model", python_model=str(package / "mlflow_model.py"),
                                               artifacts={pyfunc.WEIGHTS_ARTIFACT: str(weights)},
                                               model_config={"device": "cpu"},  # a loader may override it
                                               code_paths=[str(package)], signature=signature, input_example=example,
                                               pip_requirements=[f"{n}=={v}" for n, v in versions.items()])
        return info.model_uri


def _require_store_file(uri: str, hint: str) -> None:
    """A reading command on a SQLite store that isn't there: MLflow would create an empty one; say
    what is missing instead."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise UserError(f"no MLflow store at {db} ({uri}): {hint}")


def load_model(uri: str):
    """The MLflow model at `uri` (runs:/<id>/model, models:/<name>/<version>, a folder) as pyfunc,
    predicting on the CPU. UserError, with the URI, for a missing store, run, model or version."""
    store = tracking_uri()
    if uri.startswith(("runs:/", "models:/")):
        _require_store_file(store, "run this command in the repository root, or set MLFLOW_TRACKING_URI")
    try:
        with _fail_fast_http():
            return mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    except Exception as e:
        raise UserError(f"could not load the MLflow model {uri} from {store} ({_short(e)})") from None


# ------------------------------------------------------------ TensorBoard (tracking.tensorboard)
TENSORBOARD_FILE = "events.out.tfevents.cifarpipe"  # fixed: each rewrite replaces the file (and its MLflow artifact)


def tensorboard_dir(root: Path, client: MlflowClient, run_id: str) -> Path:
    """`root/<run name>_<8 chars of the run id>`: one folder per run, named as the MLflow UI shows it
    (the id part keeps two runs with the same name apart); the id alone if the store does not answer."""
    try:
        name = client.get_run(run_id).info.run_name or ""
    except Exception:
        name = ""
    name = "".join(c if c.isalnum() or c in "-_.=" else "-" for c in name).strip(".")
    return root / (f"{name}_{run_id[:8]}" if name else run_id)


def write_tensorboard(folder: Path, history: list[dict[str, float]]) -> Path:
    """Rewrite the run's TensorBoard event file from the whole per-epoch history (the checkpoint's).

    One scalar per (metric, epoch), named as in MLflow. Rewriting, never appending, means a job
    resumed after a kill cannot write an epoch twice. The new file is completed under a name
    TensorBoard ignores (no 'tfevents' in it) and then renamed over the old one, so a kill at any
    moment leaves the previous complete file or the new one. Wall times are the training seconds
    (cumulative epoch_seconds), so TensorBoard's 'relative' axis shows training time.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    records = RecordWriter(buf)
    wall = time.time() - sum(float(r.get("epoch_seconds", 0.0)) for r in history)
    records.write(Event(wall_time=wall, file_version="brain.Event:2").SerializeToString())
    for row in history:
        wall += float(row.get("epoch_seconds", 0.0))
        values = [Summary.Value(tag=k, simple_value=float(row[k])) for k in EPOCH_METRICS if k in row]
        records.write(Event(wall_time=wall, step=int(row["epoch"]), summary=Summary(value=values)).SerializeToString())
    partial = folder / "events.partial"
    atomic.write_bytes(partial, buf.getvalue())
    os.replace(partial, folder / TENSORBOARD_FILE)
    return folder / TENSORBOARD_FILE


# ------------------------------------------------------------ reading runs back (the compare command)
@dataclasses.dataclass
class StoredRun:
    """What the compare command needs of one MLflow run, as plain values."""
    run_id: str
    name: str
    status: str
    start_ms: int | None
    end_ms: int | None
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    tags: dict[str, str]
    histories: dict[str, list[tuple[int, float]]]  # (step, value) per epoch: val_accuracy, epoch_seconds


def read_runs(experiment: str | None, filter_string: str = "", max_runs: int = 100,
              histories: tuple[str, ...] = ("val_accuracy", "epoch_seconds")) -> list[StoredRun]:
    """Active runs of `experiment` (None: every experiment), newest first, matching MLflow's
    `filter_string`. UserError, with the URI, for a store that is missing or does not answer,
    an unknown experiment or a filter MLflow rejects."""
    uri = tracking_uri()
    _require_store_file(uri, "run the pipeline first (`dvc repro`), run this command in the repository root, "
                             "or set MLFLOW_TRACKING_URI")
    try:
        with _fail_fast_http():
            client = MlflowClient(uri)
            if experiment is None:
                ids = [e.experiment_id for e in client.search_experiments()]
            else:
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    known = ", ".join(e.name for e in client.search_experiments()) or "none"
                    raise UserError(f"no experiment named {experiment!r} in {uri} (experiments: {known}); "
                                    "use --experiment NAME or --all-experiments")
                ids = [exp.experiment_id]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"the MLflow tracking store {uri} is unreachable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not ids:
        return []
    try:
        runs = client.search_runs(ids, filter_string, max_results=max_runs, order_by=["attributes.start_time DESC"])
    except MlflowException as e:
        raise UserError(f"MLflow rejected the filter {filter_string!r}: {e.message.splitlines()[0]}") from None
    return [StoredRun(run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8], status=r.info.status,
                      start_ms=r.info.start_time, end_ms=r.info.end_time, params=dict(r.data.params),
                      metrics=dict(r.data.metrics), tags=dict(r.data.tags),
                      histories={k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                                 for k in histories})
            for r in runs]

# ------------------------------------------------------------ pending deliveries
def _uri(client: MlflowClient) -> str:
    return getattr(client, "tracking_uri", None) or tracking_uri()


def journal_path(run_id_file: Path) -> Path:
    """The journal both stages share: beside the run-id file (outputs/mlflow_pending.json). Not a
    DVC output: it outlives reruns of either stage until everything in it is delivered."""
    return Path(run_id_file).parent / PENDING_NAME


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Pending:
    """The journal of deliveries the store has not taken yet: {"items": [...]}, rewritten atomically
    after every change, removed once empty. Each item names its run ("run_id") and its "kind":
    metrics, artifact, model, status, abandon or evaluation (see deliver)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.errors: dict[str, str] = {}  # run id -> the error that stopped its last delivery
        try:
            self.items: list[dict[str, Any]] = json.loads(self.path.read_text())["items"]
        except FileNotFoundError:
            self.items = []
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(f"{self.path}: unreadable MLflow pending-deliveries journal ({type(e).__name__}: {e}); "
                            "move it away to continue (what it listed will then not reach MLflow)") from None

    def save(self) -> None:
        if self.items:
            atomic.write_text(self.path, json.dumps({"items": self.items}, indent=1) + "\n")
        else:
            self.path.unlink(missing_ok=True)

    def add(self, item: dict[str, Any]) -> None:
        if item["kind"] == "status":  # a run's status is set once, after everything else of the run
            self.items = [it for it in self.items if not (it["run_id"] == item["run_id"] and it["kind"] == "status")]
        self.items.append(item)
        self.save()

    def add_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        # The hash pins the file's content: a later job may overwrite the file before the store is back.
        self.add({"run_id": run_id, "kind": "artifact", "path": str(path), "artifact_path": artifact_path,
                  "sha256": file_sha256(path)})

    def add_model(self, run_id: str, weights: Path, input_example) -> None:
        """The MLflow model to log from `weights`, with `input_example`: uint8 images (N, 32, 32, 3)."""
        import numpy as np

        example = np.ascontiguousarray(input_example, dtype=np.uint8)
        self.add({"run_id": run_id, "kind": "model", "weights": str(weights), "sha256": file_sha256(weights),
                  "example": base64.b64encode(example.tobytes()).decode(), "shape": list(example.shape),
                  "dtype": "uint8"})

    def add_evaluation(self, run_id: str, params: dict[str, Any], metrics: dict[str, float], artifacts: list[Path],
                       artifact_path: str = "evaluation", n_test: int = 0) -> None:
        """An evaluation of run `run_id`'s model; deliver() decides where it goes (see _deliver_evaluation).
        It supersedes an undelivered older evaluation of the same run, whose files it has overwritten."""
        old = [it for it in self.items if it["run_id"] == run_id and it["kind"] == "evaluation"]
        if old:
            print(f"note: an undelivered earlier evaluation of run {run_id} is replaced by this one", file=sys.stderr)
        self.items = [it for it in self.items if it not in old]
        self.add({"run_id": run_id, "kind": "evaluation", "params": {k: str(v) for k, v in params.items()},
                  "metrics": {k: float(v) for k, v in metrics.items()}, "artifact_path": artifact_path, "n_test": n_test,
                  "artifacts": [{"path": str(a), "sha256": file_sha256(a)} for a in artifacts]})

    def remove(self, predicate) -> None:
        self.items = [it for it in self.items if not predicate(it)]
        self.save()


class _Undeliverable(Exception):
    """This item can never be delivered (its file changed, the store refused it): drop it, say so."""


def deliver(client: MlflowClient, journal: Pending, runs: set[str] | None = None, log=print) -> int:
    """Deliver the journal's items (of `runs`, default all), in order, run by run; return how many are left.

    A run's items go in the order they were journaled and the first failure stops that run's
    deliveries (the status comes last, so a run is FINISHED only with everything in it). The store's
    "no such run" drops the run's items; a refusal (4xx) or a file changed since drops the item;
    anything else (an outage) keeps it for the next delivery. Every step is idempotent.
    """
    journal.errors = {}
    store, dropped = _uri(client), set()
    for item in list(journal.items):
        run_id = item["run_id"]
        if (runs is not None and run_id not in runs) or run_id in journal.errors or run_id in dropped:
            continue
        try:
            _deliver_one(client, item)
        except Exception as e:
            if is_not_found(e):
                dropped.add(run_id)
                print(f"warning: MLflow run {run_id} is not in {_uri(client)} any more; dropping what was pending "
                      f"for it ({item['kind']} ...)", file=sys.stderr)
                journal.remove(lambda it: it["run_id"] == run_id)
            elif isinstance(e, _Undeliverable) or _is_refusal(e):
                print(f"warning: not delivered to MLflow run {run_id}, dropped: {item['kind']} "
                      f"{item.get('path') or item.get('weights') or ''} ({_short(e)})", file=sys.stderr)
                journal.remove(lambda it: it is item)
            else:
                journal.errors[run_id] = _short(e)
            continue
        journal.remove(lambda it: it is item)
    if journal.errors:
        log(f"warning: MLflow store {store} did not take {len(journal.items)} pending item(s) "
            f"({next(iter(journal.errors.values()))}); they are kept in {journal.path}")
    return len(journal.items)


def _deliver_one(client: MlflowClient, item: dict[str, Any]) -> None:
    run_id, kind = item["run_id"], item["kind"]
    if kind == "metrics":
        _log_metrics_once(client, run_id, [Metric(m["key"], m["value"], m["timestamp"], m["step"])
                                           for m in item["metrics"]])
    elif kind == "artifact":
        _check_unchanged(item)
        client.log_artifact(run_id, item["path"], item["artifact_path"])
    elif kind == "model":
        _check_unchanged(item, "weights")
        _log_model_once(client, run_id, item)  # the answer to an earlier upload may have been lost
    elif kind == "status":
        client.set_terminated(run_id, item["status"])
    elif kind == "abandon":
        _abandon(client, run_id, item["why"])
    elif kind == "evaluation":
        _deliver_evaluation(client, item)
    else:
        raise _Undeliverable(f"unknown kind {kind!r}")


def _check_unchanged(item: dict[str, Any], key: str = "path") -> None:
    path = Path(item[key])
    if not path.is_file() or file_sha256(path) != item["sha256"]:
        raise _Undeliverable(f"{path} was removed or rewritten since")


def _log_metrics_once(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Log the values the run lacks: a (key, step, value) already there (an earlier delivery whose
    answer was lost) is not logged again."""
    have = {(m.key, m.step, m.value) for key in {m.key for m in metrics} for m in client.get_metric_history(run_id, key)}
    new = [m for m in metrics if (m.key, m.step, m.value) not in have]
    for i in range(0, len(new), _MAX_BATCH):
        client.log_batch(run_id, metrics=new[i:i + _MAX_BATCH])


def _run_models(client: MlflowClient, run_id: str) -> list:
    exp_id = client.get_run(run_id).info.experiment_id
    return [m for m in client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'")
            if m.name == "model"]


def logged_model_uri(client: MlflowClient, run_id: str) -> str | None:
    """The model this run already logged (MLflow 3 keeps models as LoggedModels), or None."""
    return next((m.model_uri for m in _run_models(client, run_id) if m.status == LoggedModelStatus.READY), None)


def _log_model_once(client: MlflowClient, run_id: str, item: dict[str, Any]) -> None:
    """Log the model unless the run has it. A model whose upload an outage cut off stays behind
    as PENDING or FAILED: delete it, so the run ends with exactly one model."""
    models = _run_models(client, run_id)
    if any(m.status == LoggedModelStatus.READY for m in models):
        return
    for m in models:
        client.delete_logged_model(m.model_id)
    _log_model_from_weights(client, run_id, item)


def _log_model_from_weights(client: MlflowClient, run_id: str, item: dict[str, Any]) -> str:
    import numpy as np

    raw = base64.b64decode(item["example"])
    if item.get("dtype") == "uint8":
        example = np.frombuffer(raw, dtype=np.uint8).reshape(item["shape"]).copy()
    else:  # journaled before the model took uint8 images: normalised float NCHW; undo the normalisation
        from cifarpipe import checkpoint

        weights = checkpoint.load(Path(item["weights"]))
        x = np.frombuffer(raw, dtype=np.float32).reshape(item["shape"]).transpose(0, 2, 3, 1)
        pixels = (x * np.array(weights["std"]) + np.array(weights["mean"])) * 255
        example = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Tracker(client, run_id).log_model(Path(item["weights"]), example)


def evaluation_params_key(params: dict[str, str]) -> str:
    blob = json.dumps({k: v for k, v in params.items() if k.startswith("evaluate.")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _deliver_evaluation(client: MlflowClient, item: dict[str, Any]) -> None:
    """Test metrics and evaluation artifacts into the training run if it was logged with the same
    `evaluate.*` params; else into a run of its own, nested under the training run
    (mlflow.parentRunId) with every current param, so no run's params contradict its metrics."""
    for art in item["artifacts"]:
        _check_unchanged(art)
    train_id, params = item["run_id"], item["params"]
    run = client.get_run(train_id)
    current = {k: v for k, v in params.items() if k.startswith("evaluate.")}
    logged = {k: v for k, v in run.data.params.items() if k.startswith("evaluate.")}
    target = train_id
    if logged and logged != current:
        key = evaluation_params_key(params)
        found = client.search_runs([run.info.experiment_id], max_results=1, filter_string=(
            f"tags.`{EVALUATION_PARENT_TAG}` = '{train_id}' AND tags.evaluation_params = '{key}'"))
        if found:
            target = found[0].info.run_id
        else:
            changed = ", ".join(f"{k}={v}" for k, v in sorted(current.items()) if logged.get(k) != v)
            note = (f"Evaluation of run {train_id}'s model with other evaluate params than its training run "
                    f"({changed}); the test metrics of that evaluation are here, not in the training run.")
            target = client.create_run(run.info.experiment_id, run_name=f"{run.info.run_name}-eval-{key[:6]}", tags={
                EVALUATION_PARENT_TAG: train_id, "evaluation_of": train_id, "evaluation_params": key,
                "mlflow.note.content": note}).info.run_id
        have = client.get_run(target).data.params
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            client.log_batch(target, params=new[i:i + 100])
    now = int(time.time() * 1000)
    _log_metrics_once(client, target, [Metric(k, v, now, 0) for k, v in item["metrics"].items()])
    for art in item["artifacts"]:
        client.log_artifact(target, art["path"], item["artifact_path"])
    log_datasets(client, target, [dataset_input("test", params["data.url"], params["data.md5"], item.get("n_test", 0))])
    model_name = params.get("tracking.registered_model", "")
    model_uri = logged_model_uri(client, train_id) if model_name and target == train_id else None
    if model_uri:  # a version's test accuracy is its own training run's evaluation, never another's
        register_model_version(client, model_name, train_id, model_uri)  # once per run; here if train's was pending
        tag_model_versions(client, model_name, train_id, {"test_accuracy": round(item["metrics"]["test_accuracy"], 4)})
    client.set_terminated(target, "FINISHED")
