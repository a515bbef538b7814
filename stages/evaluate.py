"""Stage `evaluate`: test loss and accuracy, per-class table and confusion matrix, into the same MLflow run.

Reads params `evaluate.*`; paths come from dvc.yaml; the MLflow run id is the one `train` wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cifarpipe import atomic, checkpoint, data, engine, report, tracking
from cifarpipe.cli import run_stage, stage_parser
from cifarpipe.config import ModelParams, UserError, load_params
from cifarpipe.loader import DeviceBatches
from cifarpipe.models import build_model


def main() -> None:
    ap = stage_parser(__doc__.splitlines()[0])
    for name in ("--data", "--weights", "--run-id", "--metrics", "--per-class", "--confusion", "--confusion-png"):
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

    run_id = args.run_id.read_text().strip()
    tracker = tracking.Tracker(client, run_id)
    tracker.log_metrics({"test_loss": result.loss, "test_accuracy": result.accuracy})
    tracking.log_datasets(client, run_id, [tracking.dataset_input("test", params.data.url, params.data.md5,
                                                                  len(arrays.test_labels))])
    if params.tracking.registered_model:  # the version train registered from this run
        tracking.tag_model_versions(client, params.tracking.registered_model, run_id,
                                    {"test_accuracy": round(result.accuracy, 4)})
    for path in (args.metrics, args.per_class, args.confusion_png):
        tracker.log_artifact(path, "evaluation")
    tracker.finish("FINISHED")

    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"test accuracy {result.accuracy:.4f}, test loss {result.loss:.4f} -> {args.metrics}; "
          f"logged to MLflow run {run_id}")


if __name__ == "__main__":
    run_stage(main)
