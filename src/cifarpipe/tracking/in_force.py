"""The params in force of a run: MLflow params are immutable, the values a job runs with are not.

A job continued in its run (resumed from its checkpoint, or completed after a kill) may run with a
param changed that is not part of its fingerprint (evaluate.*, tracking.*, train.nproc_per_node,
log_every, device, num_workers, data.url: they change nothing training computes, so the job's
checkpoint stays valid). The run's params still hold the values it started with, so the change is
recorded as a tag, `param_changed.<key>` = "<logged> -> <in force>", and `params_in_force` reads a
run's params with those tags applied. Every reader that decides by a run's params uses it: where
evaluate logs (tracking.journal), whether a finished job's run is the record of a new execution
(tracking.job), and cifarpipe-reproduce and cifarpipe-compare (through StoredRun.params_in_force).
"""
from __future__ import annotations

from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from cifarpipe.tracking.store import MAX_PARAMS_PER_CALL

PREFIX = "param_changed."
_ARROW = " -> "


def params_in_force(params: dict[str, str], tags: dict[str, str]) -> dict[str, str]:
    """A run's logged params with its `param_changed.<key>` tags applied: the values its job ran with last."""
    out = dict(params)
    for key, value in tags.items():
        if key.startswith(PREFIX) and _ARROW in value:
            out[key[len(PREFIX):]] = value.rpartition(_ARROW)[2]
    return out


def differing(in_force: dict[str, str], current: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{key: (the run's value, the current value)} for the keys of `current` whose value differs."""
    return {k: (in_force.get(k, "-"), v) for k, v in current.items() if in_force.get(k) != v}


def change_tags(logged: dict[str, str], tags: dict[str, str], current: dict[str, str]
                ) -> tuple[dict[str, str], list[str]]:
    """(tags to set, tag keys to delete) that make the run's params in force `current`, for the keys
    the run logged; a value changed back to the logged one loses its tag."""
    in_force = params_in_force(logged, tags)
    to_set, to_delete = {}, []
    for key, value in current.items():
        if key not in logged or in_force.get(key) == value:
            continue
        if logged[key] == value:
            to_delete.append(PREFIX + key)
        else:
            to_set[PREFIX + key] = f"{logged[key]}{_ARROW}{value}"
    return to_set, to_delete


def record_params_in_force(client: MlflowClient, run_id: str, current: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Make `current` (flattened params, as the stage validated them) the params in force of run
    `run_id`, which existed before this execution: tags for changed values, params for keys the run
    never logged. Returns what changed ({key: (before, now)}), which is also printed."""
    run = client.get_run(run_id)
    text = {k: str(v) for k, v in current.items()}
    changed = differing(params_in_force(run.data.params, run.data.tags), text)
    to_set, to_delete = change_tags(run.data.params, run.data.tags, text)
    if to_set:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in to_set.items()])
    for key in to_delete:
        client.delete_tag(run_id, key)
    new = [Param(k, v) for k, v in text.items() if k not in run.data.params]
    for i in range(0, len(new), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=new[i:i + MAX_PARAMS_PER_CALL])
    changed = {k: ab for k, ab in changed.items() if k in run.data.params}
    if changed:
        print(f"MLflow run {run_id} continues with params changed since it last ran: "
              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
              + f" (its params keep the values it started with; tags {PREFIX}<key> record the change)")
    return changed
