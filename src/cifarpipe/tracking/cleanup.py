"""What the store holds that a finished training no longer needs, and removing it (cifarpipe-gc).

- The `checkpoints/last.pt` artifact of every FINISHED run: the state to resume from, useless once
  the run is finished. The run's model and `checkpoints/best.pt` stay.
- Checkpoints logged as MLflow LoggedModels (model_type `checkpoint`) of FINISHED runs that hold a
  file (tracking.checkpoints keeps it in the best and the last epoch's), all but the one with the
  best `val_accuracy`: deleted in MLflow's way (a soft delete); `mlflow gc` then removes their
  files. The epochs' models without a file stay: 0 bytes, and their linked metrics.
- What `mlflow gc` would remove: runs already deleted (MLflow keeps their rows and files until then).

Only runs whose status is FINISHED are touched: a RUNNING, KILLED or FAILED run may be continued.
"""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from cifarpipe.tracking.store import is_not_found

LAST_ARTIFACT = "checkpoints/last.pt"
CHECKPOINT_MODEL_TYPE = "checkpoint"


@dataclass(frozen=True)
class Removable:
    """One thing in the store gc can remove: a run's artifact file, or a checkpoint LoggedModel."""
    run_id: str
    what: str  # the artifact path, or "logged model <id> (step N)"
    size: int  # bytes
    model_id: str | None = None  # set for a LoggedModel


def run_status(client: MlflowClient, run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, ...), "DELETED" for a deleted run, None if the store has no such run."""
    try:
        run = client.get_run(run_id)
    except Exception as e:
        if is_not_found(e):
            return None
        raise
    return "DELETED" if run.info.lifecycle_stage != "active" else run.info.status


def trained_by(client: MlflowClient, run_id: str) -> str:
    """The run whose training produced `run_id`'s weights: the one its tag reuses_run names (a
    finished job executed again with other params outside its fingerprint records that execution in
    a run of its own, tracking.job), else `run_id` itself, also when the store has no such run."""
    try:
        return client.get_run(run_id).data.tags.get("reuses_run") or run_id
    except Exception as e:
        if is_not_found(e):
            return run_id
        raise


def _experiment_ids(client: MlflowClient, view: int = ViewType.ACTIVE_ONLY) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(view_type=view)]


def _finished_runs(client: MlflowClient) -> list:
    ids = _experiment_ids(client)
    return client.search_runs(ids, "attributes.status = 'FINISHED'", max_results=50000) if ids else []


def removable(client: MlflowClient) -> list[Removable]:
    """The last.pt artifacts and the surplus checkpoint models of FINISHED runs."""
    finished = _finished_runs(client)
    out = []
    for run in finished:
        for f in client.list_artifacts(run.info.run_id, "checkpoints"):
            if f.path == LAST_ARTIFACT and not f.is_dir:
                out.append(Removable(run.info.run_id, f.path, f.file_size or 0))
    by_run: dict[str, list] = {}
    finished_ids = {r.info.run_id for r in finished}
    for m in _checkpoint_models(client):
        if m.source_run_id in finished_ids:
            by_run.setdefault(m.source_run_id, []).append(m)
    for run_id, ms in by_run.items():
        # Equal accuracies: the model that holds the file (tracking.checkpoints keeps it in the first
        # epoch that reached the best value, the job's best.pt), not whichever the search listed first.
        best = max(ms, key=lambda m: (_val_accuracy(m), m.tags.get("checkpoint_file") == "kept"))
        for m in ms:
            # Only models that hold a file: the epochs' others are rows with linked metrics, 0 bytes.
            size = sum(f.file_size or 0 for f in client.list_logged_model_artifacts(m.model_id))
            if m.model_id != best.model_id and size:
                out.append(Removable(run_id, f"logged model {m.model_id} ({m.name})", size, m.model_id))
    return out


def _checkpoint_models(client: MlflowClient) -> list:
    ids, out, token = _experiment_ids(client), [], None
    while ids:
        page = client.search_logged_models(ids, filter_string=f"model_type = '{CHECKPOINT_MODEL_TYPE}'",
                                           page_token=token)
        out += list(page)
        token = page.token
        if not token:
            break
    return out


def _val_accuracy(model) -> float:
    return max((m.value for m in (model.metrics or []) if m.key == "val_accuracy"), default=float("-inf"))


def remove(client: MlflowClient, item: Removable) -> None:
    """Remove one item: the artifact file at once; a LoggedModel soft-deleted (mlflow gc frees it)."""
    if item.model_id:
        client.delete_logged_model(item.model_id)
        return
    repo = get_artifact_repository(client.get_run(item.run_id).info.artifact_uri)
    repo.delete_artifacts(item.what)


def _tree_size(client: MlflowClient, run_id: str, path: str | None = None) -> int:
    total = 0
    for f in client.list_artifacts(run_id, path):
        total += _tree_size(client, run_id, f.path) if f.is_dir else (f.file_size or 0)
    return total


def deleted_runs(client: MlflowClient) -> tuple[int, int]:
    """Runs in the deleted stage (also of deleted experiments) and their artifacts' bytes: what
    `mlflow gc` removes."""
    ids = _experiment_ids(client, ViewType.ALL)
    runs = client.search_runs(ids, run_view_type=ViewType.DELETED_ONLY, max_results=50000) if ids else []
    return len(runs), sum(_tree_size(client, r.info.run_id) for r in runs)


def gc_command(uri: str) -> str:
    """The `mlflow gc` call that finishes the job on this store. MLflow 3.17 needs a tracking URI in
    the environment even with --backend-store-uri, and without --backend-store-uri it collects
    ./mlflow.db of the working directory (creating it), whatever the tracking URI says."""
    if uri.startswith(("http://", "https://")):
        return (f"on the server's machine: MLFLOW_TRACKING_URI={uri} mlflow gc --backend-store-uri <its database URI> "
                "(the one `mlflow server --backend-store-uri` was given)")
    return f"MLFLOW_TRACKING_URI={uri} mlflow gc --backend-store-uri {uri}"
