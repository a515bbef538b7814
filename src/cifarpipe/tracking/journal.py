"""The journal of pending deliveries: what a stage could not deliver to the store yet.

Metric values, tags, artifact files, the model to log from the weights file, a terminal status, a
run to mark KILLED, an evaluation: each is an item of one atomic JSON file, `mlflow_pending.json`
beside the run-id file (outputs/), delivered by the next stage that reaches the store (train at its
start and end, evaluate at its start). Each delivery is idempotent (metrics already in the run, a model
the run already has, are skipped), so an item whose answer was lost is delivered again safely.
Only a definite "no such run" from the store drops a run's items; any other error (a 5xx, a
timeout) keeps them for the next delivery.
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cifarpipe import atomic
from cifarpipe.config import UserError
from cifarpipe.tracking import card, checkpoints, datasets, model, registry
from cifarpipe.tracking.in_force import params_in_force
from cifarpipe.tracking.store import (MAX_METRICS_PER_CALL, MAX_PARAMS_PER_CALL, is_not_found, is_refusal,
                                      short_error, uri_of)
from cifarpipe.workspace import beside_repository, experiment_name, in_temporary_copy, safe_name

JOURNAL_NAME = "mlflow_pending.json"
EVALUATION_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent

def journal_path(run_id_file: Path) -> Path:
    """The journal both stages share: beside the run-id file (outputs/mlflow_pending.json). Not a
    DVC output: it outlives reruns of either stage until everything in it is delivered.

    A DVC experiment run in a temporary copy (`--queue`, `--temp`) keeps it beside the original
    repository's, one file per experiment name (outputs/mlflow_pending-<name>.json): the copy is
    deleted when the experiment is killed, and rerunning that name delivers what was left."""
    name = experiment_name()
    if name and in_temporary_copy():
        folder = beside_repository(Path(run_id_file).parent)
        return folder / f"{Path(JOURNAL_NAME).stem}-{safe_name(name)}.json"
    return Path(run_id_file).parent / JOURNAL_NAME


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Journal:
    """The journal of deliveries the store has not taken yet: {"items": [...]}, rewritten atomically
    after every change, removed once empty. Each item names its run ("run_id") and its "kind":
    metrics, checkpoints, tags, artifact, model, status, abandon or evaluation (see deliver)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.errors: dict[str, str] = {}  # run id -> the error that stopped its last delivery
        # What the last delivery dropped for good: (item, why). A caller must not report those as logged.
        self.dropped: list[tuple[dict[str, Any], str]] = []
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

    def add_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.add({"run_id": run_id, "kind": "metrics", "metrics": [
            {"key": k, "value": float(v), "timestamp": now, "step": step} for k, v in metrics.items()]})

    def add_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        # The hash pins the file's content: a later job may overwrite the file before the store is back.
        self.add({"run_id": run_id, "kind": "artifact", "path": str(path), "artifact_path": artifact_path,
                  "sha256": file_sha256(path)})

    def add_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.add({"run_id": run_id, "kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def add_model(self, run_id: str, weights: Path, input_example: np.ndarray, step: int = 0) -> None:
        """The MLflow model to log from `weights`, with `input_example`: uint8 images (N, 32, 32, 3);
        `step`: the epoch whose weights these are."""
        example = np.ascontiguousarray(input_example, dtype=np.uint8)
        self.add({"run_id": run_id, "kind": "model", "weights": str(weights), "sha256": file_sha256(weights),
                  "example": base64.b64encode(example.tobytes()).decode(), "shape": list(example.shape),
                  "dtype": "uint8", "step": step})

    def add_checkpoint_files(self, run_id: str, files: dict[int, Path], keep: set[int]) -> None:
        """The checkpoint files of epochs `files` for their checkpoint models (tracking.checkpoints),
        each pinned by its hash; every other model of the run loses its file (`keep`: best and last)."""
        self.add({"run_id": run_id, "kind": "checkpoints", "metrics": [], "epochs": [], "keep": sorted(keep),
                  "files": [{"epoch": e, "path": str(p), "sha256": file_sha256(p)} for e, p in sorted(files.items())]})

    def add_evaluation(self, run_id: str, params: dict[str, Any], metrics: dict[str, float], artifacts: list[Path],
                       artifact_path: str = "evaluation", n_test: int = 0, per_class: list[dict] | None = None) -> None:
        """An evaluation of run `run_id`'s model; deliver() decides where it goes (see _deliver_evaluation).
        `per_class`: rows of the per-class table (class, support, correct, accuracy, precision), for
        the model card. It supersedes an undelivered older evaluation of the same run, whose files
        it has overwritten."""
        old = [it for it in self.items if it["run_id"] == run_id and it["kind"] == "evaluation"]
        if old:
            print(f"note: an undelivered earlier evaluation of run {run_id} is replaced by this one", file=sys.stderr)
        self.items = [it for it in self.items if it not in old]
        self.add({"run_id": run_id, "kind": "evaluation", "params": {k: str(v) for k, v in params.items()},
                  "metrics": {k: float(v) for k, v in metrics.items()}, "artifact_path": artifact_path, "n_test": n_test,
                  "per_class": per_class or [],
                  "artifacts": [{"path": str(a), "sha256": file_sha256(a)} for a in artifacts]})

    def remove(self, predicate) -> None:
        self.items = [it for it in self.items if not predicate(it)]
        self.save()


class Undeliverable(Exception):
    """This item can never be delivered (its file changed, the store refused it): drop it, say so."""


def deliver(client: MlflowClient, journal: Journal, runs: set[str] | None = None, log=print) -> int:
    """Deliver the journal's items (of `runs`, default all), in order, run by run; return how many are left.

    A run's items go in the order they were journaled and the first failure stops that run's
    deliveries (the status comes last, so a run is FINISHED only with everything in it). The store's
    "no such run" drops the run's items; a refusal (4xx) or a file changed since drops the item;
    anything else (an outage) keeps it for the next delivery. Every step is idempotent.
    """
    journal.errors, journal.dropped = {}, []
    store, dropped = uri_of(client), set()
    for item in list(journal.items):
        run_id = item["run_id"]
        if (runs is not None and run_id not in runs) or run_id in journal.errors or run_id in dropped:
            continue
        try:
            _deliver_one(client, item)
        except Exception as e:
            if is_not_found(e):
                dropped.add(run_id)
                gone = [it for it in journal.items if it["run_id"] == run_id]
                journal.dropped += [(it, f"run {run_id} is not in {store}") for it in gone]
                print(f"warning: MLflow run {run_id} is not in {store} any more; dropping what was pending "
                      f"for it ({', '.join(it['kind'] for it in gone)})", file=sys.stderr)
                journal.remove(lambda it: it["run_id"] == run_id)
            elif isinstance(e, Undeliverable) or is_refusal(e):
                journal.dropped.append((item, short_error(e)))
                print(f"warning: not delivered to MLflow run {run_id}, dropped: {item['kind']} "
                      f"{item.get('path') or item.get('weights') or ''} ({short_error(e)})", file=sys.stderr)
                journal.remove(lambda it: it is item)
            else:
                journal.errors[run_id] = short_error(e)
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
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in item["tags"].items()])
    elif kind == "artifact":
        _check_unchanged(item)
        client.log_artifact(run_id, item["path"], item["artifact_path"])
    elif kind == "model":
        _check_unchanged(item, "weights")
        # the answer to an earlier upload may have been lost: log_model_once skips a model the run has
        model.log_model_once(client, run_id, Path(item["weights"]), _example(item), item.get("step", 0))
    elif kind == "checkpoints":
        for f in item.get("files", []):
            _check_unchanged(f)
        experiment_id = client.get_run(run_id).info.experiment_id
        models = checkpoints.log_epochs(
            client, run_id, experiment_id, only_missing=True, epochs=item["epochs"], datasets=item.get("datasets"),
            metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in item["metrics"]])
        if "keep" in item:
            checkpoints.keep_files(client, run_id, experiment_id, {f["epoch"]: Path(f["path"]) for f in item["files"]},
                                   set(item["keep"]), models)
    elif kind == "status":
        client.set_terminated(run_id, item["status"])
    elif kind == "abandon":
        abandon(client, run_id, item["why"])
    elif kind == "evaluation":
        _deliver_evaluation(client, item)
    else:
        raise Undeliverable(f"unknown kind {kind!r}")


def _example(item: dict[str, Any]) -> np.ndarray:
    """The model item's input example: uint8 images (N, 32, 32, 3), stored as base64 bytes."""
    return np.frombuffer(base64.b64decode(item["example"]), dtype=np.uint8).reshape(item["shape"]).copy()


def is_deleted(client: MlflowClient, run_id: str) -> bool:
    """Whether the store holds `run_id` as deleted (in the UI's bin; `mlflow runs restore` brings it
    back). False when it is active, missing or the store does not answer: delivery tells those apart."""
    try:
        return client.get_run(run_id).info.lifecycle_stage == "deleted"
    except Exception:
        return False


def abandon(client: MlflowClient, run_id: str, why: str) -> None:
    """Mark a RUNNING run that nobody will continue KILLED, with the reason as tag `abandoned`."""
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "abandoned", why)
        client.set_terminated(run_id, "KILLED")


def _check_unchanged(item: dict[str, Any], key: str = "path") -> None:
    path = Path(item[key])
    if not path.is_file() or file_sha256(path) != item["sha256"]:
        raise Undeliverable(f"{path} was removed or rewritten since")


def _log_metrics_once(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Log the values the run lacks: a (key, step, value) already there (an earlier delivery whose
    answer was lost) is not logged again."""
    have = {(m.key, m.step, m.value) for key in {m.key for m in metrics} for m in client.get_metric_history(run_id, key)}
    new = [m for m in metrics if (m.key, m.step, m.value) not in have]
    for i in range(0, len(new), MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=new[i:i + MAX_METRICS_PER_CALL])



def evaluation_params_key(params: dict[str, str]) -> str:
    blob = json.dumps({k: v for k, v in params.items() if k.startswith("evaluate.")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _deliver_evaluation(client: MlflowClient, item: dict[str, Any]) -> None:
    """Test metrics and evaluation artifacts into the training run if its `evaluate.*` params in force
    are the same; else into a run of its own, nested under the training run
    (mlflow.parentRunId) with every current param, so no run's params contradict its metrics."""
    for art in item["artifacts"]:
        _check_unchanged(art)
    train_id, params = item["run_id"], item["params"]
    run = client.get_run(train_id)
    current = {k: v for k, v in params.items() if k.startswith("evaluate.")}
    # The training run's values in force: a job resumed with evaluate.batch_size changed (after an
    # out-of-memory error in validation) validated its last epochs with the new value; its run's
    # params keep the first (see tracking.in_force), and its evaluation belongs in it.
    logged = {k: v for k, v in params_in_force(run.data.params, run.data.tags).items() if k.startswith("evaluate.")}
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
        for i in range(0, len(new), MAX_PARAMS_PER_CALL):
            client.log_batch(target, params=new[i:i + MAX_PARAMS_PER_CALL])
    now = int(time.time() * 1000)
    _log_metrics_once(client, target, [Metric(k, v, now, 0) for k, v in item["metrics"].items()])
    for art in item["artifacts"]:
        client.log_artifact(target, art["path"], item["artifact_path"])
    datasets.log_datasets(client, target, [datasets.dataset_input("test", params["data.url"], params["data.md5"], item.get("n_test", 0))])
    model_name = params.get("tracking.registered_model", "")
    model_uri = model.logged_model_uri(client, train_id) if target == train_id else None
    if model_uri:  # a version's card and test accuracy are its own training run's evaluation, never another's
        per_class = item.get("per_class") or []
        # strict: a failure keeps the item pending (or, refused, reports it dropped), never "logged". The
        # version is registered once per run (here if train's registration was pending); the card gets the test results.
        card.publish(client, train_id, model_uri, model_name, [r["class"] for r in per_class], evaluation=item,
                     strict=True)
        if model_name:
            item["versions"] = registry.tag_model_versions(
                client, model_name, train_id, {"test_accuracy": round(item["metrics"]["test_accuracy"], 4)}, strict=True)
    client.set_terminated(target, "FINISHED")
    item["delivered_to"] = target  # what the evaluate stage reports
