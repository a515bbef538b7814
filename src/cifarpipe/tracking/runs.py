"""Reading runs back from the store as plain values: the compare and reproduce commands."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifarpipe.config import UserError
from cifarpipe.tracking.in_force import params_in_force
from cifarpipe.tracking.store import fail_fast_http, is_not_found, require_store_file, tracking_uri


@dataclasses.dataclass(frozen=True)
class StoredRun:
    """One MLflow run, as plain values."""
    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    tags: dict[str, str]
    histories: dict[str, list[tuple[int, float]]]  # (step, value) of each requested metric, every logged value
    experiment: str = ""
    name: str = ""
    start_ms: int | None = None
    end_ms: int | None = None

    @property
    def params_in_force(self) -> dict[str, str]:
        """The params the run's job ran with last: its params, with the changes recorded when it was
        continued with other values (see tracking.in_force)."""
        return params_in_force(self.params, self.tags)


def _stored(client: MlflowClient, r, histories: Sequence[str], experiment: str = "") -> StoredRun:
    return StoredRun(run_id=r.info.run_id, status=r.info.status, params=dict(r.data.params),
                     metrics=dict(r.data.metrics), tags=dict(r.data.tags),
                     histories={k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                                for k in histories},
                     experiment=experiment, name=r.info.run_name or r.info.run_id[:8],
                     start_ms=r.info.start_time, end_ms=r.info.end_time)


def _unreachable(uri: str, e: BaseException) -> UserError:
    return UserError(f"the MLflow tracking store {uri} is unreachable ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})")


def read_run(client: MlflowClient, run_id: str, histories: Sequence[str]) -> StoredRun:
    """Run `run_id` with the histories of `histories`; UserError for a missing run or a silent store."""
    try:
        r = client.get_run(run_id)
        return _stored(client, r, histories, client.get_experiment(r.info.experiment_id).name)
    except Exception as e:
        if is_not_found(e):
            raise UserError(f"no run {run_id} in the MLflow store {tracking_uri()}") from None
        raise UserError(f"the MLflow store {tracking_uri()} did not answer for run {run_id} "
                        f"({type(e).__name__})") from None


def read_runs(experiment: str | None, filter_string: str = "", max_runs: int = 100,
              histories: Sequence[str] = ("val_accuracy", "epoch_seconds")) -> list[StoredRun]:
    """Active runs of `experiment` (None: every experiment), newest first, matching MLflow's
    `filter_string`. UserError, with the URI, for a store that is missing or does not answer,
    an unknown experiment or a filter MLflow rejects."""
    uri = tracking_uri()
    require_store_file(uri, "run the pipeline first (`dvc repro`), run this command in the repository root, "
                            "or set MLFLOW_TRACKING_URI")
    try:
        with fail_fast_http():
            client = MlflowClient(uri)
            if experiment is None:
                experiments = {e.experiment_id: e.name for e in client.search_experiments()}
            else:
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    known = ", ".join(e.name for e in client.search_experiments()) or "none"
                    raise UserError(f"no experiment named {experiment!r} in {uri} (experiments: {known}); "
                                    "use --experiment NAME or --all-experiments")
                experiments = {exp.experiment_id: exp.name}
    except UserError:
        raise
    except Exception as e:
        raise _unreachable(uri, e) from None
    if not experiments:
        return []
    try:
        runs = client.search_runs(list(experiments), filter_string, max_results=max_runs,
                                  order_by=["attributes.start_time DESC"])
    except MlflowException as e:
        raise UserError(f"MLflow rejected the filter {filter_string!r}: {e.message.splitlines()[0]}") from None
    return [_stored(client, r, histories, experiments.get(r.info.experiment_id, "")) for r in runs]
