"""Stage `train`: Adam or SGD, ReduceLROnPlateau, warm-up, on the split's training part, tracked in one MLflow run.

Reads params `model.*`, `train.*`, `tracking.*` and `data.md5`; paths come from dvc.yaml. The
body is cifarpipe.pipeline.train: load -> resume -> fit -> outputs.
"""
import contextlib
import os
import sys
from pathlib import Path

from cifarpipe.pipeline.stage import run_stage, stage_parser
from cifarpipe.tracking.job_process import JobProcess


def main() -> int:
    ap = stage_parser(__doc__.splitlines()[0])
    for name in ("--data", "--split", "--checkpoint-dir", "--weights", "--history", "--run-id", "--metrics"):
        ap.add_argument(name, type=Path, required=True)
    ap.add_argument("--tensorboard-dir", type=Path, default=Path("outputs/tensorboard"),
                    help="with tracking.tensorboard: event files go to <this>/<run name>_<run id>/")
    ap.add_argument("--params-in-force", type=Path, help="the values in force (the recipe applied), as YAML for "
                                                          "`dvc exp show` / `dvc params diff`")
    args = ap.parse_args()
    # Started before torch is imported: MLflow loads in that process, on the other core, meanwhile.
    # Under torchrun only rank 0 keeps the run.
    with JobProcess() if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext() as tracker:
        from cifarpipe.pipeline import train

        paths = train.TrainPaths(args.data, args.split, args.checkpoint_dir, args.weights, args.history, args.run_id,
                                 args.metrics, args.tensorboard_dir, args.params_in_force)
        return train.main(paths, Path(args.params), __file__, sys.argv[1:], tracker)


if __name__ == "__main__":
    run_stage(main)
