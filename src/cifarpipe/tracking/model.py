"""The run's MLflow model: logged from the weights file, found again, loaded.

The model is the whole inference path (cifarpipe.serving): uint8 images (N, 32, 32, 3) in, class
names and probabilities out, with the weights file as its one artifact and this package as its code.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cifarpipe.config import UserError
from cifarpipe.tracking.store import fail_fast_http, require_store_file, short_error, tracking_uri

MODEL_NAME = "model"  # the artifact name of every run's model (runs:/<id>/model)
# Its LoggedModel's model_type: `model_type = 'classifier'` lists the runs' models in a search or in
# the UI's Models tab, apart from the epochs' `checkpoint` models (tracking/checkpoints.py).
MODEL_TYPE = "classifier"
# The model's pip requirements: what its inference path imports, at the versions that logged it.
_REQUIREMENTS = ("torch", "numpy", "pandas", "pydantic", "pyyaml")


def log_model(run_id: str, weights: Path, input_example: np.ndarray, step: int = 0) -> str:
    """Log run `run_id`'s MLflow model from `weights` with `input_example` (uint8 images) as its
    example and, with its output, its signature; returns the model's URI (models:/<model id>).
    `step`: the epoch whose weights these are. The model is linked to the run at that step, and
    MLflow copies the run's metrics of that step onto it (its validation accuracy and loss).

    Two checks MLflow runs while logging are skipped, for 2.3 s of the 2.8 s the call took (2-core
    CPU, cProfile): the comparison of the model's pip requirements with the environment (it maps
    every installed package's files to modules, 1.9 s; our requirements are read from this same
    environment), and the serving-input check (it loads the model and predicts the example, 0.4 s;
    the tests serve and predict with the logged model through `mlflow models predict/serve`)."""
    import cifarpipe
    from cifarpipe.serving import pyfunc
    from cifarpipe.training import checkpoint

    example = np.ascontiguousarray(input_example, dtype=np.uint8)
    signature = pyfunc.signature(example, checkpoint.load(Path(weights))["classes"])
    versions = {name: importlib.metadata.version(name) for name in _REQUIREMENTS}
    with tempfile.TemporaryDirectory() as tmp, _skipped_checks():
        # The package's sources only: no bytecode caches or temporaries in the model.
        package = Path(tmp) / "cifarpipe"
        shutil.copytree(Path(cifarpipe.__file__).parent, package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        # The run as MLflow's active run: the LoggedModel goes to the run's experiment. Leaving the
        # block marks the run FINISHED; the journal's status item for the run comes after the model.
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(name=MODEL_NAME, model_type=MODEL_TYPE,
                                           python_model=str(package / "serving" / "mlflow_model.py"),
                                           artifacts={pyfunc.WEIGHTS_ARTIFACT: str(weights)},
                                           model_config={"device": "cpu"},  # a loader may override it
                                           code_paths=[str(package)], signature=signature, input_example=example,
                                           metadata={"input": pyfunc.INPUT},  # the signature has no input schema
                                           pip_requirements=[f"{n}=={v}" for n, v in versions.items()], step=step)
    return info.model_uri


# The two checks log_model skips: (module, function) that MLflow 3.17 calls while logging.
_CHECKS = (("mlflow.utils.environment", "warn_dependency_requirement_mismatches"),
           ("mlflow.models.utils", "_validate_serving_input"))


@contextlib.contextmanager
def _skipped_checks() -> Iterator[None]:
    """The checks of log_model's docstring replaced by no-ops for the block, MLflow's own functions
    again after it. A check another MLflow version lacks is simply not there to skip."""
    import importlib

    saved = []
    for module_name, name in _CHECKS:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for module, name, check in saved:
            setattr(module, name, check)


def run_models(client: MlflowClient, run_id: str) -> list:
    """The models named MODEL_NAME that run `run_id` logged (READY or left PENDING/FAILED by an outage)."""
    exp_id = client.get_run(run_id).info.experiment_id
    return [m for m in client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'")
            if m.name == MODEL_NAME]


def logged_model_uri(client: MlflowClient, run_id: str) -> str | None:
    """The model this run already logged (MLflow 3 keeps models as LoggedModels), or None."""
    return next((m.model_uri for m in run_models(client, run_id) if m.status == LoggedModelStatus.READY), None)


def log_model_once(client: MlflowClient, run_id: str, weights: Path, input_example: np.ndarray, step: int = 0) -> None:
    """Log the model unless the run has it. A model whose upload an outage cut off stays behind
    as PENDING or FAILED: delete it, so the run ends with exactly one model."""
    models = run_models(client, run_id)
    if any(m.status == LoggedModelStatus.READY for m in models):
        return
    for m in models:
        client.delete_logged_model(m.model_id)
    log_model(run_id, weights, input_example, step)


def load_model(uri: str):
    """The MLflow model at `uri` (runs:/<id>/model, models:/<name>@<alias>, models:/<name>/<version>, a
    folder) as pyfunc, predicting on the CPU. UserError, with the URI, for a missing store, run, model or version."""
    store = tracking_uri()
    if uri.startswith(("runs:/", "models:/")):
        require_store_file(store, "run this command in the repository root, or set MLFLOW_TRACKING_URI")
    try:
        with fail_fast_http():
            return mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    except Exception as e:
        raise UserError(f"could not load the MLflow model {uri} from {store} ({short_error(e)})") from None
