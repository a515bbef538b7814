"""Stage `evaluate`: test loss and accuracy, per-class table and confusion matrix, into the training's MLflow run.

Reads params `evaluate.*`; paths come from dvc.yaml; the MLflow run id is the one `train` wrote.
The body is cifarpipe.pipeline.evaluate.
"""
from pathlib import Path

from cifarpipe.pipeline.stage import run_stage, stage_parser
from cifarpipe.tracking.delivery_process import DeliveryProcess

NAMES = ("--data", "--weights", "--run-id", "--metrics", "--per-class", "--confusion", "--confusion-png",
         "--mistakes-png")


def main() -> int:
    ap = stage_parser(__doc__.splitlines()[0])
    for name in NAMES:
        ap.add_argument(name, type=Path, required=True)
    args = ap.parse_args()
    # Started before torch is imported: MLflow loads in that process, on the other core, meanwhile.
    with DeliveryProcess() as delivery:
        from cifarpipe.pipeline import evaluate

        paths = evaluate.EvaluatePaths(*(getattr(args, n[2:].replace("-", "_")) for n in NAMES))
        return evaluate.main(paths, Path(args.params), delivery)


if __name__ == "__main__":
    run_stage(main)
