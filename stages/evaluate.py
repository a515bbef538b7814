"""Stage `evaluate`: test loss and accuracy, per-class table and confusion matrix, into the same MLflow run.

Reads params `evaluate.*`; paths come from dvc.yaml; the MLflow run id is the one `train` wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cifarpipe import atomic, checkpoint, data, engine, report, tracking
from cifarpipe.cli import run_stage, stage_parser
from cifarpipe.config import ModelParams, UserError, load_params
from cifarpipe.loader import DeviceBatches
from cifarpipe.models import build_model


@torch.no_grad()
def predicted_confidence(model: torch.nn.Module, batches: DeviceBatches, predictions: np.ndarray, amp: bool,
                         tta_flip: bool) -> np.ndarray:
    """Softmax probability of each image's predicted class, the same forward pass as engine.evaluate."""
    device = next(model.parameters()).device
    model.eval()
    probs = []
    for x, _ in batches.epoch(0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            if tta_flip:
                logits = (logits + model(x.flip(3))) / 2
        probs.append(torch.softmax(logits.float(), 1).cpu())
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, 1), np.float32)
    return probs[np.arange(len(predictions)), predictions]


def main() -> None:
    ap = stage_parser(__doc__.splitlines()[0])
    for name in ("--data", "--weights", "--run-id", "--metrics", "--per-class", "--confusion", "--confusion-png",
                 "--mistakes-png"):
        ap.add_argument(name, type=Path, required=True)
    args = ap.parse_args()
    params = load_params(args.params)
    client = tracking.connect()
    device = engine.pick_device(params.train.device)

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

    classes = weights["classes"]
    cm = report.confusion_matrix(arrays.test_labels, result.predictions, len(classes))
    table = report.per_class_table(cm, classes)
    metrics = {"accuracy": result.accuracy, "loss": result.loss, "n_test": int(len(arrays.test_labels)),
               "per_class_accuracy": dict(zip(classes, table["accuracy"].round(4).tolist()))}
    atomic.write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    report.write_csv(table, args.per_class)
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

    run_id = args.run_id.read_text().strip()
    tracker = tracking.Tracker(client, run_id)
    tracker.log_metrics({"test_loss": result.loss, "test_accuracy": result.accuracy})
    for path in (args.metrics, args.per_class, args.confusion_png, args.mistakes_png):
        tracker.log_artifact(path, "evaluation")
    tracker.finish("FINISHED")

    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"test accuracy {result.accuracy:.4f}, test loss {result.loss:.4f} -> {args.metrics}; "
          f"logged to MLflow run {run_id}")


if __name__ == "__main__":
    run_stage(main)
