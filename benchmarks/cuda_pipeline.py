"""The real train and evaluate stages on a CUDA GPU, end to end and resumable, tracked in one MLflow store.

Runs the commands dvc.yaml gives its stages (DVC itself stays behind: the GPU machine has no network
and its wheels would not fit in what travels), one workspace per configuration, all tracking into one
local SQLite store:
  course_cnn          params.yaml as it is (the course CNN)
  resnet              cifar_resnet with the GPU recipe (--recipe)
  resnet-killed       the same, SIGKILLed in the middle of an epoch (fault point step:E:S), then the
                      stage is simply run again and resumes
  resnet-det          the recipe with train.deterministic=true, uninterrupted
  resnet-det-killed   the same, killed and resumed
  resnet-compile      the recipe with train.compile=true
  resnet-ddp1         the recipe with the train stage under `torchrun --nproc_per_node=1`: DDP over NCCL
                      with one process (the multi-GPU code path on a one-GPU machine)
  resnet-det-ddp1-killed  deterministic, under torchrun, killed mid-epoch, resumed under torchrun; its
                      twin is resnet-det (one process, no DDP): bitwise equal means DDP's path and the
                      resume both change nothing
  ddp2-one-gpu        train.nproc_per_node=2 on a machine with one GPU: must be refused before any work
Then it checks what a user relies on: each killed run resumed into the same MLflow run id, with
weights, per-epoch history and test metrics equal to its uninterrupted twin (bitwise with
deterministic kernels; the differences are reported without), and every run in the store is
FINISHED, names the GPU as its device, has every per-epoch metric once per epoch, its checkpoints
and its model. Writes a JSON report.

  python benchmarks/cuda_pipeline.py --archive /tmp/cifar-10-python.tar.gz --md5 <md5> \
      --work /tmp/cp --store /tmp/store --out cuda_pipeline.json

On a CPU, `--set train.epochs=2 --only course_cnn resnet resnet-killed` tries the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pandas as pd
import torch
import yaml

from cifarpipe.data import split
from cifarpipe.config import Params, flatten, load_params, with_overrides

REPO = Path(__file__).resolve().parents[1]
# What a workspace needs to run the stages: the library, the stage scripts, the pipeline file, the recipes.
PROJECT_FILES = ("src", "stages", "dvc.yaml", "recipes")
# history.csv columns that measure time, not training: everything else must match after a resume.
WALL_CLOCK = {"epoch_seconds", "images_per_second"}
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
# The GPU recipe's starting guess: batch 512 fills an H100 with this 2 M-parameter net; patience 1
# cuts the rate at the first stall, which 20 epochs leave time for.
RECIPE = ("model.name=cifar_resnet train.batch_size=512 train.epochs=20 train.optimizer.lr=0.002 "
          "train.scheduler.patience=1 train.label_smoothing=0.1 evaluate.tta_flip=true")


def stage_argv(stage: str) -> list[str]:
    """The stage's command from dvc.yaml (the one source of its paths), run by this Python."""
    argv = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


class Workspace:
    def __init__(self, root: Path, name: str, overrides: list[str], base_params: Path, data: Path | None) -> None:
        self.name, self.dir, self.overrides = name, root / name, overrides
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        for item in PROJECT_FILES:
            src = REPO / item
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, self.dir / item)
        params = with_overrides(load_params(base_params), overrides)
        (self.dir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        self.params = params
        if data is not None:  # prepared once: every workspace trains on the same verified arrays and split
            (self.dir / "data").symlink_to(data)
        self.log = self.dir / "stages.log"

    def run(self, stage: str, env: dict[str, str], timeout: float, torchrun: bool = False) -> dict:
        argv = stage_argv(stage)
        if torchrun:  # as a user starts it on a GPU box: torchrun --standalone --nproc_per_node=N <script> <args>
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.params.train.nproc_per_node}", *argv[1:]]
        t0 = time.perf_counter()
        with open(self.log, "a") as log:
            log.write(f"\n$ {stage} {json.dumps({k: v for k, v in env.items() if k.startswith('CIFARPIPE')})}\n")
            log.flush()
            try:
                proc = subprocess.run(argv, cwd=self.dir, env={**os.environ, **env}, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=max(timeout, 1))
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = time.perf_counter() - t0
        tail = self.log.read_text().splitlines()[-6:]
        print(f"  [{self.name}] {stage}: rc {rc}, {seconds:.1f} s | {tail[-1] if tail else ''}", flush=True)
        return {"stage": stage, "rc": rc, "seconds": round(seconds, 2), "log_tail": tail}

    def read(self, name: str):
        path = self.dir / "outputs" / name
        if not path.exists():
            return None
        if name.endswith(".json"):
            return json.loads(path.read_text())
        if name.endswith(".csv"):
            return pd.read_csv(path)
        return path.read_text().strip()


def self_log(ws: Workspace) -> str:
    return ws.log.read_text(errors="replace")


def compare(ref: Workspace, other: Workspace) -> dict:
    """How far `other`'s results are from `ref`'s: weights, per-epoch history, test metrics."""
    out: dict = {"against": ref.name}
    a, b = (torch.load(w.dir / "outputs" / "model.pt", map_location="cpu", weights_only=True) for w in (ref, other))
    ta = {k: v for k, v in flatten_tensors(a).items()}
    tb = {k: v for k, v in flatten_tensors(b).items()}
    out["weights_same_keys"] = ta.keys() == tb.keys()
    if out["weights_same_keys"]:
        out["weights_bitwise_equal"] = all(torch.equal(ta[k], tb[k]) for k in ta)
        out["weights_max_abs_diff"] = max((ta[k].double() - tb[k].double()).abs().max().item()
                                          for k in ta if ta[k].is_floating_point()) if ta else 0.0
    ha, hb = ref.read("history.csv"), other.read("history.csv")
    cols = [c for c in ha.columns if c not in WALL_CLOCK]
    out["history_rows"] = [len(ha), len(hb)]
    if list(ha.columns) == list(hb.columns) and len(ha) == len(hb):
        out["history_equal"] = bool((ha[cols].to_numpy() == hb[cols].to_numpy()).all())
        out["history_max_abs_diff"] = {c: float((ha[c] - hb[c]).abs().max()) for c in cols}
    ma, mb = ref.read("metrics.json") or {}, other.read("metrics.json") or {}
    out["test_accuracy"] = [ma.get("accuracy"), mb.get("accuracy")]
    out["test_metrics_equal"] = ma == mb
    return out


def flatten_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten_tensors(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flatten_tensors(val, f"{prefix}/{i}").items()}
    return {}


def check_store(uri: str, runs: dict[str, str], epochs: dict[str, int]) -> dict:
    """What `mlflow ui` will show for each run: status, device, every epoch once per curve, artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    report = {}
    for name, run_id in runs.items():
        r = client.get_run(run_id)
        curves = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in EPOCH_METRICS}
        models = client.search_logged_models(experiment_ids=[r.info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'")
        # the epochs' checkpoint models (tracking.checkpoints) that hold the file: the best and the last
        kept = sorted(int(m.params["epoch"]) for m in models
                      if m.model_type == "checkpoint" and m.tags.get("checkpoint_file") == "kept")
        report[name] = {
            "run_id": run_id, "status": r.info.status, "device": r.data.tags.get("device"),
            "torch": r.data.tags.get("torch"), "cuda": r.data.tags.get("cuda"),
            "every_epoch_once": all(sorted(s) == list(range(1, epochs[name] + 1)) for s in curves.values()),
            "epochs_per_curve": {k: len(s) for k, s in curves.items()},
            "test_accuracy": r.data.metrics.get("test_accuracy"),
            "system_metrics": sorted(k for k in r.data.metrics if k.startswith("system/")),
            "checkpoint_models": sum(m.model_type == "checkpoint" for m in models), "kept_checkpoints": kept,
            "logged_models": [m.model_id for m in models],
        }
    return report


def pack_store(store: Path, runs: dict[str, dict], dest: Path, limit_mb: float, part_mb: float = 15.0) -> dict:
    """The store as tar parts of at most `part_mb` MiB (what the GPU machine can send back), within
    `limit_mb` MiB: the database and every small artifact first, then large ones (checkpoints,
    models) run by run in the order of `runs`. What does not fit is listed with size and SHA-256,
    so the report still proves it was written."""
    import hashlib
    import tarfile

    run_of = {}  # artifact folder name -> config name: run ids and logged model ids
    for name, r in runs.items():
        run_of[r["run_id"]] = name
        for model_id in r.get("logged_models", []):
            run_of[model_id] = name
    order = list(runs)
    files = sorted(p for p in store.rglob("*") if p.is_file())

    def rank(p: Path) -> tuple:
        owner = next((run_of[part] for part in p.relative_to(store).parts if part in run_of), None)
        small = p.stat().st_size < 1 << 20
        return (not small, order.index(owner) if owner in order else len(order), str(p))

    kept, left_out, total = [], [], 0
    for p in sorted(files, key=rank):
        size = p.stat().st_size
        if p.name == "mlflow.db" or total + size <= limit_mb * 2**20:
            kept.append(p)
            total += size
        else:
            left_out.append({"path": str(p.relative_to(store)), "bytes": size,
                             "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    tar = dest / "store.tar"
    with tarfile.open(tar, "w") as t:
        for p in kept:
            t.add(p, arcname=str(p.relative_to(store.parent)))
    parts, data = [], tar.read_bytes()
    tar.unlink()
    step = int(part_mb * 2**20)
    for i in range(0, len(data), step):
        part = dest / f"store.tar.{i // step:02d}"
        part.write_bytes(data[i:i + step])
        parts.append(part.name)
    return {"parts": parts, "bytes_kept": total, "files_kept": len(kept), "left_out": left_out,
            "join": f"cat {' '.join(parts)} | tar -x"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True, help="cifar-10-python.tar.gz (official layout)")
    ap.add_argument("--md5", required=True, help="its MD5, as params.yaml's data.md5")
    ap.add_argument("--work", type=Path, required=True, help="a scratch folder for the workspaces")
    ap.add_argument("--store", type=Path, required=True, help="the MLflow store folder (mlflow.db + artifacts)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", default=RECIPE, help="the cifar_resnet overrides, space-separated")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every configuration (e.g. train.epochs=2 for a dry run)")
    ap.add_argument("--only", nargs="+", help="run only these configurations")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; configurations that would start later are skipped")
    ap.add_argument("--pack-into", type=Path, help="also write the store as tar parts into this folder")
    ap.add_argument("--pack-mb", type=float, default=56.0, help="at most this many MiB of the store in the parts")
    return ap.parse_args(argv)


def prepare_store(args: argparse.Namespace) -> tuple[str, dict[str, str], Params, Path]:
    """The store's URI, the stages' environment, the base params and params.base.yaml, which holds them."""
    args.work.mkdir(parents=True, exist_ok=True)
    args.store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.store.resolve()}/mlflow.db"
    env = {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    base_params = args.work / "params.base.yaml"
    base = with_overrides(load_params(REPO / "params.yaml"),
                          [f"data.url={args.archive.resolve()}", f"data.md5={args.md5}", *args.overrides])
    base_params.write_text(yaml.safe_dump(base.model_dump(mode="json"), sort_keys=False))
    # The experiment with its artifacts inside the store folder, so the folder is the whole store.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    if client.get_experiment_by_name(base.tracking.experiment) is None:
        client.create_experiment(base.tracking.experiment, artifact_location=str((args.store / "artifacts").resolve()))
    return uri, env, base, base_params


def prepare_data(work: Path, env: dict[str, str], base_params: Path) -> Path:
    """The download and split stages, once: the data folder every workspace links to."""
    prep = Workspace(work, "data-prep", [], base_params, None)
    for stage in ("download", "split"):
        step = prep.run(stage, env, 600)
        if step["rc"] != 0:
            sys.exit(f"{stage} failed: {step['log_tail']}")
    return prep.dir / "data"


# (overrides, kill fault or None, the uninterrupted twin or None, train under torchrun)
Configuration = tuple[list[str], str | None, str | None, bool]


def plan_configurations(base: Params, recipe_text: str, data_dir: Path) -> dict[str, Configuration]:
    """Every configuration by name, in the order they run; the killed ones die in the middle of the middle epoch."""
    recipe = recipe_text.split()
    epochs = with_overrides(base, recipe).train.epochs
    n_train = len(split.from_json((data_dir / "split.json").read_text()).train)
    steps = n_train // with_overrides(base, recipe).train.batch_size  # train.drop_last: full batches only
    kill_at = f"step:{max(1, (epochs + 1) // 2)}:{max(1, steps // 2)}"  # the middle of the middle epoch
    det = [*recipe, "train.deterministic=true"]
    return {
        "course_cnn": ([], None, None, False),
        "resnet": (recipe, None, None, False),
        "resnet-killed": (recipe, kill_at, "resnet", False),
        "resnet-det": (det, None, None, False),
        "resnet-det-killed": (det, kill_at, "resnet-det", False),
        "resnet-det-ddp1-killed": (det, kill_at, "resnet-det", True),
        "ddp2-one-gpu": ([*recipe, "train.nproc_per_node=2"], None, None, False),
        "resnet-compile": ([*recipe, "train.compile=true"], None, None, False),
        "resnet-ddp1": (recipe, None, None, True),
    }


def run_configurations(args: argparse.Namespace, plan: dict[str, Configuration], report: dict, env: dict[str, str],
                       base_params: Path, data_dir: Path, left: Callable[[], float]) -> dict[str, Workspace]:
    """Each configuration (--only's) in its workspace while the budget lasts, into report["configurations"];
    the report is rewritten after each, so partial results survive a timeout."""
    spaces: dict[str, Workspace] = {}
    for name, (overrides, fault, twin, torchrun) in plan.items():
        if args.only and name not in args.only:
            continue
        entry: dict = {"overrides": overrides, "steps": []}
        report["configurations"][name] = entry
        if left() < 30:
            entry["skipped"] = f"out of time ({left():.0f} s of the budget left)"
            print(f"{name}: skipped, {entry['skipped']}", flush=True)
            continue
        print(f"{name}: {' '.join(overrides) or 'params.yaml'}", flush=True)
        ws = spaces[name] = Workspace(args.work, name, overrides, base_params, data_dir)
        entry["params"] = flatten(ws.params)
        if name == "ddp2-one-gpu":  # a refusal: exit 2 and a message, nothing started
            step = ws.run("train", env, min(left(), 120))
            entry["steps"].append(step)
            entry["refused"] = step["rc"] == 2 and any("one process per GPU" in line for line in step["log_tail"])
        else:
            train_and_evaluate(ws, entry, env, left, fault, torchrun)
            record_outcome(ws, entry, fault, spaces.get(twin) if twin else None)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return spaces


def train_and_evaluate(ws: Workspace, entry: dict, env: dict[str, str], left: Callable[[], float], fault: str | None,
                       torchrun: bool) -> None:
    """The train stage (first killed at `fault`, then run again to resume), then evaluate: each step into `entry`."""
    if fault:
        step = ws.run("train", {**env, "CIFARPIPE_FAULT": fault}, left(), torchrun)
        entry["steps"].append(step | {"fault": fault})
        # Under torchrun the worker is the one killed; torchrun itself then exits 1.
        entry["killed_by_sigkill"] = step["rc"] == -9 or (torchrun and "Signal 9 (SIGKILL)" in self_log(ws))
        entry["run_id_before_kill"] = ws.read("run_id.txt")
        ckpts = list((ws.dir / "outputs" / "checkpoints").glob("*/last.pt"))
        if ckpts:
            c = torch.load(ckpts[0], map_location="cpu", weights_only=True)
            entry["checkpoint_at_kill"] = {"epoch": c["epoch"], "step": c["step"]}
    for stage in ("train", "evaluate"):
        step = ws.run(stage, env, left(), torchrun and stage == "train")
        entry["steps"].append(step)
        if step["rc"] != 0:
            break


def record_outcome(ws: Workspace, entry: dict, fault: str | None, twin: Workspace | None) -> None:
    """The run id, metrics and curves a workspace ended with, and how far they are from its uninterrupted twin's."""
    entry["run_id"] = ws.read("run_id.txt")
    if fault:
        entry["same_run_id_after_resume"] = entry["run_id"] == entry["run_id_before_kill"]
    entry["train_metrics"] = ws.read("train_metrics.json")
    entry["test_metrics"] = ws.read("metrics.json")
    hist = ws.read("history.csv")
    if hist is not None:
        entry["epoch_seconds"] = hist["epoch_seconds"].round(3).tolist()
        entry["images_per_second_median"] = float(hist["images_per_second"].median())
        entry["val_accuracy"] = hist["val_accuracy"].round(4).tolist()
    if twin is not None and (ws.dir / "outputs" / "model.pt").exists():
        try:
            entry["resume_vs_uninterrupted"] = compare(twin, ws)
        except Exception as e:  # a report with the reason beats no report
            entry["resume_vs_uninterrupted"] = {"error": f"{type(e).__name__}: {e}"}


def check_and_pack(args: argparse.Namespace, report: dict, spaces: dict[str, Workspace], uri: str,
                   t_start: float) -> None:
    """The store check of every finished run, the total seconds and, with --pack-into, the store's tar parts."""
    finished = {n: c["run_id"] for n, c in report["configurations"].items() if c.get("run_id")}
    try:
        report["store_check"] = check_store(uri, finished, {n: spaces[n].params.train.epochs for n in finished})
    except Exception as e:
        report["store_check"] = {"error": f"{type(e).__name__}: {e}"}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.pack_into and isinstance(report["store_check"], dict) and "error" not in report["store_check"]:
        args.pack_into.mkdir(parents=True, exist_ok=True)
        # The resumed deterministic run first: it is the one whose checkpoints prove the resume.
        first = ["resnet-det-ddp1-killed", "resnet-det-killed", "resnet-compile", "resnet-ddp1", "resnet-det", "resnet"]
        runs = dict(sorted(report["store_check"].items(), key=lambda kv: first.index(kv[0]) if kv[0] in first else 9))
        report["store_pack"] = pack_store(args.store, runs, args.pack_into, args.pack_mb)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    uri, env, base, base_params = prepare_store(args)
    report: dict = {"date": date.today().isoformat(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "store": uri, "recipe": args.recipe, "overrides": args.overrides, "configurations": {}}
    data_dir = prepare_data(args.work, env, base_params)
    plan = plan_configurations(base, args.recipe, data_dir)
    spaces = run_configurations(args, plan, report, env, base_params, data_dir, left)
    check_and_pack(args, report, spaces, uri, t_start)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({n: {k: c.get(k) for k in ("run_id", "same_run_id_after_resume", "test_metrics")}
                      for n, c in report["configurations"].items()}, indent=1, default=str))
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
