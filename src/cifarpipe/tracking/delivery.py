"""Delivering the journal's items (tracking.journal) to the store: by the next stage that reaches
it (train at its start and end, evaluate at its end).

Each delivery is idempotent (metrics already in the run, a model the run already has, are
skipped), so an item whose answer was lost is delivered again safely. Only a definite "no such
run" from the store drops a run's items; any other error (a 5xx, a timeout) keeps them for the
next delivery.
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

from cifarpipe.tracking import card, checkpoints, datasets, model, registry
from cifarpipe.tracking.in_force import params_in_force
from cifarpipe.tracking.journal import Journal, file_sha256
from cifarpipe.tracking.store import (MAX_METRICS_PER_CALL, MAX_PARAMS_PER_CALL, is_not_found, is_refusal,
                                      short_error, uri_of)

EVALUATION_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent


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
