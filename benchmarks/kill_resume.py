"""Kill the real pipeline with SIGKILL again and again, then check it ends as if never killed.

Two fresh clones of this repository, the same params (`data.url`/`data.md5` pointing at a real
archive): one runs `dvc repro` uninterrupted; the other is killed at chosen moments (fault
points of src/cifarpipe/faults.py, which SIGKILL the stage from inside) and at random moments
(`kill -9` of the stage's process from outside, after a random delay), with `dvc repro` after
each. At the end: one FINISHED MLflow run, every epoch once in every curve, bitwise the same
weights, the same test metrics.

  python benchmarks/kill_resume.py --archive /path/cifar-10-python.tar.gz --md5 <md5> --out report.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml
from mlflow.tracking import MlflowClient

from cifarpipe.config import load_params, with_overrides

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    # Each clone's stages run that clone's library (PYTHONPATH), whatever is installed.
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd / "src"), **(env or {})},
                          capture_output=True, text=True)
    if check and proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def clone(dest: Path, overrides: list[str]) -> Path:
    """A fresh clone of this repository's HEAD with `overrides` written into its params.yaml."""
    sh(["git", "clone", "-q", str(REPO), str(dest)], dest.parent)
    params = with_overrides(load_params(dest / "params.yaml"), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    sh(["git", "-c", "user.email=k@example.com", "-c", "user.name=k", "commit", "-qam", "params"], dest)
    return dest


def kill_from_outside(project: Path, delay_s: float) -> str:
    """Start `dvc repro`, SIGKILL the running stage's process after `delay_s`; return what was running."""
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(project / "src")})
    time.sleep(delay_s)
    # Only a stage this `dvc repro` started: other pipelines on the machine are none of our business.
    stages = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            script = next((part for part in p.cmdline() if part.startswith("stages/")), None)
            if script:
                stages[script] = p
    for victim in stages.values():
        victim.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    if not stages:
        return f"kill -9 after {delay_s:.0f} s: not reached (the repro had finished)"
    return f"kill -9 after {delay_s:.0f} s of {', '.join(stages)}: " + (out.strip().splitlines() or [""])[-1]


def state(project: Path) -> dict:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    curves = {r.info.run_id: {k: sorted(m.step for m in client.get_metric_history(r.info.run_id, k))
                              for k in ("train_loss", "val_accuracy", "lr")} for r in runs}
    return {"runs": [(r.info.run_id, r.info.status) for r in runs], "curves": curves,
            "weights": torch.load(project / "outputs/model.pt", weights_only=True)["state_dict"],
            "metrics": json.loads((project / "outputs/metrics.json").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--md5", required=True)
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE params for both clones")
    ap.add_argument("--seed", type=int, default=0, help="for the random kill delay")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    overrides = [f"data.url={args.archive.resolve()}", f"data.md5={args.md5}", *args.set]
    epochs = int(next((o.split("=")[1] for o in overrides if o.startswith("train.epochs=")), "10"))
    with tempfile.TemporaryDirectory() as tmp:
        ref = clone(Path(tmp) / "uninterrupted", overrides)
        t0 = time.time()
        sh(["dvc", "repro"], ref)
        ref_seconds = time.time() - t0
        killed = clone(Path(tmp) / "killed", overrides)
        sh(["dvc", "repro", "split"], killed)
        log = []
        # In the order training reaches them (a kill that was not reached is reported as such):
        # epoch 1 before any checkpoint, twice (the second while its checkpoint is half written),
        # validation, a kill -9 from outside at a random moment, then after the last epoch's
        # checkpoint, after the final outputs, and during evaluate.
        plan = [("fault", "step:1:100"), ("fault", "checkpoint_write:1"), ("fault", f"validation:{min(2, epochs)}"),
                ("outside", None), ("fault", f"after_checkpoint:{epochs}"), ("fault", f"finish:{epochs}"),
                ("fault", "evaluate:0")]
        for kind, what in plan:
            if kind == "fault":
                proc = sh(["dvc", "repro"], killed, env={"CIFARPIPE_FAULT": what}, check=False)
                landed = "killed" if proc.returncode else "not reached (the repro finished)"
                log.append(f"fault {what}: exit {proc.returncode}, {landed}")
            else:
                log.append(kill_from_outside(killed, rng.uniform(5, ref_seconds * 0.3)))
            print(log[-1], flush=True)
        final = sh(["dvc", "repro"], killed)
        log.append("final dvc repro: " + final.stdout.strip().splitlines()[-1])
        a, b = state(killed), state(ref)
        (run_id, status), = a["runs"]
        report = {
            "params": overrides, "kills": log, "runs": a["runs"],
            "one_finished_run": status == "FINISHED",
            "every_epoch_once": all(v == list(range(1, epochs + 1)) for v in a["curves"][run_id].values()),
            "weights_bitwise_equal": all(torch.equal(a["weights"][k], b["weights"][k]) for k in b["weights"]),
            "test_metrics_equal": a["metrics"] == b["metrics"], "test_accuracy": a["metrics"]["accuracy"],
            "uninterrupted_seconds": round(ref_seconds, 1),
        }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if all(report[k] for k in ("one_finished_run", "every_epoch_once", "weights_bitwise_equal",
                                              "test_metrics_equal")) else 1)


if __name__ == "__main__":
    main()
