"""Stage `train`: Adam or SGD, ReduceLROnPlateau, warm-up, on the split's training part, tracked in one MLflow run.

Reads params `model.*`, `train.*`, `tracking.*` and `data.md5`; paths come from dvc.yaml.
Resumable: after every epoch (and at a safe point on SIGINT/SIGTERM) a checkpoint is written
atomically; running the stage again (`dvc repro`) continues from it, in the same MLflow run.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from cifarpipe import atomic, checkpoint, data, distributed, engine, faults, split, tracking
from cifarpipe.cli import run_stage, stage_parser
from cifarpipe.config import TrainParams, UserError, flatten, load_params, recipe_changes
from cifarpipe.loader import DeviceBatches, channel_stats, dataloader_batches


# The code whose change makes a half-trained checkpoint someone else's: it is part of the job's
# fingerprint, so other code never continues it silently.
_LIB = Path(engine.__file__).parent
TRAINING_CODE = [Path(__file__), _LIB / "engine.py", _LIB / "loader.py", _LIB / "models.py", _LIB / "distributed.py"]


class StopRequest:
    """SIGINT/SIGTERM ask for a checkpoint at the next safe point; a second SIGINT stops at once."""

    def __init__(self, quiet: bool = False) -> None:
        self.requested = False
        self.exit_code = 0
        self.quiet = quiet  # ranks other than 0: rank 0 says it once

    def __call__(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        if not self.quiet:
            tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after the current batch ...")


def training_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """The training side of `dvc metrics`: best validation accuracy, its epoch, the time spent."""
    best = max(history, key=lambda row: row["val_accuracy"])
    return {"best_val_accuracy": best["val_accuracy"], "best_epoch": int(best["epoch"]), "epochs": len(history),
            "train_seconds": round(sum(row["epoch_seconds"] for row in history), 1)}


def main() -> int:
    ap = stage_parser(__doc__.splitlines()[0])
    for name in ("--data", "--split", "--checkpoint-dir", "--weights", "--history", "--run-id", "--metrics"):
        ap.add_argument(name, type=Path, required=True)
    ap.add_argument("--tensorboard-dir", type=Path, default=Path("outputs/tensorboard"),
                    help="with tracking.tensorboard: event files go to <this>/<run name>_<run id>/")
    args = ap.parse_args()
    params = load_params(args.params)
    p = params.train
    device = engine.pick_device(p.device)
    if not distributed.under_torchrun():
        if changes := recipe_changes(args.params):  # the values in force where they differ from params.yaml's
            print(f"recipe {params.recipe}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()),
                  flush=True)
        if p.nproc_per_node > 1:  # this same command, once per process, under torchrun (one node)
            check_world(p, p.nproc_per_node, device)
            print(f"train.nproc_per_node = {p.nproc_per_node}: torchrun "
                  + shlex.join(distributed.launch_args(p.nproc_per_node, __file__, sys.argv[1:])), flush=True)
            return distributed.launch(p.nproc_per_node, __file__, sys.argv[1:], device.type)
    group = distributed.start(device.type)
    try:
        if group.active:
            if group.local_world_size != p.nproc_per_node:
                raise UserError(f"torchrun started {group.local_world_size} processes per node but params.yaml has "
                                f"train.nproc_per_node = {p.nproc_per_node}: set it to {group.local_world_size} "
                                "so the run records what ran")
            check_world(p, group.world_size, device)
            if device.type == "cuda":
                device = torch.device("cuda", group.local_rank)
        return train(args, params, device, group)
    except Exception as e:
        if not group.active:
            raise
        if group.is_main or isinstance(e, UserError):
            # Report, then exit at once: the other processes see this one's connections close and
            # stop too, and torchrun must find this process already gone with its own status (2
            # for a UserError), not still shutting down, when it then stops the rest with SIGTERM.
            if isinstance(e, UserError):
                print(f"error: {e}", file=sys.stderr)
            else:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2 if isinstance(e, UserError) else 1)
        # Another process failed first (its collective call broke): rank 0 reports what happened,
        # this one says only why it stopped, not a second traceback.
        print(f"rank {group.rank}: stopped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
              file=sys.stderr)
        return 1
    finally:
        group.close()


def check_world(p: TrainParams, world_size: int, device: torch.device) -> None:
    """What several processes need, checked before any of them starts."""
    if p.batch_size % world_size:
        raise UserError(f"params.yaml: train.batch_size = {p.batch_size} does not split evenly over {world_size} "
                        f"processes (train.nproc_per_node x nodes): it is the batch of all of them together")
    if p.loader != "device":
        raise UserError(f"params.yaml: train.loader = {p.loader!r}: several processes need loader: device")
    if not p.drop_last:
        raise UserError("params.yaml: train.drop_last = false: several processes need drop_last: true "
                        "(an incomplete last batch would give some processes no images)")
    if device.type == "cuda" and p.nproc_per_node > torch.cuda.device_count():
        raise UserError(f"params.yaml: train.nproc_per_node = {p.nproc_per_node}, but this machine has "
                        f"{torch.cuda.device_count()} GPU(s): one process per GPU")
    if device.type == "mps":
        raise UserError("params.yaml: train.nproc_per_node > 1 needs CUDA (NCCL) or the CPU (gloo), not MPS")


class StageHooks(engine.LoopHooks):
    """The train stage's side of the epoch loop: progress bar, stop requests, and on rank 0 the
    checkpoints, history file and MLflow logging after every epoch."""

    def __init__(self, stop: StopRequest, steps_per_epoch: int, epochs: int, *, mid_epoch: bool,
                 save: "Saver | None") -> None:
        self.stop, self.steps_per_epoch, self.epochs, self.mid_epoch = stop, steps_per_epoch, epochs, mid_epoch
        self.save = save  # rank 0: Saver; other processes: None (they write nothing)
        self.bar: tqdm | None = None

    def epoch_started(self, epoch: int, state: engine.TrainState) -> None:
        if self.save:
            self.bar = tqdm(total=self.steps_per_epoch, initial=state.progress.step,
                            desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", leave=False, mininterval=0.5)

    def step_done(self, epoch: int, step: int) -> None:
        if self.bar:
            self.bar.update(1)
        faults.hit("step", epoch + 1, step)

    def stop_requested(self, inside_epoch: bool) -> bool:
        # The DataLoader path can't replay half an epoch: it stops at the end of the epoch instead.
        return self.stop.requested and (self.mid_epoch or not inside_epoch)

    def _close_bar(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None

    def stopped_in_epoch(self, state: engine.TrainState) -> None:
        self._close_bar()
        if self.save:
            self.save.interrupted(state)

    def validation_started(self, epoch: int) -> None:
        self._close_bar()
        faults.hit("validation", epoch + 1)

    def epoch_finished(self, state: engine.TrainState, row: dict[str, float], improved: bool) -> None:
        if not self.save:
            return
        self.save.epoch(state, row, improved)
        print(f"epoch {state.epoch:3d}/{self.epochs}  train loss {row['train_loss']:.4f}  val loss "
              f"{row['val_loss']:.4f}  val acc {row['val_accuracy']:.4f}  lr {row['lr']:.2e}  "
              f"{row['epoch_seconds']:6.1f} s  {row['images_per_second']:8.0f} img/s", flush=True)


class Saver:
    """Rank 0's record of the training: checkpoints (best first, then last), the history file,
    TensorBoard and the MLflow metrics of every epoch."""

    def __init__(self, tracker: tracking.Tracker, model, optimizer, scheduler, device: torch.device, seed: int,
                 fingerprint: str, model_name: str, last_path: Path, best_path: Path, history_path: Path,
                 tb_dir: Path | None, already_logged: dict[str, set[int]]) -> None:
        self.tracker, self.model, self.optimizer, self.scheduler, self.device = tracker, model, optimizer, scheduler, device
        self.seed, self.fingerprint, self.model_name = seed, fingerprint, model_name
        self.last_path, self.best_path, self.history_path, self.tb_dir = last_path, best_path, history_path, tb_dir
        self.already_logged = already_logged

    def checkpoint(self, state: engine.TrainState, complete: bool = False) -> dict:
        """The course's checkpoint dict, plus what an exact resume needs (see checkpoint.py)."""
        return {"epoch": state.epoch, "model_state_dict": self.model.state_dict(),
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict(),
                "loss": state.history[-1]["train_loss"] if state.history else float("nan"),
                "step": state.progress.step, "epoch_progress": vars(state.progress).copy(),
                "epoch_seconds_so_far": state.seconds,
                "history": state.history, "best_val_accuracy": state.best_val_accuracy,
                "rng": checkpoint.rng_state(self.device),
                # Data order and augmentation of epoch e are drawn from a generator seeded with
                # epoch_seed(train.seed, e): this seed regenerates the whole stream of any epoch.
                "data_rng_seed": self.seed,
                "mlflow_run_id": self.tracker.run_id, "fingerprint": self.fingerprint, "complete": complete,
                "model_name": self.model_name}

    def interrupted(self, state: engine.TrainState) -> None:
        checkpoint.save(self.last_path, self.checkpoint(state))

    def epoch(self, state: engine.TrainState, row: dict[str, float], improved: bool) -> None:
        ckpt = self.checkpoint(state)
        if improved:  # best first: a kill between the two writes then just redoes this epoch
            checkpoint.save(self.best_path, ckpt)
        checkpoint.save(self.last_path, ckpt)
        faults.hit("after_checkpoint", state.epoch)
        atomic.write_text(self.history_path, pd.DataFrame(state.history).to_csv(index=False))
        if self.tb_dir:  # rewritten from the whole history: a resumed job never writes an epoch twice
            tracking.write_tensorboard(self.tb_dir, state.history)
        self.tracker.queue_history([row], skip=self.already_logged)
        self.tracker.log_artifact(self.last_path, "checkpoints", background=True)
        if improved:
            self.tracker.log_artifact(self.best_path, "checkpoints", background=True)


def start_run(client, params, fingerprint: str, split_hash: str, device: torch.device, run_id: str | None,
              resume: dict | None, mlflow_project_run: str | None, journal: tracking.Pending, args,
              n_train: int, n_val: int) -> tuple[tracking.Tracker, Path | None, dict[str, set[int]]]:
    """Open the job's MLflow run (the checkpoint's, a run killed before its first checkpoint, or a
    new one) and record how it started. Returns the tracker, the TensorBoard folder (or None) and
    the epochs the run has already logged."""
    p = params.train
    # Runs this workspace left RUNNING: a job killed before its first checkpoint is continued in
    # its own run (it logged no epoch yet, and training from the seed redoes exactly its work);
    # any other is marked KILLED, and resumes from its checkpoint folder if its params come back.
    workspace = tracking.workspace_tags()
    try:
        orphans = tracking.running_runs(client, params.tracking.experiment, workspace["workspace_key"])
        unstarted = {o.info.run_id for o in orphans  # killed before the first checkpoint: continued below
                     if run_id is None and not resume and o.data.tags.get("fingerprint") == fingerprint
                     and not tracking.has_epoch_metrics(client, o.info.run_id)}
    except Exception as e:
        raise UserError(f"the MLflow store {tracking.tracking_uri()} did not answer a search ({type(e).__name__}); "
                        "nothing was trained and no run was changed: run again when it answers") from None
    for orphan in orphans:
        orphan_id = orphan.info.run_id
        if orphan_id in (run_id, mlflow_project_run):
            continue
        if run_id is None and orphan_id in unstarted:
            run_id = orphan_id
            print(f"continuing MLflow run {run_id}: its training was killed before the first checkpoint")
        else:
            tracking.mark_abandoned(client, orphan_id, "interrupted; another training ran in its workspace "
                                                       "(it resumes from its checkpoint if its params return)", journal)

    # Epochs the run has already logged: resuming from best.pt (last.pt unreadable) retrains epochs
    # the run logged before, and each epoch appears once in every curve.
    already_logged: dict[str, set[int]] = {}
    history = resume["history"] if resume else []
    record = tracking.run_record(params)  # run name, DVC experiment, source/user tags, how to reproduce
    tracker = tracking.Tracker.start(client, params.tracking.experiment, run_id, journal=journal,
                                     create_tags={**workspace, "fingerprint": fingerprint}, run_name=record.name)
    if run_id and tracker.run_id != run_id:  # e.g. `mlflow run .` continues a killed job
        tracking.mark_abandoned(client, run_id, f"continued in run {tracker.run_id}", journal)
    atomic.write_text(args.run_id, tracker.run_id + "\n")
    try:
        if resume and tracker.run_id == run_id:
            already_logged = tracker.logged_steps()
            tracker.queue_history(history, skip=already_logged)  # fill what the killed process never sent
        else:
            tags = {**tracking.git_state(), **tracking.environment_tags(engine.device_name(device)), **workspace,
                    "data_md5": params.data.md5, "split_hash": split_hash, "fingerprint": fingerprint,
                    "deterministic": str(p.deterministic).lower()}
            tracker.log_start(flatten(params), tags, tracking.requirements_text())
            tracking.log_record(client, tracker.run_id, record)
            tracker.queue_history(history)  # a resumed job in a new run (the old one was deleted): all epochs
    except Exception as e:  # the run stays RUNNING: the next attempt continues it (checkpoint or orphan scan)
        raise UserError(f"the MLflow store {tracking.tracking_uri()} failed while run {tracker.run_id} was being "
                        f"set up ({type(e).__name__}); nothing was trained: run again when it answers, the same "
                        "run continues") from None
    tracking.log_datasets(client, tracker.run_id, [
        tracking.dataset_input(part, params.data.url, params.data.md5, n, split_hash)
        for part, n in (("training", n_train), ("validation", n_val))])
    if params.tracking.system_metrics:
        tracker.system_metrics = tracking.SystemMetrics.start(client, tracker.run_id,
                                                              resume=bool(resume) and tracker.run_id == run_id)
    tb_dir = (tracking.tensorboard_dir(args.tensorboard_dir, client, tracker.run_id)
              if params.tracking.tensorboard else None)
    return tracker, tb_dir, already_logged


def train(args, params, device: torch.device, group: distributed.Group) -> int:
    p = params.train
    flat = flatten(params)
    main = group.is_main  # rank 0 alone reads and writes checkpoints, files and MLflow
    client = tracking.connect() if main else None  # an unreachable store fails here, before any work

    arrays = data.load_arrays(args.data)
    split_text = args.split.read_text()
    sp = split.from_json(split_text)
    split_hash = split.split_hash(split_text)
    fingerprint = checkpoint.fingerprint(flat, params.data.md5, split_hash, checkpoint.code_digest(TRAINING_CODE))

    # One folder per job (params + data + code): experiments never overwrite each other's checkpoints.
    job_dir = args.checkpoint_dir / fingerprint
    last_path, best_path = job_dir / "last.pt", job_dir / "best.pt"
    resume = resume_path = None
    if main:
        job_dir.mkdir(parents=True, exist_ok=True)
        for stale in atomic.remove_stale_temporaries(job_dir):
            print(f"removed {stale.name}, left by an interrupted write")
        resume, resume_path, notes = checkpoint.resume_point(job_dir)  # an unreadable one is set aside, never a dead end
        for note in notes:
            print(note)
    mlflow_project_run = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run .` created for this job
    if resume and resume["complete"] and mlflow_project_run not in (None, resume["mlflow_run_id"]):
        print(f"{resume_path}: this training finished in MLflow run {resume['mlflow_run_id']}; "
              f"`mlflow run` created run {mlflow_project_run} for a new one, so it trains again")
        resume = None
    resume = group.broadcast(resume)  # every process continues from rank 0's checkpoint
    journal = tracking.Pending(tracking.journal_path(args.run_id)) if main else None  # what the store did not take yet

    # ---- model, optimizer, scheduler (the course's recipe; values from params.yaml)
    setup = engine.build_training(params.model, p, device, group)
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler

    # ---- data: the training part of the split, resident on the device; each process takes its
    # part of every batch (one process: all of it)
    train_x, train_y = arrays.train_images[sp.train], arrays.train_labels[sp.train]
    val_x, val_y = arrays.train_images[sp.val], arrays.train_labels[sp.val]
    if p.drop_last and p.batch_size > len(train_y):
        raise UserError(f"params.yaml: train.batch_size = {p.batch_size}: larger than the {len(train_y)} "
                        "training images, so there is no full batch (train.drop_last is true)")
    mean, std = channel_stats(train_x)
    shard = {"rank": group.rank, "world_size": group.world_size}
    val_batches = DeviceBatches(torch.from_numpy(val_x).to(device), torch.from_numpy(val_y), params.evaluate.batch_size,
                                mean, std, augment=None, shuffle=False, **shard)
    if p.loader == "device":
        train_batches = DeviceBatches(torch.from_numpy(train_x).to(device), torch.from_numpy(train_y),
                                      p.batch_size, mean, std, p.augment, seed=p.seed, drop_last=p.drop_last, **shard)
        steps_per_epoch = len(train_batches)
        epoch_batches = train_batches.epoch
    else:  # the course's DataLoader path, the baseline; resumes at epoch boundaries only
        steps_per_epoch = len(train_y) // p.batch_size if p.drop_last else -(-len(train_y) // p.batch_size)

        def epoch_batches(epoch: int, start_step: int):
            loader = dataloader_batches(train_x, train_y, p.batch_size, mean, std, p.augment, p.seed, epoch,
                                        num_workers=p.num_workers, drop_last=p.drop_last)
            return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)

    # ---- resume or start
    state, run_id = engine.TrainState(), None
    if resume:
        model.load_state_dict(resume["model_state_dict"])
        optimizer.load_state_dict(resume["optimizer_state_dict"])
        scheduler.load_state_dict(resume["scheduler_state_dict"])
        checkpoint.restore_rng_state(resume["rng"], device)
        progress = engine.EpochProgress(**resume["epoch_progress"])
        if p.loader == "dataloader" and progress.step:
            progress = engine.EpochProgress()  # DataLoader order can't be replayed mid-epoch: redo the epoch
        state = engine.TrainState(epoch=resume["epoch"], progress=progress, history=resume["history"],
                                  seconds=resume["epoch_seconds_so_far"] if progress.step else 0.0,
                                  best_val_accuracy=resume["best_val_accuracy"])
        run_id = resume["mlflow_run_id"]
        if main and state.epoch == p.epochs:  # killed after its last epoch, before its outputs and run were complete
            print(f"{resume_path}: all {p.epochs} epochs are trained; completing the outputs and MLflow run "
                  f"{run_id} from it (no retraining)")
        elif main:
            print(f"resuming from {resume_path}: epoch {state.epoch + 1}, batch {progress.step} of {steps_per_epoch}"
                  + (f", in {group.world_size} processes" if group.active else ""))

    tracker = saver = None
    if main:
        tracker, tb_dir, already_logged = start_run(client, params, fingerprint, split_hash, device, run_id, resume,
                                                    mlflow_project_run, journal, args, len(train_y), len(val_y))
        print(f"training {params.model.name} on {device} for {p.epochs} epochs, {steps_per_epoch * p.batch_size} "
              f"of {len(train_y)} images per epoch ({steps_per_epoch} batches of {p.batch_size}"
              + (f", {p.batch_size // group.world_size} in each of {group.world_size} processes" if group.active
                 else "") + f"); MLflow run {tracker.run_id} in {tracking.tracking_uri()}")
        saver = Saver(tracker, model, optimizer, scheduler, device, p.seed, fingerprint, params.model.name,
                      last_path, best_path, args.history, tb_dir, already_logged)

    stop = StopRequest(quiet=not main)
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        hooks = StageHooks(stop, steps_per_epoch, p.epochs, mid_epoch=p.loader == "device", save=saver)
        finished = engine.fit(setup, state, p.epochs, epoch_batches, lambda: val_batches.epoch(0), steps_per_epoch,
                              hooks, group=group, log_every=p.log_every if main else 0, log=tqdm.write)
        if not finished:
            # One status for all processes (a signal may have reached only one). The others exit 0
            # at once; rank 0 returns it after the run is closed: a failed process would make
            # torchrun stop the rest, rank 0 in the middle of its last MLflow calls.
            exit_code = group.max(stop.exit_code, device)
            if not main:
                return 0
            tracker.drain()
            tracker.finish("KILLED")
            where = (f"in epoch {state.epoch + 1} after batch {state.progress.step}" if state.progress.step
                     else f"after epoch {state.epoch}")
            print(f"stopped {where}: checkpoint saved to {last_path}. Run `dvc repro` to resume.")
            return exit_code
    except BaseException:
        if tracker:
            tracker.drain(attempts=1)
            tracker.finish("FAILED")
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if not main:
        return 0

    # ---- finished: weights output, complete checkpoint, artifacts, the model
    # NHWC (channels_last) was a training-speed choice; the weights file and the MLflow model get
    # the standard layout, which loaders expect and torch.export (MLflow's pt2 format) saves
    # without "No complete tensor found" warnings.
    history = state.history
    model = model.to("cpu", memory_format=torch.contiguous_format)
    checkpoint.save_weights(args.weights, checkpoint.weights_file(model, params, mean, std, arrays.classes))
    atomic.write_text(args.history, pd.DataFrame(history).to_csv(index=False))
    atomic.write_text(args.metrics, json.dumps(training_summary(history), indent=2) + "\n")
    if saver.tb_dir:
        tracking.write_tensorboard(saver.tb_dir, history)
    checkpoint.save(last_path, saver.checkpoint(state, complete=True))
    faults.hit("finish", p.epochs)
    tensorboard = [(saver.tb_dir / tracking.TENSORBOARD_FILE, f"tensorboard/{saver.tb_dir.name}")] if saver.tb_dir else []
    model_uri = finish_run(tracker, checkpoints=[last_path, best_path], history=args.history, weights=args.weights,
                           example=model_example(val_x), extra_artifacts=tensorboard)
    if params.tracking.registered_model and model_uri.startswith(("models:/", "runs:/")):
        tracking.register_model_version(client, params.tracking.registered_model, tracker.run_id, model_uri)
    print(f"done: best val accuracy {state.best_val_accuracy:.4f}; weights {args.weights}; model {model_uri}")
    return 0


def model_example(val_x):
    """Four validation images as they come (uint8, N x 32 x 32 x 3): the MLflow model's input
    example, and with its output the model's signature."""
    return val_x[:4].copy()


def finish_run(tracker: tracking.Tracker, *, checkpoints: list[Path], history: Path, weights: Path,
               example, extra_artifacts: list[tuple[Path, str]] = ()) -> str:
    """Deliver a finished training's record: queued metrics, the checkpoints and history as
    artifacts, the model (logged from the weights file), then status FINISHED, last.

    Everything goes through the journal (tracker.journal): what the store does not take stays there
    and is delivered by evaluate or the next `dvc repro`; the stage still succeeds, since its
    outputs are complete and DVC must record them. Safe to call again for the same run (to finalize
    a run whose process was killed after the final checkpoint, or to redeliver): the model is
    logged once, artifacts overwrite, metrics already in the run are skipped. Returns the model's
    URI, or a note that it is pending.
    """
    journal = tracker.journal
    tracker.drain()  # queued per-epoch metrics: sent, or journaled
    for path in checkpoints:
        if path.exists():
            journal.add_artifact(tracker.run_id, path, "checkpoints")
    journal.add_artifact(tracker.run_id, history)
    for path, artifact_path in extra_artifacts:  # e.g. the TensorBoard event file: a `--logdir` once downloaded
        journal.add_artifact(tracker.run_id, path, artifact_path)
    journal.add_model(tracker.run_id, weights, example)
    tracker.finish("FINISHED")  # journals the status after the rest and delivers this run's items
    left = [it for it in journal.items if it["run_id"] == tracker.run_id]
    if left:
        print(f"warning: training finished and its outputs are written, but MLflow store {tracking.tracking_uri()} "
              f"did not take {len(left)} item(s) of run {tracker.run_id} ({journal.errors.get(tracker.run_id, '')}); "
              f"they are kept in {journal.path} and delivered by the evaluate stage or the next `dvc repro`",
              file=sys.stderr)
        return f"pending in {journal.path}"
    try:
        return tracking.logged_model_uri(tracker.client, tracker.run_id) or "not logged"
    except Exception:  # delivered a moment ago; only this look-up failed
        return f"runs:/{tracker.run_id}/model"


if __name__ == "__main__":
    run_stage(main)
