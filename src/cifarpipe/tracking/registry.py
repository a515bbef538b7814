"""The model registry: each finished run's model as a version of `tracking.registered_model`, its
model card as the version's description, and the `@champion` alias.

The alias rule: a new version becomes `@champion` when its validation accuracy (tag `val_accuracy`:
the registered weights', the run's `model_val_accuracy`) is higher than the current champion's, or
when there is no champion yet; otherwise the alias stays. A champion moved by hand is respected:
the next version has to beat it. The rule runs once per version (tag `champion_rule` records the
decision), so a run registered again never moves the alias. The newest version needs no alias:
`models:/<name>/latest` is MLflow's own (and `latest` may not be an alias name).
"""
from __future__ import annotations

import json
import sys
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

CHAMPION = "champion"
VAL_ACCURACY_TAG = "val_accuracy"
CHAMPION_RULE_TAG = "champion_rule"


def run_versions(client: MlflowClient, name: str, run_id: str) -> list:
    """The versions of registered model `name` made from run `run_id`. The filter holds the run id
    only (32 hex digits) and the name is compared here: MLflow allows names with quotes ("Bob's
    model"), which inside a filter string broke its syntax and every registration with it."""
    return [mv for mv in client.search_model_versions(f"run_id = '{run_id}'") if mv.name == name]


def register_model_version(client: MlflowClient, name: str, run_id: str, model_uri: str,
                           tags: dict[str, Any] | None = None, strict: bool = False) -> str | None:
    """Register the run's logged model as a version of `name` (created if new), tagged with `tags`;
    once per run: a second call returns the run's existing version. Returns the version, None if
    it failed (with a warning; `strict`: the error is raised instead)."""
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
        mv = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id,
                                         tags={k: str(v) for k, v in (tags or {}).items()})
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


def version_val_accuracy(client: MlflowClient, name: str, version: str) -> float | None:
    """A version's validation accuracy: its tag, else (a version registered without it) its run's
    `model_val_accuracy` (its weights'), else the run's last `val_accuracy`; None if none exists."""
    mv = client.get_model_version(name, version)
    if VAL_ACCURACY_TAG in mv.tags:
        return float(mv.tags[VAL_ACCURACY_TAG])
    if mv.run_id:
        metrics = client.get_run(mv.run_id).data.metrics
        value = metrics.get("model_val_accuracy", metrics.get("val_accuracy"))
        return None if value is None else float(value)
    return None


def update_champion(client: MlflowClient, name: str, version: str, strict: bool = False) -> str | None:
    """Apply the alias rule (module docstring) to `version`, once; returns what was decided (also
    its tag `champion_rule`), None if the store failed (said on stderr; `strict`: raised instead)."""
    try:
        mv = client.get_model_version(name, version)
        if CHAMPION_RULE_TAG in mv.tags:
            return mv.tags[CHAMPION_RULE_TAG]
        new = version_val_accuracy(client, name, version)
        current = client.get_registered_model(name).aliases.get(CHAMPION)
        old = version_val_accuracy(client, name, str(current)) if current is not None else None
        move = new is not None and (current is None or (old is not None and new > old))
        if new is None:
            decision = f"@{CHAMPION} not moved: version {version} has no validation accuracy"
        elif current is None:
            decision = f"@{CHAMPION} -> version {version} (validation accuracy {new:.4f}; no champion before)"
        elif old is None:
            decision = f"@{CHAMPION} stays on version {current}: it has no validation accuracy to compare with"
        elif move:
            decision = (f"@{CHAMPION} -> version {version} (validation accuracy {new:.4f} > version {current}'s "
                        f"{old:.4f})")
        else:
            decision = (f"@{CHAMPION} stays on version {current} (validation accuracy {old:.4f} >= version "
                        f"{version}'s {new:.4f})")
        if move:
            client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, CHAMPION_RULE_TAG, decision)
        return decision
    except Exception as e:
        if strict:
            raise
        print(f"warning: could not apply the @{CHAMPION} rule to version {version} of {name!r} "
              f"({type(e).__name__}: {e})", file=sys.stderr)
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
