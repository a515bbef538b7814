"""One MLflow run's logging, without stalling training.

Metrics are logged from a background thread once per epoch. If the store goes away mid-run,
training goes on: the values stay queued and are sent with the next epoch's batch; whatever is
still unsent at the end goes into the journal of pending deliveries, with a message. Because the
checkpoint's history is the source of truth, a resumed job sends again exactly the (metric,
epoch) pairs the run lacks: no duplicates, no gaps.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Hashable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cifarpipe.tracking.checkpoints import CheckpointLog
from cifarpipe.tracking.delivery import deliver
from cifarpipe.tracking.journal import Journal
from cifarpipe.tracking.store import MAX_METRICS_PER_CALL, MAX_PARAMS_PER_CALL, uri_of
from cifarpipe.tracking.system_metrics import SystemMetrics

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                 "images_per_second")
# While training, a remote store that stops answering must cost seconds, not MLflow's default
# 7 retries x 120 s per call: 2 retries, 20 s each. A user's own settings win.
_TRAINING_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_DRAIN_WAIT_S = 120.0  # at most this long for queued logging at the end, then fall back to the journal


class RunLogger:
    """One MLflow run's logging: per-epoch metrics and artifacts sent from a background thread,
    the run's params and tags, its end. What the store does not take goes to the journal."""

    def __init__(self, client: MlflowClient, run_id: str, journal: Journal | None = None) -> None:
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
        self.system_metrics: SystemMetrics | None = None  # set when tracking.system_metrics is on
        # set by the training job: epoch metrics then go with their epoch's checkpoint model
        self.checkpoints: CheckpointLog | None = None
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
    def log_start(self, params: dict[str, Any], tags: dict[str, str], requirements: str) -> None:
        """Params (flattened, dotted), reproducibility tags and the requirements artifact."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_PER_CALL])
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
                chunk = self._pending[:MAX_METRICS_PER_CALL]
            if not chunk and not (self.checkpoints and self.checkpoints.pending()):
                return True
            try:
                if self.checkpoints:  # the epochs' models first, then their metrics linked to them
                    self.checkpoints.deliver(chunk)
                else:
                    self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as e:  # store down: keep the values, try again with the next epoch
                if not self._warned:
                    print(f"warning: MLflow store {uri_of(self.client)} failed ({type(e).__name__}); training goes on, "
                          "metrics are kept and sent when it answers again", file=sys.stderr)
                    self._warned = True
                return False
            with self._lock:  # drop each chunk as soon as it landed: a later failure never resends it
                del self._pending[:len(chunk)]
            if not chunk:  # the checkpoint models' epochs alone: sent
                return True

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
                    if not self._pending and not (self.checkpoints and self.checkpoints.pending()):
                        return True
                try:
                    if self._submit(self._flush).result(timeout=max(deadline - time.monotonic(), 0.1)):
                        return True
                except TimeoutError:
                    break
                time.sleep(pause_s * (attempt + 1))
        with self._lock:
            rows = [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in self._pending]
        cp = self.checkpoints
        epochs = sorted(set(cp.take_epochs()) | {r["step"] for r in rows}) if cp and self.journal is not None else []
        if self.journal is not None and (rows or epochs):
            if cp:  # the epochs' models, then their metrics: delivered as in training (tracking.checkpoints)
                self.journal.add({"run_id": self.run_id, "kind": "checkpoints", "metrics": rows, "epochs": epochs,
                                  "datasets": cp.datasets})
            else:
                self.journal.add({"run_id": self.run_id, "kind": "metrics", "metrics": rows})
            with self._lock:
                self._pending.clear()  # the journal has them now: a later drain must not add them twice
            print(f"warning: {len(rows)} metric values" + (f" and the checkpoint models of epoch(s) "
                  f"{', '.join(map(str, epochs))}" if epochs else "") + f" could not be sent to "
                  f"{uri_of(self.client)}; they are kept in {self.journal.path} and sent when it answers",
                  file=sys.stderr)
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

