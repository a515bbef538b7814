"""A hyperparameter search in MLflow: one parent run per study, one nested run per trial.

The parent (named `tune-<study>`, tags tune.study and tune.storage) holds the search file, the
search's settings as params, one `trial_val_accuracy` value per complete trial (step = trial
number: the search's progress as a chart) and, at the end, the best trial and its recipe. Each
trial is a run nested under it (MLflow's own tag mlflow.parentRunId, so the UI shows it inside the
parent) with every param in force and the per-epoch metrics of the train stage; its tag
`trial_state` says COMPLETE, PRUNED (status KILLED), FAILED or INTERRUPTED. Runs are written with
MlflowClient calls, never the fluent API's process-global active run: every worker process writes
its own trials into the same parent.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from cifarpipe.tracking.run import EPOCH_METRICS
from cifarpipe.tracking.store import MAX_PARAMS_PER_CALL, create_experiment, is_not_found

STUDY_TAG, STORAGE_TAG, TRIAL_TAG, STATE_TAG = "tune.study", "tune.storage", "tune.trial", "trial_state"
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAILED": "FAILED", "INTERRUPTED": "KILLED"}


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else create_experiment(client, name)


def open_parent(client: MlflowClient, experiment: str, study: str, storage: Path, settings: dict[str, Any],
                spec_file: Path, run_id: str | None) -> str:
    """The study's parent run: `run_id` (the study remembers it) set RUNNING again if the store
    still has it, else a new one with the search file and settings. Returns its id."""
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id
        except Exception as e:
            if not is_not_found(e):
                raise
    note = (f"Hyperparameter search `{study}` (cifarpipe-tune {spec_file}); Optuna journal {storage}. "
            "Each nested run is one trial; rerun the command to continue the study.")
    run = client.create_run(experiment_id(client, experiment), run_name=f"tune-{study}",
                            tags={STUDY_TAG: study, STORAGE_TAG: str(storage), MLFLOW_RUN_NOTE: note})
    _log_params(client, run.info.run_id, settings)
    client.log_artifact(run.info.run_id, str(spec_file), "tune")
    return run.info.run_id


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_CALL])


def start_trial(client: MlflowClient, parent_id: str, study: str, number: int, params: dict[str, Any],
                searched: dict[str, Any]) -> str:
    """A trial's run, nested under the parent, with every param in force (flattened, dotted)."""
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, run_name=f"{study}-trial-{number}",
                            tags={MLFLOW_PARENT_RUN_ID: parent_id, STUDY_TAG: study, TRIAL_TAG: str(number),
                                  "tune.searched": ", ".join(f"{k}={v}" for k, v in searched.items())})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_epoch(client: MlflowClient, run_id: str, row: dict[str, float]) -> None:
    """One epoch's metrics (the train stage's names), step = the epoch (1-based)."""
    now, step = int(time.time() * 1000), int(row["epoch"])
    client.log_batch(run_id, metrics=[Metric(k, float(row[k]), now, step) for k in EPOCH_METRICS if k in row])


def end_trial(client: MlflowClient, run_id: str, state: str, tags: dict[str, str] | None = None) -> None:
    """The trial's outcome: tag trial_state and the matching run status (PRUNED -> KILLED)."""
    client.log_batch(run_id, tags=[RunTag(STATE_TAG, state)] + [RunTag(k, v) for k, v in (tags or {}).items()])
    client.set_terminated(run_id, STATUS[state])


def trial_done(client: MlflowClient, parent_id: str, number: int, value: float) -> None:
    """A finished trial's validation accuracy on the parent, step = trial number."""
    client.log_metric(parent_id, "trial_val_accuracy", value, step=number)


def close_parent(client: MlflowClient, parent_id: str, summary: dict[str, float], tags: dict[str, str],
                 recipe: Path | None, finished: bool) -> None:
    """The study's result on its parent; FINISHED when the study has all its trials, else KILLED."""
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    if recipe is not None:
        client.log_artifact(parent_id, str(recipe), "tune")
    client.set_terminated(parent_id, "FINISHED" if finished else "KILLED")
