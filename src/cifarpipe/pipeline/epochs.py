"""The train stage's side of the epoch loop: progress bar, stop requests, fault points, and on
rank 0 the record of every epoch (checkpoints, history.csv, the MLflow run's epoch)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch
from tqdm import tqdm

from cifarpipe import atomic, faults
from cifarpipe.config import Params
from cifarpipe.tracking.job_process import RemoteRun
from cifarpipe.training import checkpoint, engine
from cifarpipe.training.stop import StopRequest


def history_csv(history: list[dict[str, float]]) -> str:
    """The per-epoch rows as CSV, a header of their keys (the DVC plots' source); a NaN (a loss
    that diverged) is an empty field, as pandas writes and reads it."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]) if history else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                     for row in history)
    return out.getvalue()


class EpochRecord:
    """Rank 0's record of every epoch: checkpoints (best first, then last), the history file,
    and the run's metrics and checkpoint models."""

    def __init__(self, run: RemoteRun, setup: engine.TrainingSetup, device: torch.device, params: Params,
                 job_dir: Path, history_path: Path) -> None:
        self.run, self.setup, self.device, self.params, self.job_dir = run, setup, device, params, job_dir
        self.last, self.best, self.history_path = job_dir / "last.pt", job_dir / "best.pt", history_path

    def save_checkpoint(self, state: engine.TrainState, complete: bool = False, path: Path | None = None) -> None:
        checkpoint.save(path or self.last, checkpoint.build(
            state, self.setup, self.device, seed=self.params.train.seed, run_id=self.run.run_id,
            fingerprint=self.job_dir.name, model_name=self.params.model.name, complete=complete))

    def epoch(self, state: engine.TrainState, improved: bool) -> None:
        if improved:  # best first: a kill between the two writes then just redoes this epoch
            self.save_checkpoint(state, path=self.best)
        self.save_checkpoint(state)
        faults.hit("after_checkpoint", state.epoch)
        atomic.write_text(self.history_path, history_csv(state.history))
        self.run.epoch_done(state.history, self.last)


class StageHooks(engine.LoopHooks):
    """The train stage's side of the epoch loop: progress bar, stop requests, fault points, and on
    rank 0 the record of every epoch."""

    def __init__(self, stop: StopRequest, steps_per_epoch: int, epochs: int, *, mid_epoch: bool,
                 record: EpochRecord | None) -> None:
        self.stop, self.steps_per_epoch, self.epochs, self.mid_epoch = stop, steps_per_epoch, epochs, mid_epoch
        self.record = record  # rank 0; other processes: None (they write nothing)
        self.bar: tqdm | None = None

    def epoch_started(self, epoch: int, state: engine.TrainState) -> None:
        if self.record:
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
        if self.record:
            self.record.save_checkpoint(state)

    def validation_started(self, epoch: int) -> None:
        self._close_bar()
        faults.hit("validation", epoch + 1)

    def epoch_finished(self, state: engine.TrainState, row: dict[str, float], improved: bool) -> None:
        if not self.record:
            return
        self.record.epoch(state, improved)
        print(f"epoch {state.epoch:3d}/{self.epochs}  train loss {row['train_loss']:.4f}  val loss "
              f"{row['val_loss']:.4f}  val acc {row['val_accuracy']:.4f}  lr {row['lr']:.2e}  "
              f"{row['epoch_seconds']:6.1f} s  {row['images_per_second']:8.0f} img/s", flush=True)
        if state.stopped_early:
            n = state.epochs_without_improvement
            print(f"early stopping: no improvement in validation accuracy for {n} epoch{'s' if n != 1 else ''} "
                  f"(train.early_stopping): training stops after epoch {state.epoch} of {self.epochs}", flush=True)
