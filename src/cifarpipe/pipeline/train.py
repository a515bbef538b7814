"""The train stage's body: load -> resume -> fit -> outputs, tracked in one MLflow run.

Resumable: after every epoch (and at a safe point on SIGINT/SIGTERM) a checkpoint is written
atomically; running the stage again (`dvc repro`) continues from it, in the same MLflow run.
Several processes (train.nproc_per_node > 1): the stage runs itself under torchrun; each process
trains its share of every batch and rank 0 alone reads and writes checkpoints, files and MLflow.
MLflow itself is never imported here: rank 0's MLflow process (tracking.job_process, started by
the stage script) keeps the run.
"""
from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cifarpipe import atomic, faults, workspace
from cifarpipe.config import (Params, TrainParams, UserError, flatten, load_params, params_in_force_text,
                              recipe_changes)
from cifarpipe.data import archive, split
from cifarpipe.data.batches import DeviceBatches, EpochBatches, channel_stats, dataloader_batches, whitening_images
from cifarpipe.pipeline.epochs import EpochRecord, StageHooks, history_csv
from cifarpipe.pipeline.phases import Phases, timed
from cifarpipe.tracking import provenance
from cifarpipe.tracking.job_process import JobProcess, JobStart, MlflowProcessLost, RemoteRun
from cifarpipe.tracking.journal import journal_path
from cifarpipe.training import checkpoint, distributed, engine
from cifarpipe.training.distributed import Group
from cifarpipe.training.step import warm_up
from cifarpipe.training.stop import StopRequest

# The code whose change makes a half-trained checkpoint someone else's: it is part of the job's
# fingerprint, so other code never continues it silently.
_PACKAGE = Path(engine.__file__).parents[1]
TRAINING_CODE = [_PACKAGE / "training" / name for name in ("engine.py", "optim.py", "models.py", "distributed.py",
                                                          "step.py", "lookahead.py")] + [
    _PACKAGE / "data" / "batches.py", Path(__file__), _PACKAGE / "pipeline" / "epochs.py"]
MLFLOW_PROCESS_LOST_EXIT = 3  # the MLflow process died under the stage: a failure DVC reruns, not a user error


@dataclass(frozen=True)
class TrainPaths:
    """The train stage's inputs and outputs (dvc.yaml is the one place that names them)."""
    data: Path
    split: Path
    checkpoint_dir: Path  # one folder per job: <checkpoint_dir>/<fingerprint>/{last,best}.pt
    weights: Path
    history: Path
    run_id: Path
    metrics: Path
    tensorboard_dir: Path
    params_in_force: Path | None = None  # the values in force, for `dvc exp show` (config.params_in_force_text)


def main(paths: TrainPaths, params_path: Path, script: str, argv: list[str], tracker: JobProcess | None) -> int:
    """The stage: validate params, then train in this process, or start `script argv` under
    torchrun once per process (train.nproc_per_node > 1). `tracker`: the MLflow process the stage
    script started (None in ranks other than 0). Returns the exit status."""
    phases = Phases("train")
    params = load_params(params_path)
    p = params.train
    device = engine.pick_device(p.device)
    if not distributed.under_torchrun():
        if changes := recipe_changes(params_path):  # the values in force where they differ from params.yaml's
            print(f"recipe {params.recipe}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()),
                  flush=True)
        if p.nproc_per_node > 1:
            distributed.check_world(p, p.nproc_per_node, device)
            print(f"train.nproc_per_node = {p.nproc_per_node}: torchrun "
                  + shlex.join(distributed.launch_args(p.nproc_per_node, script, argv)), flush=True)
            if tracker:
                tracker.close()  # rank 0 starts its own
            return distributed.launch(p.nproc_per_node, script, argv, device.type)
    try:
        return distributed.run_in_group(p, device, lambda device, group: train(paths, params, device, group, phases,
                                                                                tracker if group.is_main else None))
    except MlflowProcessLost as e:
        print(f"error: {e}. What was trained is in the job's checkpoints: `dvc repro` resumes, in the same MLflow "
              "run", file=sys.stderr)
        return MLFLOW_PROCESS_LOST_EXIT


@dataclass
class TrainingData:
    """The split's training and validation images (uint8 NHWC) and labels, with what describes them."""
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: list[str]
    split_hash: str
    mean: list[float]  # per channel, 0..1 units: the normalisation of training, evaluation and the model
    std: list[float]


def load_data(paths: TrainPaths, params: Params) -> TrainingData:
    images, labels, classes = archive.load_part(paths.data, "train")
    split_text = paths.split.read_text()
    sp = split.from_json(split_text)
    train_x, train_y = images[sp.train], labels[sp.train]
    p = params.train
    if p.drop_last and p.batch_size > len(train_y):
        raise UserError(f"params.yaml: train.batch_size = {p.batch_size}: larger than the {len(train_y)} "
                        "training images, so there is no full batch (train.drop_last is true)")
    mean, std = channel_stats(train_x)
    return TrainingData(train_x, train_y, images[sp.val], labels[sp.val], classes, split.split_hash(split_text), mean, std)


def find_resume_point(job_dir: Path) -> tuple[dict | None, Path | None]:
    """Rank 0: the job's checkpoint to continue from (last.pt, else best.pt), after clearing what
    an interrupted write left; an unreadable one is set aside, never a dead end."""
    for stale in atomic.remove_stale_temporaries(job_dir):
        print(f"removed {stale.name}, left by an interrupted write")
    resume, resume_path, notes = checkpoint.resume_point(job_dir)
    for note in notes:
        print(note)
    project_run = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run .` created for this job
    if resume and resume["complete"] and project_run not in (None, resume["mlflow_run_id"]):
        print(f"{resume_path}: this training finished in MLflow run {resume['mlflow_run_id']}; "
              f"`mlflow run` created run {project_run} for a new one, so it trains again")
        return None, None
    return resume, resume_path


def epoch_batches(data: TrainingData, params: Params, device: torch.device, group: Group):
    """(steps per epoch, batches(epoch, start_step), validation batches()) of this process."""
    p = params.train
    shard = {"rank": group.rank, "world_size": group.world_size}
    val = DeviceBatches(torch.from_numpy(data.val_x).to(device), torch.from_numpy(data.val_y),
                        params.evaluate.batch_size, data.mean, data.std, augment=None, shuffle=False, **shard)
    if p.loader in ("device", "device_epoch"):  # the whole training part on the device; each process its part of a batch
        kind = EpochBatches if p.loader == "device_epoch" else DeviceBatches  # the same batches, made per epoch
        train = kind(torch.from_numpy(data.train_x).to(device), torch.from_numpy(data.train_y),
                              p.batch_size, data.mean, data.std, p.augment, seed=p.seed, drop_last=p.drop_last, **shard)
        return len(train), train.epoch, lambda: val.epoch(0)
    # the course's DataLoader path, the baseline; resumes at epoch boundaries only
    n = len(data.train_y)
    steps = n // p.batch_size if p.drop_last else -(-n // p.batch_size)

    def batches(epoch: int, start_step: int):
        loader = dataloader_batches(data.train_x, data.train_y, p.batch_size, data.mean, data.std, p.augment,
                                    p.seed, epoch, num_workers=p.num_workers, drop_last=p.drop_last)
        return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)

    return steps, batches, lambda: val.epoch(0)


def train(paths: TrainPaths, params: Params, device: torch.device, group: Group, phases: Phases,
          tracker: JobProcess | None) -> int:
    """This process's training; rank 0 (`tracker`: its MLflow process) also reads and writes
    checkpoints, outputs and the MLflow run."""
    p = params.train
    main = group.is_main
    with ThreadPoolExecutor(1, thread_name_prefix="warm-up") as pool:
        # torch._dynamo, which the optimizer's first method call imports (1.6 s on a 2-core CPU),
        # while the data loads
        dynamo = pool.submit(timed, lambda: importlib.import_module("torch._dynamo"), phases.background, "warm-up")
        try:
            data = load_data(paths, params)
            phases.lap("load data")
            job_dir, resume, resume_path = resume_point(paths, params, data, group)
            phases.lap("resume point")
            steps_per_epoch, train_batches, val_batches = epoch_batches(data, params, device, group)
            setup = build_setup(data, params, device, group, steps_per_epoch)  # the recipe of params.yaml
            phases.lap("model and batches")
            state = restored_state(resume, setup, params, device)
        except Exception:
            if tracker:
                tracker.ready()  # a store that does not answer is reported first: nothing works without it
            raise
        dynamo.result()
        # an unreachable store (UserError) stops the stage here, before any training
        ready = tracker.ready() if tracker else None
        phases.lap("store")
    if ready:
        phases.background["MLflow process"] = ready.seconds
    if main:
        checkpoint.claim(job_dir)  # made here for a new job: an unreachable store leaves no folder behind

    run = None
    if main:  # MLflow: open the job's run
        run = tracker.open(params, JobStart(
            job_dir.name, data.split_hash, provenance.environment_tags(engine.device_name(device)), resumed=bool(resume),
            resume_run_id=resume["mlflow_run_id"] if resume else None, history=state.history,
            n_train=len(data.train_y), n_val=len(data.val_y), complete=bool(resume and resume["complete"]),
            checkpoint=resume_path, job_dir=job_dir), journal_path(paths.run_id), paths.run_id,
            paths.tensorboard_dir)
        say_what_runs(run, state, params, resume_path, steps_per_epoch, len(data.train_y), device, group, ready.uri)
        phases.lap("open run")

    prepare_steps(setup, state, p, train_batches, log=print if main else lambda line: None)
    if p.kernel_warmup_steps:
        phases.lap("kernel warm-up")

    stop = StopRequest(say=tqdm.write if main else None)
    hooks = StageHooks(stop, steps_per_epoch, p.epochs, mid_epoch=p.loader != "dataloader",
                       record=EpochRecord(run, setup, device, params, job_dir, paths.history) if main else None)
    try:
        with stop.installed():
            if not engine.fit(setup, state, p.epochs, train_batches, val_batches, steps_per_epoch, hooks,
                              group=group, log_every=p.log_every if main else 0, log=tqdm.write,
                              early_stopping=p.early_stopping):
                return stopped(state, stop, run, job_dir, device, group)
    except MlflowProcessLost:
        raise
    except BaseException:
        if run:
            try:
                run.stop("FAILED", attempts=1)
            except MlflowProcessLost as lost:  # the error that ended training is the one to see
                print(f"warning: {lost}; run {run.run_id} stays RUNNING until the next `dvc repro` continues it",
                      file=sys.stderr)
        raise
    phases.lap("epochs")
    if main:
        write_outputs(paths, params, state, setup, data, hooks.record, run, phases)
    return 0


def resume_point(paths: TrainPaths, params: Params, data: TrainingData, group: Group
                 ) -> tuple[Path, dict | None, Path | None]:
    """The job's checkpoint folder (params + data + code: experiments never overwrite each other's)
    and, read by rank 0 and sent to every process, the checkpoint to continue from."""
    fingerprint = checkpoint.fingerprint(flatten(params), params.data.md5, data.split_hash,
                                         checkpoint.code_digest(TRAINING_CODE))
    # beside the repository also in DVC's temporary copy (--queue, --temp): a killed experiment resumes
    job_dir = workspace.beside_repository(paths.checkpoint_dir) / fingerprint
    if group.is_main and job_dir.exists():  # a new job's folder is made (and claimed) once the store answered
        checkpoint.claim(job_dir)
    resume, resume_path = find_resume_point(job_dir) if group.is_main else (None, None)
    return job_dir, group.broadcast(resume), resume_path


def restored_state(resume: dict | None, setup: engine.TrainingSetup, params: Params,
                   device: torch.device) -> engine.TrainState:
    """Where training starts: the checkpoint's state (model, optimizer, scheduler and generators
    loaded), or the beginning."""
    if not resume:
        return engine.TrainState()
    return checkpoint.restore(resume, setup, device, mid_epoch=params.train.loader != "dataloader")


def stopped(state: engine.TrainState, stop: StopRequest, run: RemoteRun | None, job_dir: Path,
            device: torch.device, group: Group) -> int:
    """A stop request ended the loop at a safe point (its checkpoint is written): one exit status
    for all processes (a signal may have reached only one). The others exit 0 at once; rank 0
    returns it after the run is closed: a failed process would make torchrun stop the rest, rank 0
    in the middle of its last MLflow calls."""
    exit_code = group.max(stop.exit_code, device)
    if not group.is_main:
        return 0
    run.stop("KILLED")
    where = (f"in epoch {state.epoch + 1} after batch {state.progress.step}" if state.progress.step
             else f"after epoch {state.epoch}")
    how = ("Run `dvc repro` to resume." if not workspace.in_temporary_copy() else
           f"To resume, queue experiment {workspace.experiment_name()!r} again with the same params "
           "(`dvc exp run --queue -n NAME -S ...`) and run `dvc queue start` (docs/10-tools.md).")
    print(f"stopped {where}: checkpoint saved to {job_dir / 'last.pt'}. {how}")
    return exit_code


def build_setup(data: TrainingData, params: Params, device: torch.device, group: Group,
                steps_per_epoch: int) -> engine.TrainingSetup:
    """engine.build_training with what the recipe needs of the data: airnet's whitening images."""
    init = (whitening_images(torch.from_numpy(data.train_x).to(device), data.mean, data.std)
            if params.model.name == "airnet" else None)
    return engine.build_training(params.model, params.train, device, group, steps_per_epoch=steps_per_epoch,
                                 init_images=init)


def prepare_steps(setup: engine.TrainingSetup, state: engine.TrainState, p: TrainParams,
                  train_batches: Callable[[int, int], engine.Batches], log: Callable[[str], None]) -> None:
    """Before the timed epochs: airnet's whitening time joins epoch 1's (airbench94's timer counts it
    too); the kernel warm-up (train.kernel_warmup_steps, undone bitwise) and the CUDA graph's capture
    do not, and are printed instead."""
    if not state.history and not state.progress.step and setup.init_seconds:
        state.seconds = setup.init_seconds
        log(f"whitening layer computed from the training images in {setup.init_seconds:.3f} s (part of epoch 1's time)")
    if p.kernel_warmup_steps and state.epoch < p.epochs and not state.stopped_early:
        t0 = time.perf_counter()
        x, y = next(iter(train_batches(state.epoch, 0)))
        warm_up(setup.step, x, y, p.kernel_warmup_steps)
        captured = ", then the step captured as a CUDA graph" if getattr(setup.step, "graph", None) else ""
        log(f"kernel warm-up: {p.kernel_warmup_steps} steps, undone{captured}, in {time.perf_counter() - t0:.2f} s "
            "(not part of the epochs' time)")


def say_what_runs(run: RemoteRun, state: engine.TrainState, params: Params, resume_path: Path | None,
                  steps_per_epoch: int, n_train: int, device: torch.device, group: Group, uri: str) -> None:
    """Rank 0's account of what this execution does: train, resume, complete a killed job's run, or
    reuse a finished job's weights in a run of its own (naming the checkpoint it really uses)."""
    p = params.train
    trained = state.epoch == p.epochs or state.stopped_early
    if trained and run.reuses:
        print(f"{resume_path}: this job (the same params that shape training, data and code) finished in MLflow "
              f"run {run.reuses}: nothing is trained now. Its weights and history become the outputs, recorded in "
              f"MLflow run {run.run_id}, this execution's (tag reuses_run). To train again, move {resume_path.parent} "
              "away.")
        return
    if trained:  # killed after its last epoch, before its outputs and run were complete
        done = (f"early stopping ended training after epoch {state.epoch} of {p.epochs}" if state.stopped_early
                else f"all {p.epochs} epochs are trained")
        print(f"{resume_path}: {done}; completing the outputs and MLflow run {run.run_id} from it (no retraining)")
        return
    if resume_path:
        print(f"resuming from {resume_path}: epoch {state.epoch + 1}, batch {state.progress.step} of "
              f"{steps_per_epoch}" + (f", in {group.world_size} processes" if group.active else ""))
    print(f"training {params.model.name} on {device} for {p.epochs} epochs, {steps_per_epoch * p.batch_size} "
          f"of {n_train} images per epoch ({steps_per_epoch} batches of {p.batch_size}"
          + (f", {p.batch_size // group.world_size} in each of {group.world_size} processes" if group.active
             else "") + f"); MLflow run {run.run_id} in {uri}")


def write_outputs(paths: TrainPaths, params: Params, state: engine.TrainState, setup: engine.TrainingSetup,
                  data: TrainingData, record: EpochRecord, run: RemoteRun, phases: Phases) -> None:
    """A finished training's outputs (weights, history, metrics, the complete checkpoint), then
    MLflow: the run closed with its artifacts and model."""
    # NHWC (channels_last) was a training-speed choice; the weights file and the MLflow model get
    # the standard layout (chosen_weights), which loaders expect and torch.export (MLflow's pt2
    # format) saves without "No complete tensor found" warnings.
    weights, epoch = checkpoint.chosen_weights(params.evaluate.weights, state, setup.model, record.job_dir)
    checkpoint.save_weights(paths.weights, checkpoint.weights_file(weights, params, data.mean, data.std, data.classes,
                                                                   epoch))
    atomic.write_text(paths.history, history_csv(state.history))
    summary = training_summary(state, params, epoch)
    atomic.write_text(paths.metrics, json.dumps(summary, indent=2) + "\n")
    if paths.params_in_force:
        atomic.write_text(paths.params_in_force, params_in_force_text(params))
    if not run.reuses:  # a reused job's checkpoint stays its own: complete, naming the run that trained it
        record.save_checkpoint(state, complete=True)
    faults.hit("finish", state.epoch)
    phases.lap("outputs")
    tags = {"weights": params.evaluate.weights, "weights_epoch": str(epoch), "epochs_trained": str(state.epoch)}
    if state.stopped_early:
        tags["stopped_early_at"] = str(state.epoch)
    # Four validation images as they come (uint8, N x 32 x 32 x 3): the MLflow model's input
    # example, and with its output the model's signature.
    model_uri = run.close(best=record.best, last=record.last,
                          history=state.history, history_file=paths.history, weights=paths.weights,
                          weights_epoch=epoch, classes=data.classes, example=data.val_x[:4].copy(),
                          registered_model=params.tracking.registered_model, tags=tags,
                          metrics={"model_val_accuracy": summary["model_val_accuracy"], **phases.metrics()})
    phases.lap("close run")
    best = "" if epoch == summary["best_epoch"] else (f"; the best, {summary['best_val_accuracy']:.4f}, was epoch "
                                                      f"{summary['best_epoch']}")
    print(f"done: {paths.weights} holds the weights of epoch {epoch} of {state.epoch} trained (evaluate.weights "
          f"{params.evaluate.weights}, val accuracy {summary['model_val_accuracy']:.4f}{best}); model {model_uri}")
    print(phases.report(), flush=True)


def training_summary(state: engine.TrainState, params: Params, weights_epoch: int) -> dict[str, float]:
    """The training side of `dvc metrics`: best validation accuracy and its epoch, the validation
    accuracy of the weights in the weights file and their epoch, the epochs trained and asked for
    (fewer when early stopping ended training), the time spent."""
    history = state.history
    best = max(history, key=lambda row: row["val_accuracy"])
    return {"best_val_accuracy": best["val_accuracy"], "best_epoch": int(best["epoch"]),
            "model_val_accuracy": history[weights_epoch - 1]["val_accuracy"], "weights_epoch": weights_epoch,
            "epochs_trained": len(history), "epochs_requested": params.train.epochs,
            "stopped_early": state.stopped_early,
            "train_seconds": round(sum(row["epoch_seconds"] for row in history), 1)}
