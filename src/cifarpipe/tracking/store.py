"""Which MLflow store a stage uses, opening it, and what its errors mean.

The store is whatever MLflow resolves (MLFLOW_TRACKING_URI, else MLflow 3's default
`sqlite:///mlflow.db` in the working directory, which `mlflow ui` started in the repository root
shows with no arguments), with one exception: a stage that DVC runs in a temporary copy of the
repository (`dvc exp run --queue` / `--temp`) takes a local store given by a relative path (the
default, or e.g. MLFLOW_TRACKING_URI=sqlite:///mlflow.db) in the original repository, never in
the copy, which DVC deletes with everything in it (see store_root and tracking_uri).

Only a definite "no such run" from the store (is_not_found) means a run is gone; any other error
(a 5xx, a timeout) is an outage, never a reason to start a new run.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from cifarpipe.config import UserError
from cifarpipe.workspace import repository_root, safe_name

MAX_METRICS_PER_CALL = 900  # MLflow accepts at most 1000 metrics per log_batch call
MAX_PARAMS_PER_CALL = 100  # and at most 100 params

_REBASED_URI: str | None = None  # set when tracking_uri() moved the default store out of a DVC temp copy


def store_root() -> Path:
    """The folder whose ./mlflow.db is the default store: the repository the stage belongs to,
    also from DVC's temporary copy (`dvc exp run --queue` / `--temp`; see cifarpipe.workspace)."""
    return repository_root()


def tracking_uri() -> str:
    """The store: the user's (MLFLOW_TRACKING_URI, mlflow.set_tracking_uri) if set, else MLflow's
    default, `sqlite:///mlflow.db`. A local store given by a relative path (MLflow's default, or a
    user's `sqlite:///mlflow.db`, `file:./mlruns`, `./mlruns`) is taken in store_root() instead of
    the working directory: in DVC's temporary copy it would be deleted with the copy, and the stage
    would still report the run as logged."""
    global _REBASED_URI
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    uri = mlflow.get_tracking_uri()
    root = store_root()
    if root == Path.cwd().resolve():
        return uri
    if is_tracking_uri_set():
        rebased = rebase_relative_uri(uri, root)
    else:  # MLflow's default, already made absolute in the working directory (MLflow 3.17)
        rebased = f"sqlite:///{root / 'mlflow.db'}" if uri.startswith("sqlite:///") else None
    if rebased is None:
        return uri
    if _REBASED_URI != rebased:
        print(f"note: MLflow store {rebased} (the repository's; the stage runs in DVC's temporary copy "
              f"{Path.cwd()}, where {uri} would be deleted with the copy)", file=sys.stderr)
    # Exported, not only returned: MLflow's fluent API (the model logging's start_run) and any
    # process MLflow starts resolve the store themselves and must reach the same one.
    _REBASED_URI = rebased
    os.environ["MLFLOW_TRACKING_URI"] = rebased
    return rebased


def rebase_relative_uri(uri: str, root: Path) -> str | None:
    """`uri` with its relative local path taken in `root`, or None when it names no relative
    local path (an absolute path, a server, another database)."""
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        return None if path.startswith("/") or not path else f"sqlite:///{root / path}{sep}{query}"
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        return None if path.startswith("/") else (root / path).resolve().as_uri()
    if "://" in uri or uri.startswith(("databricks", "uc:")) or Path(uri).is_absolute():
        return None
    return str((root / uri).resolve())


def _artifact_location(client: MlflowClient, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: MLflow's default (./mlruns/<id> of the working
    directory, resolved when the store is opened) except in a DVC temp copy, whose ./mlruns goes
    with it: there <repo>/mlruns/<experiment name>, beside the default experiments' folders."""
    if _REBASED_URI is None or uri_of(client) != _REBASED_URI or not _REBASED_URI.startswith("sqlite:"):
        return None  # a file store (./mlruns) keeps its artifacts inside itself: already in the repository
    return (store_root() / "mlruns" / safe_name(experiment, "experiment")).as_uri()


# The experiment kind MLflow's UI reads to choose between its GenAI and its model-training views
# ("custom_model_development" is "Machine learning"; mlflow/demo sets "genai_development" the same way).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if new (tagged as a model-training experiment). Two
    queued trainings may create it at the same moment: the one that loses gets MLflow's
    RESOURCE_ALREADY_EXISTS and takes the winner's."""
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(client, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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


def is_refusal(e: BaseException) -> bool:
    """An answer that will not change on retry (4xx other than 429): the item can never be delivered."""
    if not isinstance(e, MlflowException) or "Max retries exceeded" in str(e):
        return False
    code = e.get_http_status_code()
    return 400 <= code < 500 and code != 429


def short_error(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:300]}"


def store_client() -> MlflowClient:
    """A client for MLflow's resolved store, without a reachability check (evaluate writes its
    outputs first and journals what the store does not take)."""
    return MlflowClient(tracking_uri())


@contextlib.contextmanager
def environ(**values: str):
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


def fail_fast_http():
    """For the reachability check: one try, 10 s, instead of MLflow's default 7 retries with backoff."""
    return environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


def connect() -> MlflowClient:
    """A client for the store, after proving it answers; a clear error naming the URI if not."""
    uri = tracking_uri()
    try:
        with fail_fast_http(), _store_open_lock(uri):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception as e:
        raise UserError(f"the MLflow tracking store {uri} is unreachable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Start it, or unset MLFLOW_TRACKING_URI "
                        "to use the local ./mlflow.db. Nothing was trained.") from None
    return client


def require_store_file(uri: str, hint: str) -> None:
    """A reading command on a SQLite store that isn't there: MLflow would create an empty one; say
    what is missing instead."""
    if db := missing_store_file(uri):
        raise UserError(f"no MLflow store at {db} ({uri}): {hint}")


def missing_store_file(uri: str) -> Path | None:
    """The file of a SQLite store that isn't there (MLflow's client would create an empty one), else None."""
    db = Path(uri.removeprefix("sqlite:///"))
    return db if uri.startswith("sqlite:///") and not db.is_file() else None


def uri_of(client: MlflowClient) -> str:
    """The URI a client talks to."""
    return getattr(client, "tracking_uri", None) or tracking_uri()

