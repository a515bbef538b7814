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
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Hashable

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifarpipe import atomic
from cifarpipe.config import UserError

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


def mark_abandoned(client: MlflowClient, run_id: str, why: str) -> None:
    """A killed job's run that will not be continued: KILLED instead of RUNNING forever."""
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "abandoned", why)
            client.set_terminated(run_id, "KILLED")
    except MlflowException:
        pass  # the run is gone from this store: nothing to tidy


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
              create_tags: dict[str, str] | None = None) -> "Tracker":
        """Adopt MLFLOW_RUN_ID (the run `mlflow run .` created: it must not stay empty); else resume
        `resume_run_id` if the store still has it; else create a new run in `experiment`, tagged
        with `create_tags` in the same call (no moment exists where the run lacks them)."""
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
        run = client.create_run(exp_id, tags=create_tags or {})
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
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():  # MLflow would create an empty store here; say what is missing instead
            raise UserError(f"no MLflow store at {db} ({uri}): run the pipeline first (`dvc repro`), run this "
                            "command in the repository root, or set MLFLOW_TRACKING_URI")
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
