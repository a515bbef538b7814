"""Entry point of `mlflow run .`: the DVC pipeline as a DVC experiment, inside the run MLflow created.

MLflow sets MLFLOW_RUN_ID for this process; the train and evaluate stages log into that run.
The recipe (recipes/<name>.yaml, default course) and the overrides become `dvc exp run -S`
settings, so they land in params.yaml, in the DVC experiment record (`dvc exp show`) and in the
MLflow run's params (the values in force). Train and evaluate are always rerun
(`--force --downstream train`): a cached result would leave the new MLflow run empty.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.optimizer.lr",
             "optimizer": "train.optimizer.name", "model": "model.name", "seed": "train.seed"}


def settings(recipe: str, values: dict[str, str]) -> list[str]:
    """The `dvc exp run -S` settings: the recipe, then each non-empty key, validated first (before
    any DVC command) against params.yaml and the recipe. A key the recipe sets is refused: the
    recipe's value would replace it (recipes win over params.yaml), so it would be silently lost."""
    from cifarpipe.config import UserError, load_params, read_recipe, with_overrides

    sets = [f"{OVERRIDES[k]}={v}" for k, v in values.items() if v != ""]
    params = load_params(REPO / "params.yaml", recipe=recipe)  # an unknown recipe lists the valid ones
    fixed = read_recipe(recipe, REPO / "recipes")
    clash = [f"-P {k}={v} (the recipe sets {OVERRIDES[k]}={fixed[OVERRIDES[k]]})"
             for k, v in values.items() if v != "" and OVERRIDES[k] in fixed]
    if clash:
        raise UserError(f"recipe {recipe!r} sets what {', '.join(clash)} would change; its value would win. "
                        f"Drop the -P, or copy recipes/{recipe}.yaml to a recipe of your own with the new value")
    with_overrides(params, sets, "-P")  # a wrong value stops here, naming the parameter
    return [f"recipe={recipe}", *sets]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="course", help="recipes/<name>.yaml (course, sgd, fast, gpu, air)")
    for name in OVERRIDES:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, default="")
    args = ap.parse_args()
    missing = [m for m in ("torch", "pydantic", "dvc", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        # Only an environment built without python_env.yaml gets here: the stages would fail one by one.
        print(f"error: this environment lacks {', '.join(missing)}. `mlflow run .` builds the project's "
              "environment from python_env.yaml; inside the project's own venv use `mlflow run . --env-manager local`.",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "src"))  # the checkout's library, as its stages will use (PYTHONPATH below)
    from cifarpipe.config import UserError

    values = {k: v for k, v in vars(args).items() if k != "recipe"}
    try:
        sets = settings(args.recipe, values)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The checkout's code, also where the environment MLflow built holds an older copy of the project
    # (its name hashes python_env.yaml, not the code).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    if "MLFLOW_RUN_ID" not in os.environ:
        print("note: MLFLOW_RUN_ID is not set; the train stage will create its own MLflow run", file=sys.stderr)
    steps = [
        ["dvc", "repro", "split"],  # data stages: cached after the first time
        ["dvc", "exp", "run", *[a for s in sets for a in ("-S", s)], "--force", "--downstream", "train"],
    ]
    for cmd in steps:
        print("+ " + " ".join(cmd), flush=True)
        code = subprocess.call(cmd, env=env)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
