"""The run's model card (cifarpipe.model_card) fed from its MLflow record and published: artifact
`model_card.md` of the run and of its MLflow model, and, with a registered model, the description
of the run's version, which is registered here if it is not yet (with the @champion rule of
tracking.registry).

Published when train delivers its model (no test results yet) and again when evaluate's results
reach the training run (with the test accuracy and the per-class table).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from cifarpipe import model_card
from cifarpipe.tracking import registry
from cifarpipe.tracking.in_force import params_in_force

CARD_FILE = "model_card.md"


def facts(client: MlflowClient, run_id: str, classes: list[str], evaluation: dict[str, Any] | None = None,
          registered: str | None = None) -> model_card.CardFacts:
    """The card's facts from run `run_id`'s record (params in force, tags, dataset inputs, per-epoch
    validation metrics) and `evaluation` (test_accuracy, test_loss, n_test, per_class rows), if
    there is one."""
    run = client.get_run(run_id)
    sizes, digests = {}, {}
    for inp in run.inputs.dataset_inputs:
        context = next((t.value for t in inp.tags if t.key == "mlflow.data.context"), None)
        if context:
            digests[context] = inp.dataset.digest
            try:
                sizes[context] = int(json.loads(inp.dataset.profile or "{}").get("num_images", 0)) or None
            except (ValueError, TypeError):
                pass
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in ("val_accuracy", "val_loss")}
    validation = [(step, acc, history["val_loss"].get(step, float("nan")))
                  for step, acc in sorted(history["val_accuracy"].items())]
    test = None
    if evaluation:
        test = {k: float(evaluation["metrics"][k]) for k in ("test_accuracy", "test_loss")}
        if evaluation.get("n_test"):
            sizes["test"] = int(evaluation["n_test"])
    return model_card.CardFacts(
        run_id=run_id, run_name=run.info.run_name or run_id[:8], tags=dict(run.data.tags),
        params=params_in_force(dict(run.data.params), dict(run.data.tags)),  # a continued run's changed params too
        classes=classes, sizes={k: v for k, v in sizes.items() if v}, digests=digests, validation=validation,
        test=test, per_class=(evaluation or {}).get("per_class"), registered=registered)


def publish(client: MlflowClient, run_id: str, model_uri: str, registered_model: str, classes: list[str],
            evaluation: dict[str, Any] | None = None, log=print, strict: bool = False) -> str | None:
    """Register the run's model as a version of `registered_model` ("" = off; once per run, then the
    @champion rule), write its card and publish it (module docstring). Returns the version. A
    failing store call is said on stderr and the rest goes on (`strict`: the error is raised
    instead, for a delivery that must stay pending until everything is done); evaluate's delivery
    publishes the card again, with the test results."""
    version = None
    if registered_model:
        metrics = client.get_run(run_id).data.metrics  # the registered weights' (evaluate.weights), else the last epoch's
        val = metrics.get("model_val_accuracy", metrics.get("val_accuracy"))
        version = registry.register_model_version(
            client, registered_model, run_id, model_uri, strict=strict,
            tags={registry.VAL_ACCURACY_TAG: round(val, 4)} if val is not None else None)
        if version is None:
            return None
        decision = registry.update_champion(client, registered_model, version, strict=strict)
        if decision and evaluation is None:
            log(f"registered version {version} of {registered_model}: {decision}")
    text = model_card.render(facts(client, run_id, classes, evaluation,
                                   f"{registered_model} version {version}" if version else None))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CARD_FILE
            path.write_text(text)
            client.log_artifact(run_id, str(path))
            model_id = model_uri.removeprefix("models:/")
            if model_id != model_uri and "/" not in model_id:
                client.log_model_artifact(model_id, str(path))
        if version:
            client.update_model_version(registered_model, version, description=text)
    except Exception as e:
        if strict:
            raise
        print(f"warning: could not publish the model card of run {run_id} ({type(e).__name__}: {e})", file=sys.stderr)
    return version
