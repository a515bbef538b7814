"""Everything MLflow: one run per training job, resumed as the same run, logged without stalling.

Store: whatever MLflow resolves (MLFLOW_TRACKING_URI, else MLflow 3's default `sqlite:///mlflow.db`
in the working directory, which `mlflow ui` started in the repo root shows with no arguments).

Metrics are logged from a background thread once per epoch. If the store goes away mid-run,
training goes on: the values stay queued and are sent with the next epoch's batch; whatever is
still unsent at the end is written to a JSON file beside the checkpoints, with a message.
Because the checkpoint's history is the source of truth, a resumed job re-sends exactly the
(metric, epoch) pairs the run lacks: no duplicates, no gaps.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
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
_DRAIN_WAIT_S = 120.0  # at most this long for queued logging at the end, then fall back to the file


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def _fail_fast_http():
    """For the reachability check: one try, 10 s, instead of MLflow's default 7 retries with backoff."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect() -> MlflowClient:
    """A client for the store, after proving it answers; a clear error naming the URI if not."""
    uri = tracking_uri()
    try:
        with _fail_fast_http():
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception as e:
        raise UserError(f"the MLflow tracking store {uri} is unreachable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Start it, or unset MLFLOW_TRACKING_URI "
                        "to use the local ./mlflow.db. Nothing was trained.") from None
    return client


def git_state() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"mlflow.source.git.commit": "unknown", "git_dirty": "unknown"}


def requirements_text() -> str:
    """`name==version` of every installed distribution: what reproduces the environment."""
    pkgs = {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()}
    return "".join(f"{n}=={v}\n" for n, v in sorted(pkgs.items()) if n)


def environment_tags(device_name: str) -> dict[str, str]:
    import torch

    return {"device": device_name, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "host_platform": platform.platform()}


def mark_abandoned(client: MlflowClient, run_id: str, why: str) -> None:
    """A killed job's run that will not be continued: KILLED instead of RUNNING forever."""
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "abandoned", why)
            client.set_terminated(run_id, "KILLED")
    except MlflowException:
        pass  # the run is gone from this store: nothing to tidy


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
        lines += ["", "Uncommitted changes when it ran (not in the commit above): "
                  + ", ".join(f"`{f}`" for f in dirty_files[:10]) + (" ..." if len(dirty_files) > 10 else "")]
    return "\n".join(lines) + "\n"


def _dirty_files(ignore: tuple[str, ...] = ("params.yaml", "dvc.lock")) -> list[str]:
    """Tracked files changed since the commit, less those DVC itself changes in an experiment."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    files = [line[3:].strip() for line in out.splitlines() if line.strip()]
    return [f for f in files if f not in ignore]


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
        worker = threading.Thread(target=self._monitor.finish, daemon=True, name="system-metrics-stop")
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

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
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
              run_name: str | None = None) -> "Tracker":
        """Adopt MLFLOW_RUN_ID (the run `mlflow run .` created: it must not stay empty); else resume
        `resume_run_id` if the store still has it; else create a new run in `experiment`."""
        for run_id, why in ((os.environ.get("MLFLOW_RUN_ID"), "mlflow run"), (resume_run_id, "resuming")):
            if not run_id:
                continue
            try:
                run = client.get_run(run_id)
            except MlflowException:
                log(f"MLflow run {run_id} ({why}) is not in {tracking_uri()}; starting a new run")
                continue
            if run.info.lifecycle_stage != "active":
                log(f"MLflow run {run_id} ({why}) was deleted; starting a new run")
                continue
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return cls(client, run_id)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=run_name)
        return cls(client, run.info.run_id)

    def log_start(self, params: dict[str, Any], tags: dict[str, str], requirements: str) -> None:
        """Params (flattened, dotted), reproducibility tags and the requirements artifact."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.log_text(requirements, "environment/requirements.txt")

    def finish(self, status: str = "FINISHED") -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)  # drain() ran first; never hang the exit
        if self.system_metrics is not None:
            self.system_metrics.stop()
        self.client.set_terminated(self.run_id, status)

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

    def drain(self, attempts: int = 3, pause_s: float = 2.0, fallback: Path | None = None,
              timeout_s: float = _DRAIN_WAIT_S) -> bool:
        """Wait (at most `timeout_s`) for queued logging; retry a few times; else save metrics to `fallback`."""
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
        if fallback is not None and rows:
            atomic.write_text(fallback, json.dumps({"run_id": self.run_id, "metrics": rows}, indent=1))
            print(f"warning: {len(rows)} metric values could not be sent to {tracking_uri()}; they are "
                  f"saved in {fallback}, and the per-epoch history is in the history CSV", file=sys.stderr)
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

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_model(self, model, input_example, code_dir: Path) -> str:
        """The final model with signature and input example; `code_dir` ships the model's classes."""
        import torch

        from mlflow.models import infer_signature

        model = model.eval()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        signature = infer_signature(input_example, output)
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=input_example,
                                            code_paths=[str(code_dir)],
                                            pip_requirements=[f"torch=={importlib.metadata.version('torch')}", "numpy"])
        # start_run's exit marked the run FINISHED; the job may still be running (evaluate follows).
        return info.model_uri
