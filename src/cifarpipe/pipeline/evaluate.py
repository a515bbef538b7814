"""The evaluate stage's body: test loss and accuracy, per-class table, confusion matrix and the
most confident mistakes, written first, then delivered into the training's MLflow run.

The outputs are written atomically before any MLflow call. MLflow gets them through the journal
of pending deliveries (outputs/mlflow_pending.json), together with whatever `train` could not
deliver. If the store does not take everything, the stage exits 3 with one line: DVC then reruns
it (seconds) on the next `dvc repro`, which delivers the rest. If the training run was logged
with other `evaluate.*` params, the evaluation goes into a run of its own nested under it (see
tracking.delivery).

MLflow never loads in this process: the stage script starts tracking.delivery_process before
it imports torch, and that process imports MLflow and opens the store on the other core (2-3 s on
a 2-core CPU) while this one loads torch and the test images and runs the model.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarpipe import atomic, faults, report
from cifarpipe.config import ModelParams, Params, UserError, flatten, load_params
from cifarpipe.data import archive
from cifarpipe.data.batches import DeviceBatches
from cifarpipe.pipeline.phases import Phases
from cifarpipe.tracking.delivery_process import DeliveryFailed, DeliveryProcess
from cifarpipe.tracking.journal import Journal, journal_path
from cifarpipe.training import checkpoint, engine
from cifarpipe.training.models import build_model

STORE_PENDING_EXIT = 3  # outputs written, MLflow deliveries pending: a failure DVC reruns, not a user error


@dataclass(frozen=True)
class EvaluatePaths:
    data: Path
    weights: Path
    run_id: Path
    metrics: Path
    per_class: Path
    confusion: Path
    confusion_png: Path
    mistakes_png: Path


def main(paths: EvaluatePaths, params_path: Path, delivery: DeliveryProcess) -> int:
    """The stage; `delivery`, started before this module's imports, has MLflow loaded by the time
    the outputs are written."""
    phases = Phases("evaluate")
    params = load_params(params_path)
    device = engine.pick_device(params.train.device)
    journal = Journal(journal_path(paths.run_id))  # an unreadable journal stops the stage before any work
    test_x, test_y, weights, result = evaluate_test_set(paths, params, device)
    phases.lap("load and evaluate")
    per_class = write_reports(paths, weights, test_x, test_y, result, phases)

    # ---- MLflow: train's pending items first (same run, in order), then this evaluation
    return log_evaluation(paths, params, result, len(test_y), journal, delivery, phases, per_class)


def evaluate_test_set(paths: EvaluatePaths, params: Params, device: torch.device
                      ) -> tuple[np.ndarray, np.ndarray, dict, engine.EvalResult]:
    """The test images and labels, the weights file's dict, and the model's result on them (with
    each prediction's confidence), in one pass."""
    test_x, test_y, _ = archive.load_part(paths.data, "test")
    try:
        weights = checkpoint.load(paths.weights)
    except FileNotFoundError:
        raise UserError(f"{paths.weights}: not found; run the train stage first") from None
    if weights.get("weights", params.evaluate.weights) != params.evaluate.weights:  # the train stage decides
        raise UserError(f"{paths.weights} holds the {weights['weights']} weights, params.yaml asks for "
                        f"evaluate.weights = {params.evaluate.weights}: run the train stage (`dvc repro`), which "
                        "writes them from the job's checkpoints")
    model_params = ModelParams(**weights["model"])
    model = build_model(model_params).to(device)
    model.load_state_dict(weights["state_dict"])
    tta = engine.views_for(model_params.tta, params.evaluate.tta_flip)  # the model's own views, as predict uses
    # a copy in memory: torch must not alias the file's read-only memory map (31 MB, milliseconds)
    batches = DeviceBatches(torch.from_numpy(np.array(test_x)).to(device), torch.from_numpy(test_y),
                            params.evaluate.batch_size, weights["mean"], weights["std"], augment=None, shuffle=False)
    result = engine.evaluate(model, batches.epoch(0), amp=engine.amp_enabled(params.train.amp, device), tta=tta,
                             confidences=True)
    return test_x, test_y, weights, result


def write_reports(paths: EvaluatePaths, weights: dict, test_x: np.ndarray, test_y: np.ndarray,
                  result: engine.EvalResult, phases: Phases) -> list[dict]:
    """The metrics, tables and pictures, each written atomically, before any MLflow call; returns
    the per-class table's rows (for the model card)."""
    classes = weights["classes"]
    cm = report.confusion_matrix(test_y, result.predictions, len(classes))
    table = report.per_class_table(cm, classes)
    metrics = {"accuracy": result.accuracy, "loss": result.loss, "n_test": int(len(test_y)),
               "weights_epoch": weights.get("epoch"),  # None: a weights file that does not say
               "per_class_accuracy": dict(zip(classes, table["accuracy"].round(4).tolist()))}
    atomic.write_text(paths.metrics, json.dumps(metrics, indent=2) + "\n")
    report.write_csv(table, paths.per_class)
    faults.hit("evaluate", 0)  # the tests' SIGKILL with some outputs written, others not
    report.write_csv(report.confusion_long(test_y, result.predictions, classes), paths.confusion)
    phases.lap("tables")
    name = weights["model"]["name"]
    report.confusion_png(cm, classes, paths.confusion_png,
                         f"{name}: test accuracy {result.accuracy:.2%} ({len(test_y)} images)")
    wrong = int((result.predictions != test_y).sum())
    report.mistakes_png(test_x, test_y, result.predictions, result.confidences, classes, paths.mistakes_png,
                        f"{name}: the most confidently misclassified test images ({wrong} of {len(test_y)} wrong)")
    phases.lap("pictures")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    which = f" of the {weights['weights']} weights (epoch {weights['epoch']})" if "epoch" in weights else ""
    print(f"test accuracy{which} {result.accuracy:.4f}, test loss {result.loss:.4f} -> {paths.metrics}")
    return table.to_dict("records")


def log_evaluation(paths: EvaluatePaths, params: Params, result: engine.EvalResult, n_test: int,
                   journal: Journal, delivery: DeliveryProcess, phases: Phases,
                   per_class: list[dict] | None = None) -> int:
    """Journal the evaluation and have `delivery` deliver it into the training's MLflow run (or its
    nested evaluation run); the stage's exit status. Says "logged" only for what the store took: a
    store file that is gone, a deleted run or a dropped evaluation stops the stage (DVC then records
    nothing) naming where the results are, and an unreachable store leaves it pending
    (STORE_PENDING_EXIT). `per_class`: the per-class table's rows, for the model card."""
    run_id = paths.run_id.read_text().strip()
    outputs = [paths.metrics, paths.per_class, paths.confusion_png, paths.mistakes_png]
    journal.add_evaluation(run_id, flatten(params), {"test_loss": result.loss, "test_accuracy": result.accuracy,
                                                     **phases.metrics()}, outputs, n_test=n_test,
                           per_class=per_class)
    where = f"its results are in {', '.join(str(p) for p in outputs)}, and it waits in {journal.path}"
    try:
        answer = delivery.deliver(journal.path, run_id)
    except DeliveryFailed as e:  # killed: pending like an outage; an error of its own: a failure as any other
        print(f"error: {e}: outputs written, {where}; " + ("run `dvc repro` to deliver it" if e.killed else
                                                             "mend that, then run `dvc repro`"), file=sys.stderr)
        return STORE_PENDING_EXIT if e.killed else 1
    phases.background["store client"] = answer.ready_seconds
    phases.lap("deliver")
    print(phases.report(), flush=True)
    uri = answer.uri
    if answer.missing_store:  # MLflow would have created an empty store there and dropped the evaluation
        raise UserError(f"no MLflow store at {answer.missing_store} ({uri}): training run {run_id} ({paths.run_id}) "
                        f"was logged to a store there, which was moved or deleted. Nothing was logged: {where}. Put "
                        "the store back and run `dvc repro`")
    if answer.deleted:
        raise UserError(f"MLflow run {run_id} ({paths.run_id}) is deleted in {uri}, so its evaluation was not logged: "
                        f"{where}. Restore it (`mlflow runs restore --run-id {run_id}`) and run `dvc repro`, or "
                        "train again (`dvc repro --force train`)")
    if answer.dropped is not None:
        raise UserError(f"MLflow did not take the evaluation of run {run_id} ({answer.dropped}): nothing of it was "
                        f"logged; its results are in {', '.join(str(p) for p in outputs)}")
    if answer.left:
        print(f"error: MLflow store {uri} unreachable ({answer.error}): outputs written, {answer.left} item(s) "
              f"pending in {journal.path}; run `dvc repro` when it answers", file=sys.stderr)
        return STORE_PENDING_EXIT
    target, versions = answer.delivered_to, answer.versions
    print(f"logged to MLflow ({uri}): " + (f"training run {run_id}" if target == run_id else
                                          f"run {target}, nested under training run {run_id} (other evaluate params)")
          + (f"; test_accuracy tagged on version {', '.join(map(str, versions))} of "
             f"{params.tracking.registered_model!r}" if versions else ""))
    return 0
