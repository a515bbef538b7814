"""Entry point of `mlflow run .`: the DVC pipeline as a DVC experiment, inside the run MLflow created.

MLflow sets MLFLOW_RUN_ID for this process; the train and evaluate stages log into that run.
Overrides become `dvc exp run -S` settings, so they land in params.yaml, in the DVC experiment
record (`dvc exp show`) and in the MLflow run's params. Train and evaluate are always rerun
(`--force --downstream train`): a cached result would leave the new MLflow run empty.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

OVERRIDES = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.optimizer.lr",
             "model": "model.name", "seed": "train.seed"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in OVERRIDES:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, default="")
    args = ap.parse_args()
    missing = [m for m in ("torch", "cifarpipe", "dvc", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        # MLflow's default env manager builds a bare virtualenv: the stages would fail one by one.
        print(f"error: this environment lacks {', '.join(missing)}. Run the project in the environment "
              "`make setup` built: `source .venv/bin/activate`, then `mlflow run . --env-manager local`.",
              file=sys.stderr)
        return 2
    sets = [f"{OVERRIDES[k]}={v}" for k, v in vars(args).items() if v != ""]
    if "MLFLOW_RUN_ID" not in os.environ:
        print("note: MLFLOW_RUN_ID is not set; the train stage will create its own MLflow run", file=sys.stderr)
    steps = [
        ["dvc", "repro", "split"],  # data stages: cached after the first time
        ["dvc", "exp", "run", *[a for s in sets for a in ("-S", s)], "--force", "--downstream", "train"],
    ]
    for cmd in steps:
        print("+ " + " ".join(cmd), flush=True)
        code = subprocess.call(cmd)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
