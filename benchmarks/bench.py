"""Side-by-side training benchmark on the real archive, in one run, on one device.

Measures, on the same data and the same device:
  1. the course's loop: torchvision CIFAR10 dataset + DataLoader (batch 8, no worker processes, as the course writes it), the course
     CNN, Adam + ReduceLROnPlateau on validation accuracy, as the course wrote it;
  2. our engine with the course CNN and params.yaml's training settings;
  3. our engine with the fast recipe (recipes/fast.yaml, the course CNN);
  4. our engine with cifar_resnet, once per --resnet (on a CPU only for --resnet-seconds: it is
     a GPU network);
  5. the MLflow overhead: configuration 3 with tracking off, on, and off again, interleaved.
For each: training images/s, validation and test accuracy after every epoch, and the training
time until the test accuracy first reaches the course loop's final (10-epoch) test accuracy.
Nothing is chosen on the test set: the "best" epoch is the one with the highest validation
accuracy (its test accuracy is reported beside it), and `--sweep` picks the fast recipe among
candidates on their final validation accuracy, without evaluating them on the test set at all. Validation and the
per-epoch checkpoint are part of training time (the scheduler needs the one, resuming the other);
the per-epoch test evaluation is not. `--target` adds a second accuracy to time, e.g. the one
airbench94 reached on the same card and data (benchmarks/gpu_run.sh passes it).

  python benchmarks/bench.py --archive data/raw/cifar-10-python.tar.gz --resnet-seconds 60 \
      --out benchmarks/results/cpu.json

Every configuration is params.yaml plus `--set KEY=VALUE` overrides (as `dvc exp run -S`),
validated before anything runs. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifarpipe import atomic
from cifarpipe.data import archive as data
from cifarpipe.data import split
from cifarpipe.training import checkpoint, engine
from cifarpipe.config import Params, UserError, flatten, load_params, with_overrides
from cifarpipe.data.batches import DeviceBatches, channel_stats
from cifarpipe.training.models import CourseCNN


@dataclass
class Result:
    name: str
    # {"epoch", "train_seconds", "val_accuracy", "test_accuracy"}; no "test_accuracy" in a sweep candidate
    epochs: list[dict] = field(default_factory=list)
    train_images: int = 0
    train_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.train_images / max(self.train_seconds, 1e-9)

    @property
    def final_accuracy(self) -> float:
        return self.epochs[-1]["test_accuracy"] if self.epochs else float("nan")

    @property
    def final_val_accuracy(self) -> float:
        return self.epochs[-1]["val_accuracy"] if self.epochs else float("nan")

    @property
    def best_val_epoch(self) -> dict | None:
        """The epoch with the highest validation accuracy (the first, on ties): what best.pt holds.
        Chosen on validation only; its test accuracy is then just reported."""
        return max(self.epochs, key=lambda e: e["val_accuracy"], default=None)

    def seconds_to(self, target: float) -> float | None:
        return next((e["train_seconds"] for e in self.epochs if e["test_accuracy"] >= target), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- 1. the course's loop
def course_loop(batch_dir_root: Path, epochs: int, device: torch.device) -> Result:
    import torchvision
    import torchvision.transforms as transforms

    class LocalCIFAR10(torchvision.datasets.CIFAR10):
        # Our JPEG-derived copy's per-file MD5s differ from the official ones torchvision checks;
        # md5 None makes torchvision check only that each file exists (the archive MD5 was verified).
        train_list = [[f"data_batch_{i}", None] for i in range(1, 6)]
        test_list = [["test_batch", None]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": None}

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = LocalCIFAR10(root=str(batch_dir_root), train=True, download=False, transform=transform)
    testset = LocalCIFAR10(root=str(batch_dir_root), train=False, download=False, transform=transform)
    train_part, val_part = torch.utils.data.random_split(trainset, [0.85, 0.15],
                                                         generator=torch.Generator().manual_seed(2025))
    # As the course writes them: default num_workers (0). Two workers halved this loop's speed on a
    # 2-core machine (1,047 vs ~2,400 img/s), which inflated every ratio against it.
    trainloader = torch.utils.data.DataLoader(train_part, batch_size=8, shuffle=True)
    valloader = torch.utils.data.DataLoader(val_part, batch_size=8, shuffle=False)
    testloader = torch.utils.data.DataLoader(testset, batch_size=1000, shuffle=False)  # not timed

    torch.manual_seed(0)
    net = CourseCNN().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=3)

    def accuracy(loader) -> float:
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                correct += (net(images).argmax(1) == labels).sum().item()
                total += labels.size(0)
        return correct / total

    result = Result("course loop (DataLoader, batch 8)")
    for epoch in range(epochs):
        t0 = time.perf_counter()
        net.train()
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print(f"  [{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}", flush=True)
                running_loss = 0.0
        val_accuracy = accuracy(valloader)
        scheduler.step(val_accuracy)
        sync(device)
        result.train_seconds += time.perf_counter() - t0
        result.train_images += len(train_part)
        result.epochs.append({"epoch": epoch + 1, "train_seconds": result.train_seconds,
                              "val_accuracy": val_accuracy, "test_accuracy": accuracy(testloader)})
        print(f"  course loop epoch {epoch + 1}: {result.train_seconds:7.1f} s, "
              f"test acc {result.epochs[-1]['test_accuracy']:.4f}", flush=True)
    return result


# ---------------------------------------------------------------- 2-4. our engine
def our_engine(name: str, arrays: data.Cifar10Arrays, sp: split.Split, params: Params, device: torch.device,
               tracking_dir: Path | None, max_seconds: float | None = None, test: bool = True) -> Result:
    """The train stage's loop with `params.model` and `params.train`: device-resident batches,
    train_one_epoch, validation, plateau scheduler, a checkpoint per epoch; with `tracking_dir`,
    MLflow logging exactly as the stage does. `test=False` (sweep candidates): the test set is
    never evaluated."""
    # The per-epoch checkpoint is part of what is timed; its folder goes when the run ends
    # (a cifar_resnet checkpoint with Adam's state is 23 MB, and a sweep runs dozens).
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as ckpt_dir:
        return _our_engine(name, arrays, sp, params, device, tracking_dir, max_seconds, Path(ckpt_dir) / "last.pt",
                           test)


def _our_engine(name: str, arrays: data.Cifar10Arrays, sp: split.Split, params: Params, device: torch.device,
                tracking_dir: Path | None, max_seconds: float | None, ckpt_path: Path, test: bool) -> Result:
    p = params.train
    train_x, train_y = arrays.train_images[sp.train], arrays.train_labels[sp.train]
    mean, std = channel_stats(train_x)
    train_b = DeviceBatches(torch.from_numpy(train_x).to(device), torch.from_numpy(train_y), p.batch_size, mean, std,
                            p.augment, seed=p.seed, drop_last=p.drop_last)
    val_b = DeviceBatches(torch.from_numpy(arrays.train_images[sp.val]).to(device),
                          torch.from_numpy(arrays.train_labels[sp.val]), 1000, mean, std, shuffle=False)
    test_b = DeviceBatches(torch.from_numpy(arrays.test_images).to(device), torch.from_numpy(arrays.test_labels),
                           1000, mean, std, shuffle=False)
    setup = engine.build_training(params.model, p, device)
    result = Result(name)

    tracker = None
    if tracking_dir is not None:
        import mlflow

        from cifarpipe.tracking import job, provenance, store

        t_setup = time.perf_counter()
        mlflow.set_tracking_uri(f"sqlite:///{tracking_dir / 'mlflow.db'}")
        tracker = job.open_run(store.connect(), "benchmark", None)
        tracker.log_start(flatten(params), {}, provenance.requirements_text())
        result.extra["tracking_setup_seconds"] = time.perf_counter() - t_setup  # once per run, before epoch 1

    hooks = BenchHooks(name, result, setup, device, ckpt_path, tracker, val_b, test_b if test else None,
                       engine.views_for(params.model.tta, params.evaluate.tta_flip), max_seconds)
    # The train stage's loop (engine.fit): the benchmark times what the stage runs.
    engine.fit(setup, engine.TrainState(), p.epochs, train_b.epoch, lambda: val_b.epoch(0), len(train_b), hooks)
    if hooks.stopped:
        result.extra["stopped_after_seconds"] = max_seconds
    if tracker:
        t_log = time.perf_counter()
        tracker.drain()
        tracker.finish()
        hooks.tracking_seconds += time.perf_counter() - t_log
        result.train_seconds += time.perf_counter() - t_log  # waiting for the last epoch's log counts
        result.extra["tracking_main_thread_seconds"] = hooks.tracking_seconds
        result.extra["tracking_background_cpu_seconds"] = tracker.background_cpu_seconds
    return result


class BenchHooks(engine.LoopHooks):
    """Times each epoch (training, validation, the per-epoch checkpoint and, when on, MLflow logging),
    then evaluates the test set outside the timed part; stops at the time budget."""

    def __init__(self, name: str, result: Result, setup: engine.TrainingSetup, device: torch.device, ckpt_path: Path,
                 tracker, val_b: DeviceBatches, test_b: DeviceBatches | None, tta: str,
                 max_seconds: float | None) -> None:
        self.name, self.result, self.setup, self.device, self.ckpt_path = name, result, setup, device, ckpt_path
        self.tracker, self.val_b, self.test_b, self.tta = tracker, val_b, test_b, tta
        self.deadline = time.perf_counter() + max_seconds if max_seconds else None
        self.tracking_seconds, self.stopped, self.t0 = 0.0, False, 0.0

    def epoch_started(self, epoch: int, state: engine.TrainState) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def stop_requested(self, inside_epoch: bool) -> bool:
        self.stopped = self.stopped or bool(self.deadline and time.perf_counter() > self.deadline)
        return self.stopped

    def stopped_in_epoch(self, state: engine.TrainState) -> None:
        # The budget ran out inside an epoch: validate, checkpoint and log what was trained (timed),
        # as an epoch's end does.
        val = engine.evaluate(self.setup.eval_model, self.val_b.epoch(0), amp=self.setup.amp)
        self._record(state.epoch + 1, {"epoch": state.epoch + 1, "train_loss": state.progress.loss,
                                       "train_accuracy": state.progress.accuracy, "val_loss": val.loss,
                                       "val_accuracy": val.accuracy, "lr": self.setup.optimizer.param_groups[0]["lr"]})
        self._finish_epoch({"epoch": state.epoch + 1, "val_accuracy": val.accuracy}, state.progress.seen)

    def epoch_finished(self, state: engine.TrainState, row: dict[str, float], improved: bool) -> None:
        self._record(state.epoch, row)
        self._finish_epoch(row, row["images_per_second"] * row["epoch_seconds"])

    def _record(self, epoch: int, row: dict[str, float]) -> None:
        """The per-epoch checkpoint and, with tracking on, the epoch's metrics: part of training time."""
        s = self.setup
        checkpoint.save(self.ckpt_path, {"epoch": epoch, "step": 0, "model_state_dict": s.model.state_dict(),
                                         "optimizer_state_dict": s.optimizer.state_dict(),
                                         "scheduler_state_dict": s.scheduler.state_dict()})
        if self.tracker:
            t_log = time.perf_counter()
            self.tracker.queue_history([{**row, "epoch_seconds": 0.0, "images_per_second": 0.0}])
            self.tracker.log_artifact(self.ckpt_path, "checkpoints", background=True)
            self.tracking_seconds += time.perf_counter() - t_log

    def _finish_epoch(self, row: dict[str, float], images: float) -> None:
        sync(self.device)
        r = self.result
        r.train_seconds += time.perf_counter() - self.t0
        r.train_images += round(images)
        out = {"epoch": row["epoch"], "train_seconds": r.train_seconds, "val_accuracy": row["val_accuracy"]}
        if self.test_b is not None:  # not timed
            out["test_accuracy"] = engine.evaluate(self.setup.eval_model, self.test_b.epoch(0), amp=self.setup.amp,
                                                   tta=self.tta).accuracy
        r.epochs.append(out)
        print(f"  {self.name} epoch {row['epoch']}: {r.train_seconds:7.1f} s, val acc {row['val_accuracy']:.4f}"
              + (f", test acc {out['test_accuracy']:.4f}" if "test_accuracy" in out else ""), flush=True)


def mlflow_overhead(arrays: data.Cifar10Arrays, sp: split.Split, params: Params, device: torch.device, repeats: int,
                    tmp: Path) -> dict:
    """The same training with tracking off, on, and off again, interleaved `repeats` times.

    A shared 2-core VM drifts by 10-40 % between runs, as much as or more than the effect
    measured, so three figures are reported: the wall-time ratio on/off (medians); the same ratio
    between the two tracking-off series, which is the noise floor of that comparison (an A/A
    test); and what tracking itself used during the epochs: the training thread's time in tracker
    calls plus the logging thread's CPU time. On 2 busy cores every CPU second the logging thread
    takes is one the training waits for, so that sum is the cost, and the wall ratio, read
    against the A/A ratio, is its cross-check."""
    offs, ons, offs_again = [], [], []
    for i in range(repeats):
        offs.append(our_engine(f"tracking off #{i + 1}", arrays, sp, params, device, None))
        (tmp / f"mlflow{i}").mkdir()
        ons.append(our_engine(f"tracking on #{i + 1}", arrays, sp, params, device, tmp / f"mlflow{i}"))
        offs_again.append(our_engine(f"tracking off again #{i + 1}", arrays, sp, params, device, None))
    off_s = float(np.median([r.train_seconds for r in offs]))
    on_s = float(np.median([r.train_seconds for r in ons]))
    off_again_s = float(np.median([r.train_seconds for r in offs_again]))
    cost = float(np.median([r.extra["tracking_main_thread_seconds"] + r.extra["tracking_background_cpu_seconds"]
                            for r in ons]))
    return {"epochs": params.train.epochs, "seconds_off": [r.train_seconds for r in offs],
            "seconds_on": [r.train_seconds for r in ons], "seconds_off_again": [r.train_seconds for r in offs_again],
            "wall_overhead_median": on_s / off_s - 1, "wall_noise_floor_median": off_again_s / off_s - 1,
            "tracking_cpu_seconds": cost, "tracking_cpu_share": cost / on_s,
            "setup_seconds": float(np.median([r.extra["tracking_setup_seconds"] for r in ons]))}


def exp_run_command(overrides: list[str]) -> str:
    return "dvc exp run " + " ".join(f"-S {o}" for o in overrides)


def choose_recipe(candidates: dict[str, Params], arrays: data.Cifar10Arrays, sp: split.Split,
                  device: torch.device) -> tuple[str, list[dict]]:
    """Train every candidate without ever evaluating the test set; return the name of the one with
    the highest final validation accuracy (the final weights are what the pipeline ships and
    evaluates; the first candidate wins a tie) and each candidate's validation figures."""
    table = []
    for name, params in candidates.items():
        r = our_engine(f"sweep {name}", arrays, sp, params, device, None, test=False)
        table.append({"candidate": name, "final_val_accuracy": r.final_val_accuracy, "train_seconds": r.train_seconds,
                      "val_accuracy_per_epoch": [e["val_accuracy"] for e in r.epochs]})
        assert not any("test_accuracy" in e for e in r.epochs)  # the choice can't have seen the test set
    return max(table, key=lambda row: row["final_val_accuracy"])["candidate"], table


FAST = "ours, course CNN, fast recipe"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True, help="the real cifar-10-python.tar.gz")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="our pipeline's settings")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--course-epochs", type=int, default=10)
    ap.add_argument("--recipe", help="recipes/<name>.yaml beside --params, as its `recipe` key: the base of all our "
                                     "configurations (--set applies on top), e.g. --recipe gpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override for all our configurations, like dvc exp run -S (repeatable)")
    ap.add_argument("--fast", action="append", metavar="KEY=VALUE",
                    help="the course CNN's fast recipe as overrides of params.yaml, instead of recipes/fast.yaml")
    ap.add_argument("--sweep", action="append", metavar="'KEY=VALUE ...'",
                    help="a candidate fast recipe for the course CNN, space-separated overrides (repeatable): "
                         "the candidate with the highest final validation accuracy becomes the fast recipe; "
                         "candidates are never evaluated on the test set")
    ap.add_argument("--resnet", action="append", metavar="'KEY=VALUE ...'",
                    help="one cifar_resnet run with these space-separated overrides (repeatable), "
                         "e.g. 'train.batch_size=512 train.epochs=20'; default: one run on params.yaml")
    ap.add_argument("--target", type=float, help="also report the time to this test accuracy (0-1)")
    ap.add_argument("--resnet-seconds", type=float, help="stop cifar_resnet after this much training time")
    ap.add_argument("--tracking-epochs", type=int, default=3, help="epochs of each MLflow on/off run")
    ap.add_argument("--tracking-repeats", type=int, default=5, help="off/on/off rounds, interleaved (medians reported)")
    ap.add_argument("--skip", action="append", default=[], choices=["course", "fast", "resnet", "tracking"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench.json"))
    return ap.parse_args(argv)


@dataclass
class Plan:
    """Our configurations, every one validated before anything is trained, with the commands that reproduce them."""
    base: Params
    user_overrides: list[str]  # --set as given; args.overrides is the same with `recipe=` first
    configs: dict[str, Params]  # name -> params, in the order they run
    commands: dict[str, str]  # name -> `dvc exp run -S ...`
    candidates: dict[str, Params]  # --sweep: the fast recipe's candidates
    fast: list[str]  # the fast recipe's overrides
    fast_params: Params


def plan_configurations(args: argparse.Namespace) -> Plan:
    user_overrides = list(args.overrides)
    base = with_overrides(load_params(args.params, recipe=args.recipe), user_overrides, "--set")
    if args.recipe:  # the commands that reproduce each configuration name it first
        args.overrides = [f"recipe={args.recipe}", *args.overrides]
    if args.sweep and args.fast:
        raise UserError("--fast and --sweep both name the fast recipe: give one of them")
    candidates = {c: with_overrides(base, ["model.name=course_cnn", *c.split()], "--sweep") for c in args.sweep or []}
    runs = {"ours, course CNN, params.yaml": (["model.name=course_cnn"], "--set")}  # name -> (overrides, flag)
    if "resnet" not in args.skip:
        for extra in args.resnet or [""]:
            runs[f"ours, cifar_resnet {extra}".strip()] = (["model.name=cifar_resnet", *extra.split()], "--resnet")
    # Every run's params validated before anything is trained, and the command that reproduces it.
    configs = {name: with_overrides(base, overrides, flag) for name, (overrides, flag) in runs.items()}
    commands = {name: exp_run_command([*args.overrides, *overrides]) for name, (overrides, _) in runs.items()}
    # The fast recipe is recipes/fast.yaml (what `dvc exp run -S recipe=fast` trains), or --fast's overrides.
    fast = ["model.name=course_cnn", *args.fast] if args.fast else ["recipe=fast"]
    fast_params = (with_overrides(base, fast, "--fast") if args.fast
                   else with_overrides(load_params(args.params, recipe="fast"), user_overrides, "--set"))
    if "fast" not in args.skip:
        first, *rest = configs.items()  # the fast recipe second, after params.yaml's
        configs = dict([first, (FAST, fast_params), *rest])
        commands[FAST] = exp_run_command([*(args.overrides if args.fast else user_overrides), *fast])
    return Plan(base, user_overrides, configs, commands, candidates, fast, fast_params)


def sweep_fast_recipe(args: argparse.Namespace, plan: Plan, arrays: data.Cifar10Arrays, sp: split.Split,
                      device: torch.device) -> list[dict] | None:
    """--sweep: the candidate chosen on validation accuracy becomes the plan's fast recipe; the
    candidates' validation figures, or None without --sweep."""
    if not plan.candidates:
        return None
    print(f"0. choosing the fast recipe among {len(plan.candidates)} candidates on validation accuracy", flush=True)
    chosen, sweep = choose_recipe(plan.candidates, arrays, sp, device)
    plan.fast = ["model.name=course_cnn", *chosen.split()]
    plan.fast_params = plan.candidates[chosen]
    if FAST in plan.configs:  # the chosen one is trained again, now with test figures
        plan.configs[FAST] = plan.candidates[chosen]
        plan.commands[FAST] = exp_run_command([*args.overrides, *plan.fast])
    print(f"chosen on validation accuracy: {chosen}", flush=True)
    return sweep


def run_configurations(args: argparse.Namespace, plan: Plan, arrays: data.Cifar10Arrays, sp: split.Split,
                       device: torch.device) -> tuple[list[Result], dict | None]:
    """The course loop, our configurations, then the MLflow overhead: the results and the overhead's figures."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "course" not in args.skip:
            root = tmp / "torchvision"
            (root / data.BATCH_DIR).mkdir(parents=True)
            for name, raw in data.read_archive(args.archive).items():  # checked members only
                (root / data.BATCH_DIR / name).write_bytes(raw)
            print("1. the course's loop", flush=True)
            results.append(course_loop(root, args.course_epochs, device))
        for i, (name, params) in enumerate(plan.configs.items(), start=2):
            print(f"{i}. {name}: {plan.commands[name]}", flush=True)
            seconds = args.resnet_seconds if params.model.name == "cifar_resnet" else None
            results.append(our_engine(name, arrays, sp, params, device, None, seconds))
        overhead = None
        if "tracking" not in args.skip:
            print(f"{len(plan.configs) + 2}. MLflow overhead: the fast recipe, tracking off, on and off again, interleaved", flush=True)
            # The fast recipe: the shortest epochs, so the largest share for the fixed per-epoch logging.
            params = with_overrides(plan.fast_params, [f"train.epochs={args.tracking_epochs}"], "--tracking-epochs")
            overhead = mlflow_overhead(arrays, sp, params, device, args.tracking_repeats, tmp)
    return results, overhead


def print_table(args: argparse.Namespace, results: list[Result]) -> tuple[list[dict], float | None]:
    """One row per configuration; returns the report's rows and the target (the course loop's final
    test accuracy, None when the course loop was skipped)."""
    target = results[0].final_accuracy if "course" not in args.skip else None
    base_result = results[0] if target is not None else None
    width = max(len(r.name) for r in results) + 2

    def seconds(t: float | None, goal: float | None) -> str:
        return f"{t:.1f}" if t else "not reached" if goal is not None else "-"

    extra_col = f"{f's to {args.target:.4f}':>14}" if args.target is not None else ""
    # "final" is the last epoch (the weights the pipeline evaluates); "val-best" is the epoch with the
    # highest validation accuracy, reported with its test accuracy: nothing here is picked on test.
    print(f"\n{'configuration':<{width}}{'img/s':>9}{'final val':>10}{'final test':>11}{'val-best ep':>12}"
          f"{'its val':>9}{'its test':>9}{'s to target':>13}{'speed-up':>10}{extra_col}")
    rows = []
    for r in results:
        to_target = r.seconds_to(target) if target is not None else None
        speedup = base_result.seconds_to(target) / to_target if base_result and to_target else None
        to_extra = r.seconds_to(args.target) if args.target is not None else None
        best = r.best_val_epoch or {"epoch": 0, "val_accuracy": float("nan"), "test_accuracy": float("nan")}
        rows.append({**asdict(r), "images_per_second": r.images_per_second, "final_accuracy": r.final_accuracy,
                     "final_val_accuracy": r.final_val_accuracy, "best_val_epoch": best["epoch"],
                     "best_val_accuracy": best["val_accuracy"], "test_accuracy_at_best_val": best["test_accuracy"],
                     "seconds_to_target": to_target, "speedup_vs_course": speedup,
                     "seconds_to_extra_target": to_extra})
        print(f"{r.name:<{width}}{r.images_per_second:>9.0f}{r.final_val_accuracy:>10.4f}{r.final_accuracy:>11.4f}"
              f"{best['epoch']:>12d}{best['val_accuracy']:>9.4f}{best['test_accuracy']:>9.4f}"
              f"{seconds(to_target, target):>13}{(f'{speedup:.1f}x' if speedup else '-'):>10}"
              + (f"{seconds(to_extra, args.target):>14}" if args.target is not None else ""))
    return rows, target


def print_notes(args: argparse.Namespace, plan: Plan, target: float | None, overhead: dict | None) -> None:
    """The lines under the table: the target, the fast recipe's command, the MLflow overhead."""
    if target is not None:
        print(f"target: the course loop's {args.course_epochs}-epoch test accuracy, {target:.4f}")
    if "fast" not in args.skip:
        print(f"fast recipe: {plan.commands[FAST]}")
    if overhead:
        print(f"MLflow overhead ({args.tracking_repeats} interleaved off/on/off rounds of {args.tracking_epochs} epochs): "
              f"tracking used {overhead['tracking_cpu_seconds']:.3f} s during training, "
              f"{overhead['tracking_cpu_share']:.2%} of its time; wall time on/off {overhead['wall_overhead_median']:+.1%} "
              f"against {overhead['wall_noise_floor_median']:+.1%} off/off (the noise floor) "
              f"(off {', '.join(f'{s:.1f}' for s in overhead['seconds_off'])} s; "
              f"on {', '.join(f'{s:.1f}' for s in overhead['seconds_on'])} s; "
              f"off again {', '.join(f'{s:.1f}' for s in overhead['seconds_off_again'])} s); "
              f"plus {overhead['setup_seconds']:.1f} s once, before epoch 1 (run, params, requirements)")


def write_report(args: argparse.Namespace, plan: Plan, device: torch.device, target: float | None, rows: list[dict],
                 sweep: list[dict] | None, overhead: dict | None) -> None:
    report = {"date": date.today().isoformat(), "device": engine.device_name(device) if device.type == "cuda"
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "archive": str(args.archive), "target_accuracy": target,
              "extra_target_accuracy": args.target,
              "configurations": {name: flatten(params) for name, params in plan.configs.items()},
              "commands": plan.commands, "results": rows, "sweep": sweep, "mlflow_overhead": overhead,
              "argv": vars(args) | {"archive": str(args.archive), "params": str(args.params), "out": str(args.out)}}
    atomic.write_text(args.out, json.dumps(report, indent=1, default=str) + "\n")  # never a half-written report
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = plan_configurations(args)  # raises UserError on a bad value, before any training
    device = engine.pick_device(args.device)
    arrays = data.arrays_from_archive(args.archive)
    sp = split.make_split(len(arrays.train_labels), plan.base.split.val_fraction, plan.base.split.seed,
                          plan.base.split.method)
    sweep = sweep_fast_recipe(args, plan, arrays, sp, device)
    results, overhead = run_configurations(args, plan, arrays, sp, device)
    rows, target = print_table(args, results)
    print_notes(args, plan, target, overhead)
    write_report(args, plan, device, target, rows, sweep, overhead)

if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad --set/--fast/--resnet value or params.yaml: one line, before any training
        sys.exit(f"error: {e}")
