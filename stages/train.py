"""Stage `train`: Adam + ReduceLROnPlateau on the split's training part, tracked in one MLflow run.

Reads params `model.*`, `train.*`, `tracking.*` and `data.md5`; paths come from dvc.yaml.
Resumable: after every epoch (and at a safe point on SIGINT/SIGTERM) a checkpoint is written
atomically; running the stage again (`dvc repro`) continues from it, in the same MLflow run.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

import cifarpipe
from cifarpipe import atomic, checkpoint, data, engine, faults, split, tracking
from cifarpipe.cli import run_stage, stage_parser
from cifarpipe.config import UserError, flatten, load_params
from cifarpipe.loader import DeviceBatches, channel_stats, dataloader_batches


class StopRequest:
    """SIGINT/SIGTERM ask for a checkpoint at the next safe point; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.exit_code = 0

    def __call__(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after the current batch ...")


def main() -> int:
    ap = stage_parser(__doc__.splitlines()[0])
    for name in ("--data", "--split", "--checkpoint-dir", "--weights", "--history", "--run-id"):
        ap.add_argument(name, type=Path, required=True)
    args = ap.parse_args()
    params = load_params(args.params)
    p = params.train
    flat = flatten(params)
    device = engine.pick_device(p.device)
    client = tracking.connect()  # an unreachable store fails here, before any work

    arrays = data.load_arrays(args.data)
    split_text = args.split.read_text()
    sp = split.from_json(split_text)
    split_hash = split.split_hash(split_text)
    fingerprint = checkpoint.fingerprint(flat, params.data.md5, split_hash)

    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for stale in atomic.remove_stale_temporaries(args.checkpoint_dir):
        print(f"removed {stale.name}, left by an interrupted write")
    last_path, best_path = args.checkpoint_dir / "last.pt", args.checkpoint_dir / "best.pt"
    resume, abandoned_run = checkpoint.load_for_resume(last_path, fingerprint)

    # ---- model, optimizer, scheduler (the course's recipe; values from params.yaml)
    setup = engine.build_training(params.model, p, device)
    model, step_model, optimizer, scheduler = setup.model, setup.step_model, setup.optimizer, setup.scheduler
    loss_fn, amp = setup.loss_fn, setup.amp

    # ---- data: the training part of the split, resident on the device
    train_x, train_y = arrays.train_images[sp.train], arrays.train_labels[sp.train]
    val_x, val_y = arrays.train_images[sp.val], arrays.train_labels[sp.val]
    mean, std = channel_stats(train_x)
    val_batches = DeviceBatches(torch.from_numpy(val_x).to(device), torch.from_numpy(val_y), params.evaluate.batch_size,
                                mean, std, augment=None, shuffle=False)
    if p.loader == "device":
        train_batches = DeviceBatches(torch.from_numpy(train_x).to(device), torch.from_numpy(train_y), p.batch_size,
                                      mean, std, p.augment, seed=p.seed)
        steps_per_epoch = len(train_batches)

        def epoch_batches(epoch: int, start_step: int):
            return train_batches.epoch(epoch, start_step)
    else:  # the course's DataLoader path, the baseline; resumes at epoch boundaries only
        steps_per_epoch = -(-len(train_y) // p.batch_size)

        def epoch_batches(epoch: int, start_step: int):
            loader = dataloader_batches(train_x, train_y, p.batch_size, mean, std, p.augment, p.seed, epoch,
                                        num_workers=p.num_workers)
            return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)

    # ---- resume or start
    start_epoch, history, best_acc, progress, carried_seconds, run_id = 0, [], -1.0, engine.EpochProgress(), 0.0, None
    if resume:
        model.load_state_dict(resume["model_state_dict"])
        optimizer.load_state_dict(resume["optimizer_state_dict"])
        scheduler.load_state_dict(resume["scheduler_state_dict"])
        checkpoint.restore_rng_state(resume["rng"], device)
        start_epoch, history, best_acc = resume["epoch"], resume["history"], resume["best_val_accuracy"]
        progress = engine.EpochProgress(**resume["epoch_progress"])
        if p.loader == "dataloader" and progress.step:
            progress = engine.EpochProgress()  # DataLoader order can't be replayed mid-epoch: redo the epoch
        carried_seconds = resume["epoch_seconds_so_far"] if progress.step else 0.0
        run_id = resume["mlflow_run_id"]
        print(f"resuming from {last_path}: epoch {start_epoch + 1}, batch {progress.step} of {steps_per_epoch}")

    if abandoned_run:
        tracking.mark_abandoned(client, abandoned_run, "params or data changed before it finished")
    record = tracking.run_record(params)  # run name, DVC experiment, source/user tags, how to reproduce
    tracker = tracking.Tracker.start(client, params.tracking.experiment, run_id, run_name=record.name)
    if resume and run_id and tracker.run_id != run_id:  # e.g. `mlflow run .` continues a killed job
        tracking.mark_abandoned(client, run_id, f"continued in run {tracker.run_id}")
    atomic.write_text(args.run_id, tracker.run_id + "\n")
    if resume and tracker.run_id == run_id:
        tracker.queue_history(history, skip=tracker.logged_steps())  # fill what the killed process never sent
    else:
        tags = {**tracking.git_state(), **tracking.environment_tags(engine.device_name(device)),
                "data_md5": params.data.md5, "split_hash": split_hash, "fingerprint": fingerprint,
                "deterministic": str(p.deterministic).lower()}
        tracker.log_start(flat, tags, tracking.requirements_text())
        tracking.log_record(client, tracker.run_id, record)
        tracker.queue_history(history)  # a resumed job in a new run (the old one was deleted): all epochs
    tracking.log_datasets(client, tracker.run_id, [
        tracking.dataset_input(part, params.data.url, params.data.md5, n, split_hash)
        for part, n in (("training", len(train_y)), ("validation", len(val_y)))])
    if params.tracking.system_metrics:
        tracker.system_metrics = tracking.SystemMetrics.start(client, tracker.run_id,
                                                              resume=bool(resume) and tracker.run_id == run_id)
    print(f"training {params.model.name} on {device} for {p.epochs} epochs, {len(train_y)} images "
          f"({steps_per_epoch} batches of {p.batch_size}); MLflow run {tracker.run_id} in {tracking.tracking_uri()}")

    def make_checkpoint(epoch_done: int, prog: engine.EpochProgress, seconds: float, complete: bool = False) -> dict:
        return {"epoch": epoch_done, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
                "loss": history[-1]["train_loss"] if history else float("nan"),
                "step": prog.step, "epoch_progress": vars(prog).copy(), "epoch_seconds_so_far": seconds,
                "history": history, "best_val_accuracy": best_acc, "rng": checkpoint.rng_state(device),
                # Data order and augmentation of epoch e are drawn from a generator seeded with
                # epoch_seed(train.seed, e): this seed regenerates the whole stream of any epoch.
                "data_rng_seed": p.seed,
                "mlflow_run_id": tracker.run_id, "fingerprint": fingerprint, "complete": complete,
                "model_name": params.model.name}

    stop = StopRequest()
    # The DataLoader path can't replay half an epoch: it stops at the end of the epoch instead.
    stop_inside_epoch = (lambda: stop.requested) if p.loader == "device" else (lambda: False)
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for epoch in range(start_epoch, p.epochs):
            number = epoch + 1
            t0 = time.perf_counter()
            with tqdm(total=steps_per_epoch, initial=progress.step, desc=f"epoch {number}/{p.epochs}",
                      unit="batch", leave=False, mininterval=0.5) as bar:
                def on_step(step: int) -> None:
                    bar.update(1)
                    faults.hit("step", number, step)

                progress = engine.train_one_epoch(step_model, epoch_batches(epoch, progress.step), optimizer, loss_fn,
                                                  progress=progress, amp=amp, log_every=p.log_every, log=tqdm.write,
                                                  on_step=on_step, should_stop=stop_inside_epoch)
            seconds = carried_seconds + time.perf_counter() - t0
            carried_seconds = 0.0
            if progress.step < steps_per_epoch:  # stopped at a safe point inside the epoch
                checkpoint.save(last_path, make_checkpoint(epoch, progress, seconds))
                tracker.drain(fallback=args.checkpoint_dir / "mlflow_unlogged.json")
                tracker.finish("KILLED")
                print(f"stopped in epoch {number} after batch {progress.step}: checkpoint saved to {last_path}. "
                      "Run `dvc repro` to resume.")
                return stop.exit_code

            faults.hit("validation", number)
            val = engine.evaluate(step_model, val_batches.epoch(0), amp=amp)
            lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
            scheduler.step(val.accuracy if p.scheduler.mode == "max" else val.loss)
            row = {"epoch": number, "train_loss": progress.loss, "train_accuracy": progress.accuracy,
                   "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": lr, "epoch_seconds": seconds,
                   "images_per_second": progress.seen / seconds}
            history.append(row)
            improved = val.accuracy > best_acc
            best_acc = max(best_acc, val.accuracy)
            ckpt = make_checkpoint(number, engine.EpochProgress(), 0.0)
            if improved:  # best first: a kill between the two writes then just redoes this epoch
                checkpoint.save(best_path, ckpt)
            checkpoint.save(last_path, ckpt)
            faults.hit("after_checkpoint", number)
            atomic.write_text(args.history, pd.DataFrame(history).to_csv(index=False))
            tracker.queue_history([row])
            tracker.log_artifact(last_path, "checkpoints", background=True)
            if improved:
                tracker.log_artifact(best_path, "checkpoints", background=True)
            progress = engine.EpochProgress()
            print(f"epoch {number:3d}/{p.epochs}  train loss {row['train_loss']:.4f}  val loss {val.loss:.4f}  "
                  f"val acc {val.accuracy:.4f}  lr {lr:.2e}  {seconds:6.1f} s  {row['images_per_second']:8.0f} img/s",
                  flush=True)
            if stop.requested:
                tracker.drain(fallback=args.checkpoint_dir / "mlflow_unlogged.json")
                tracker.finish("KILLED")
                print(f"stopped after epoch {number}: checkpoint saved to {last_path}. Run `dvc repro` to resume.")
                return stop.exit_code
    except BaseException:
        tracker.drain(attempts=1, fallback=args.checkpoint_dir / "mlflow_unlogged.json")
        tracker.finish("FAILED")
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)

    # ---- finished: weights output, complete checkpoint, artifacts, the model
    # NHWC (channels_last) was a training-speed choice; the weights file and the MLflow model get
    # the standard layout, which loaders expect and torch.export (MLflow's pt2 format) saves
    # without "No complete tensor found" warnings.
    model = model.to("cpu", memory_format=torch.contiguous_format)
    checkpoint.save_weights(args.weights, checkpoint.weights_file(model, params, mean, std, arrays.classes))
    checkpoint.save(last_path, make_checkpoint(p.epochs, engine.EpochProgress(), 0.0, complete=True))
    atomic.write_text(args.history, pd.DataFrame(history).to_csv(index=False))
    try:
        tracker.drain(fallback=args.checkpoint_dir / "mlflow_unlogged.json")
        for path in (last_path, best_path):
            tracker.log_artifact(path, "checkpoints")
        tracker.log_artifact(args.history)
        example = next(iter(DeviceBatches(torch.from_numpy(val_x[:4]), torch.from_numpy(val_y[:4]), 4, mean, std,
                                          shuffle=False).epoch(0)))[0].contiguous().numpy()
        model_uri = tracker.log_model(model, example, Path(cifarpipe.__file__).parent)
        if params.tracking.registered_model:
            tracking.register_model_version(client, params.tracking.registered_model, tracker.run_id, model_uri)
        tracker.finish("FINISHED")
    except Exception as e:  # the training result is safe on disk; MLflow gets what it could
        print(f"warning: training finished and its outputs are written, but MLflow logging at the end failed "
              f"({type(e).__name__}: {e}); the run {tracker.run_id} may lack the model or final artifacts",
              file=sys.stderr)
        model_uri = "not logged"
    print(f"done: best val accuracy {best_acc:.4f}; weights {args.weights}; model {model_uri}")
    return 0


if __name__ == "__main__":
    run_stage(main)
