"""Does the incomplete last batch matter? The real train and evaluate stages, `train.drop_last`
true vs false, several seeds, on the real archive, side by side in one run.

42,500 training images leave 4 over in batches of 64, 128 or 512; kept, they get a full Adam
step right before validation, the scheduler's decision and the saved weights. The decision is
read on validation accuracy (the scheduler's signal); test accuracy is reported beside it.

  python benchmarks/last_batch.py --archive data/raw/cifar-10-python.tar.gz --md5 <md5> \
      --seeds 0 1 2 --out benchmarks/results/last_batch.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from cifarpipe import atomic
from cifarpipe.config import load_params, with_overrides

REPO = Path(__file__).resolve().parents[1]


def stage(name: str, workdir: Path, params: Path, env: dict) -> None:
    cmd = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]["cmd"])
    cmd[1] = str(REPO / cmd[1])  # stages/<name>.py of this checkout, run inside the scratch folder
    subprocess.run([sys.executable, *cmd[1:], "--params", str(params)], cwd=workdir, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--md5", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides for both sides")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/last_batch.json")
    args = ap.parse_args()
    base = with_overrides(load_params(REPO / "params.yaml"),
                          [f"data.url={args.archive.resolve()}", f"data.md5={args.md5}", *args.set])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(base.model_dump(mode="json"), sort_keys=False))
        for name in ("download", "split"):
            stage(name, work, params_file, env)
        for seed in args.seeds:
            for drop in (True, False):
                p = with_overrides(base, [f"train.seed={seed}", f"train.drop_last={str(drop).lower()}"])
                params_file.write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
                stage("train", work, params_file, env)
                stage("evaluate", work, params_file, env)
                summary = json.loads((work / "outputs/train_metrics.json").read_text())
                history = pd.read_csv(work / "outputs/history.csv")["val_accuracy"].tolist()
                test = json.loads((work / "outputs/metrics.json").read_text())["accuracy"]
                rows.append({"seed": seed, "drop_last": drop, "final_val_accuracy": history[-1],
                             "best_val_accuracy": summary["best_val_accuracy"], "test_accuracy": test})
                print(json.dumps(rows[-1]), flush=True)
    report = {"command": " ".join(sys.argv), "overrides": args.set, "runs": rows, "mean": {}}
    for drop in (True, False):
        side = [r for r in rows if r["drop_last"] == drop]
        report["mean"][f"drop_last={str(drop).lower()}"] = {
            k: statistics.mean(r[k] for r in side) for k in ("final_val_accuracy", "best_val_accuracy", "test_accuracy")}
    atomic.write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["mean"], indent=2))


if __name__ == "__main__":
    main()
