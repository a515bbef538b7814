"""Stage `evaluate`: test loss and accuracy, per-class table and confusion matrix, into the training's MLflow run.

Reads params `evaluate.*`; paths come from dvc.yaml; the MLflow run id is the one `train` wrote.
The outputs are written first, then MLflow gets them through the pending-deliveries journal
(outputs/mlflow_pending.json), together with whatever `train` could not deliver. If the store does
not take everything, the stage exits 3 with one line: DVC then reruns it (seconds) on the next
`dvc repro`, which delivers the rest. If the training run was logged with other `evaluate.*`
params, the evaluation goes into a run of its own nested under it (see tracking.deliver).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from cifarpipe import atomic, checkpoint, data, engine, faults, report, tracking
from cifarpipe.cli import run_stage, stage_parser
from cifarpipe.config import ModelParams, UserError, flatten, load_params
from cifarpipe.loader import DeviceBatches
from cifarpipe.models import build_model

STORE_PENDING_EXIT = 3  # outputs written, MLflow deliveries pending: a failure DVC reruns, not a user error

@torch.no_grad()
def predicted_confidence(model: torch.nn.Module, batches: DeviceBatches, predictions: np.ndarray, amp: bool,
                         tta_flip: bool) -> np.ndarray:
    """Softmax probability of each image's predicted class, from the same logits as engine.evaluate."""
    model.eval()
    probs = [torch.softmax(engine.eval_logits(model, x, amp=amp, tta_flip=tta_flip), 1).cpu()
             for x, _ in batches.epoch(0)]
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, 1), np.float32)
    return probs[np.arange(len(predictions)), predictions]


def main() -> int:
    ap = stage_parser(__doc__.splitlines()[0])
    for name in ("--data", "--weights", "--run-id", "--metrics", "--per-class", "--confusion", "--confusion-png",
                 "--mistakes-png"):
        ap.add_argument(name, type=Path, required=True)
    args = ap.parse_args()
    params = load_params(args.params)
    device = engine.pick_device(params.train.device)
    journal = tracking.Pending(tracking.journal_path(args.run_id))

    arrays = data.load_arrays(args.data)
    try:
        weights = checkpoint.load(args.weights)
    except FileNotFoundError:
        raise UserError(f"{args.weights}: not found; run the train stage first") from None
    model = build_model(ModelParams(**weights["model"])).to(device)
    model.load_state_dict(weights["state_dict"])
    batches = DeviceBatches(torch.from_numpy(arrays.test_images).to(device), torch.from_numpy(arrays.test_labels),
                            params.evaluate.batch_size, weights["mean"], weights["std"], augment=None, shuffle=False)
    result = engine.evaluate(model, batches.epoch(0), amp=engine.amp_enabled(params.train.amp, device),
                             tta_flip=params.evaluate.tta_flip)

    # ---- the outputs, each written atomically, before any MLflow call
    classes = weights["classes"]
    cm = report.confusion_matrix(arrays.test_labels, result.predictions, len(classes))
    table = report.per_class_table(cm, classes)
    metrics = {"accuracy": result.accuracy, "loss": result.loss, "n_test": int(len(arrays.test_labels)),
               "per_class_accuracy": dict(zip(classes, table["accuracy"].round(4).tolist()))}
    atomic.write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    report.write_csv(table, args.per_class)
    faults.hit("evaluate", 0)  # the tests' SIGKILL with some outputs written, others not
    report.write_csv(report.confusion_long(arrays.test_labels, result.predictions, classes), args.confusion)
    report.confusion_png(cm, classes, args.confusion_png,
                         f"{weights['model']['name']}: test accuracy {result.accuracy:.2%} ({len(arrays.test_labels)} images)")

    # Confidences only for the misclassified images: a second, small pass (about 40 % of the test set).
    wrong = np.flatnonzero(result.predictions != arrays.test_labels)
    confidences = np.full(len(arrays.test_labels), np.nan)
    confidences[wrong] = predicted_confidence(
        model, DeviceBatches(torch.from_numpy(arrays.test_images[wrong]).to(device),
                             torch.from_numpy(arrays.test_labels[wrong]), params.evaluate.batch_size,
                             weights["mean"], weights["std"], augment=None, shuffle=False),
        result.predictions[wrong], engine.amp_enabled(params.train.amp, device), params.evaluate.tta_flip)
    report.mistakes_png(arrays.test_images, arrays.test_labels, result.predictions, confidences, classes,
                        args.mistakes_png, f"{weights['model']['name']}: the most confidently misclassified "
                        f"test images ({len(wrong)} of {len(arrays.test_labels)} wrong)")

    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"test accuracy {result.accuracy:.4f}, test loss {result.loss:.4f} -> {args.metrics}")

    # ---- MLflow: train's pending items first (same run, in order), then this evaluation
    run_id = args.run_id.read_text().strip()
    journal.add_evaluation(run_id, flatten(params), {"test_loss": result.loss, "test_accuracy": result.accuracy},
                           [args.metrics, args.per_class, args.confusion_png, args.mistakes_png],
                           n_test=len(arrays.test_labels))
    left = tracking.deliver(tracking.client(), journal, log=lambda msg: None)
    if left:
        error = next(iter(journal.errors.values()), "")
        print(f"error: MLflow store {tracking.tracking_uri()} unreachable ({error}): outputs written, {left} item(s) "
              f"pending in {journal.path}; run `dvc repro` when it answers", file=sys.stderr)
        return STORE_PENDING_EXIT
    print(f"logged to MLflow ({tracking.tracking_uri()}), training run {run_id}")
    return 0


if __name__ == "__main__":
    run_stage(main)
