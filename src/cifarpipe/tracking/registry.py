"""The model registry: each finished run's model as a version of `tracking.registered_model`."""
from __future__ import annotations

import json
import sys
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

def run_versions(client: MlflowClient, name: str, run_id: str) -> list:
    """The versions of registered model `name` made from run `run_id`. The filter holds the run id
    only (32 hex digits) and the name is compared here: MLflow allows names with quotes ("Bob's
    model"), which inside a filter string broke its syntax and every registration with it."""
    return [mv for mv in client.search_model_versions(f"run_id = '{run_id}'") if mv.name == name]


def register_model_version(client: MlflowClient, name: str, run_id: str, model_uri: str, strict: bool = False
                           ) -> str | None:
    """Register the run's logged model as a version of `name` (created if new); once per run: a
    second call returns the run's existing version. Returns the version, None if it failed (with a
    warning; `strict`: the error is raised instead)."""
    try:
        for mv in run_versions(client, name, run_id):
            return mv.version
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # MLflow 3's log_model returns models:/<model_id>: the version links to that logged model.
        rest = model_uri.removeprefix("models:/")
        model_id = rest if rest != model_uri and "/" not in rest else None
        mv = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
        if model_id:  # as mlflow.register_model does: the logged model's page links to its versions
            linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
                linked + [{"name": mv.name, "version": mv.version}])})
        return mv.version
    except Exception as e:
        if strict:
            raise
        print(f"warning: could not register the model as a version of {name!r} ({type(e).__name__}: {e})",
              file=sys.stderr)
        return None


def tag_model_versions(client: MlflowClient, name: str, run_id: str, tags: dict[str, Any], strict: bool = False
                       ) -> list[str]:
    """Tag the versions of `name` registered from `run_id` (evaluate's test accuracy); the versions
    tagged (with a warning if it failed; `strict`: the error is raised instead)."""
    try:
        versions = [mv.version for mv in run_versions(client, name, run_id)]
        for version in versions:
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, str(value))
        return versions
    except Exception as e:
        if strict:
            raise
        print(f"warning: could not tag the registered model {name!r} ({type(e).__name__}: {e})", file=sys.stderr)
        return []

