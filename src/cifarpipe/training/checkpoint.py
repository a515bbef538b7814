"""Checkpoints: the course's dict plus everything an exact resume needs, built (`build`) and
restored (`restore`) here and nowhere else.

Keys (the course's first): epoch, model_state_dict, optimizer_state_dict, scheduler_state_dict
(ReduceLROnPlateau's; {} with scheduler none; a warm-up's rate follows from the epoch), loss;
then step (optimizer steps into the unfinished epoch, 0 at an epoch boundary), epoch_progress
(that epoch's running sums), epoch_seconds_so_far, history (one dict of metrics per finished
epoch), best_val_accuracy, rng (torch CPU and CUDA generator states), data_rng_seed,
mlflow_run_id, fingerprint, complete (True once training is done and the final outputs are about
to be written), epochs_without_improvement, early_stopping_best and stopped_early (early
stopping's counter), model_name, schedule_step (optimizer steps of the whole training so far:
where the per-step rates and Lookahead continue) and lookahead_state_dict (its slow weights; {}
without).
airnet's whitening filters are weights of the model, in model_state_dict; the per-step rate tensors
are in optimizer_state_dict's groups and re-linked to the rate table on restore.

Each job keeps its checkpoints in a folder of its own, `<checkpoint dir>/<fingerprint>/`, where
the fingerprint hashes the training params, the data and the training code: one experiment
never overwrites another's checkpoints, and switching back to earlier params resumes (or
completes) that job instead of retraining it. Only tensors, numbers, strings, lists and dicts: `torch.load(weights_only=True)` reads
it, so loading a checkpoint never runs code from the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import IO, Any

import torch

from cifarpipe import atomic, faults
from cifarpipe.config import Params, UserError
from cifarpipe.training.engine import EpochProgress, TrainingSetup, TrainState

# Keys that do not change what training computes; a resume with them changed is still exact.
# The number of processes is one of them: the processes together train the batches one process
# would (loader.DeviceBatches), so a 2-process checkpoint resumes in 1 process and back.
_NOT_FINGERPRINTED = {"train.log_every", "train.device", "train.num_workers", "train.nproc_per_node"}


def code_digest(files: list[Path]) -> str:
    """Hash of the source files that shape training (the loop, the batches, the networks, the stage)."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(flat_params: dict[str, Any], data_md5: str, split_hash: str, code: str) -> str:
    """Hash of the training-relevant params, the data and the training code: a checkpoint resumes
    only into the same job. Other code never continues a half-trained checkpoint silently."""
    relevant = {k: v for k, v in flat_params.items()
                if k.split(".")[0] in ("model", "train") and k not in _NOT_FINGERPRINTED}
    blob = json.dumps({"params": relevant, "data_md5": data_md5, "split_hash": split_hash, "code": code},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's CPU generator, and the training GPU's (only that one: the job uses one device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def build(state: TrainState, setup: TrainingSetup, device: torch.device, *, seed: int, run_id: str,
          fingerprint: str, model_name: str, complete: bool = False) -> dict[str, Any]:
    """The checkpoint of `state`: the course's dict plus what an exact resume needs."""
    return {"epoch": state.epoch, "model_state_dict": setup.model.state_dict(),
            "optimizer_state_dict": setup.optimizer.state_dict(),
            "scheduler_state_dict": setup.scheduler.state_dict(),
            "loss": state.history[-1]["train_loss"] if state.history else float("nan"),
            "step": state.progress.step, "epoch_progress": vars(state.progress).copy(),
            "epoch_seconds_so_far": state.seconds,
            "history": state.history, "best_val_accuracy": state.best_val_accuracy,
            "rng": rng_state(device),
            # Data order and augmentation of epoch e are drawn from a generator seeded with
            # batches.epoch_seed(train.seed, e): this seed regenerates the whole stream of any epoch.
            "data_rng_seed": seed,
            "mlflow_run_id": run_id, "fingerprint": fingerprint, "complete": complete,
            "epochs_without_improvement": state.epochs_without_improvement,
            "early_stopping_best": state.early_stopping_best, "stopped_early": state.stopped_early,
            "model_name": model_name,
            "schedule_step": setup.step.global_step if setup.step else 0,
            "lookahead_state_dict": setup.step.lookahead.state_dict() if setup.step and setup.step.lookahead else {}}


def restore(ckpt: dict[str, Any], setup: TrainingSetup, device: torch.device, *, mid_epoch: bool) -> TrainState:
    """Load `ckpt` into the model, optimizer, scheduler and torch's generators; the training state
    to continue from. `mid_epoch` False (the DataLoader path, whose order can't be replayed
    mid-epoch): an unfinished epoch is redone from its start."""
    setup.model.load_state_dict(ckpt["model_state_dict"])
    setup.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    setup.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
    restore_rng_state(ckpt["rng"], device)
    progress = EpochProgress(**ckpt["epoch_progress"])
    schedule_step = ckpt.get("schedule_step", 0)
    if progress.step and not mid_epoch:
        schedule_step -= progress.step  # the unfinished epoch is redone from its start
        progress = EpochProgress()
    if setup.step:
        setup.step.global_step = schedule_step
        if setup.step.rates:  # load_state_dict put the file's (CPU) rate tensors into the groups
            setup.step.rates.attach(setup.optimizer)
        if setup.step.lookahead:
            setup.step.lookahead.load_state_dict(ckpt["lookahead_state_dict"])
    return TrainState(epoch=ckpt["epoch"], progress=progress, history=ckpt["history"],
                      seconds=ckpt["epoch_seconds_so_far"] if progress.step else 0.0,
                      best_val_accuracy=ckpt["best_val_accuracy"],
                      epochs_without_improvement=ckpt["epochs_without_improvement"],
                      early_stopping_best=ckpt["early_stopping_best"], stopped_early=ckpt["stopped_early"])


def save(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a kill or a full disk during the write leaves the previous file intact."""
    _save_atomic(path, checkpoint, fault_epoch=checkpoint["epoch"])


def save_weights(path: Path, weights: dict[str, Any]) -> None:
    _save_atomic(path, weights)


def _save_atomic(path: Path, obj: dict[str, Any], fault_epoch: int | None = None) -> None:
    try:
        with atomic.atomic_open(path, "wb") as f:
            torch.save(obj, f)
            if fault_epoch is not None:
                faults.hit("checkpoint_write", fault_epoch)
    except OSError as e:
        raise UserError(f"could not write {path}: {os.strerror(e.errno) if e.errno else e}; "
                        "the previous file is intact") from None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- one process per job folder
LOCK_NAME = "job.lock"  # in the job's folder; held (flock) by the process training the job
_CLAIMED: dict[Path, IO] = {}  # this process's claims, held until it exits


def claim(job_dir: Path) -> None:
    """Claim the job's folder for this process until it exits: two processes training one job
    (two queued experiments with the same params, which share <repo>/outputs/checkpoints/) would
    overwrite each other's checkpoints. UserError when another process holds it. An advisory
    lock (flock): the kernel drops it when the process ends, however it ends, so a killed job
    leaves no stale lock. Without fcntl (Windows) there is no claim."""
    try:
        import fcntl
    except ImportError:
        return
    job_dir = Path(job_dir).resolve()
    if job_dir in _CLAIMED:
        return
    job_dir.mkdir(parents=True, exist_ok=True)
    f = open(job_dir / LOCK_NAME, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"{job_dir}: another process is training this job (same params, data and code) "
                        "right now; run again once it has finished, which then completes from its "
                        "checkpoint without training") from None
    _CLAIMED[job_dir] = f


def release(job_dir: Path) -> None:
    """End this process's claim on `job_dir` (cifarpipe-gc, after removing a finished job's files)."""
    f = _CLAIMED.pop(Path(job_dir).resolve(), None)
    if f is not None:
        f.close()  # closing the file drops its flock


def is_claimed(job_dir: Path) -> bool:
    """Whether a process (another one, or this one) is training the job in `job_dir` now."""
    try:
        import fcntl
    except ImportError:
        return False
    if Path(job_dir).resolve() in _CLAIMED:
        return True
    try:
        f = open(Path(job_dir) / LOCK_NAME, "r")
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# What every checkpoint of the train stage holds; a file without them is no resume point.
_RESUME_KEYS = ("epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "step", "epoch_progress",
                "history", "best_val_accuracy", "rng", "mlflow_run_id", "complete",
                "epochs_without_improvement", "early_stopping_best", "stopped_early")


def resume_point(job_dir: Path) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
    """The checkpoint to resume the job from, its file, and what was done to get it (messages for the user).

    `last.pt` first, else `best.pt` (saved at an epoch boundary with the same full state, so resuming
    from it replays the later epochs exactly). A file that does not load (a truncated copy, a disk
    fault) is never deleted and never blocks the pipeline: it is set aside as
    `<name>.unreadable-<time>` for inspection, and the next candidate is tried; with none left,
    training starts fresh.
    """
    notes = []
    for name in ("last.pt", "best.pt"):
        path = job_dir / name
        try:
            ckpt = load(path)
            missing = [k for k in _RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(_RESUME_KEYS)
            if missing:
                raise UserError(f"{path}: not a checkpoint of this pipeline (it lacks {', '.join(missing)})")
        except FileNotFoundError:
            continue
        except UserError as e:
            aside = path.with_name(f"{name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            notes.append(f"{e}\n  -> set aside as {aside} (kept, not deleted)")
            continue
        if notes:
            notes.append(f"{path} (epoch {ckpt['epoch']}) is the newest readable checkpoint")
        return ckpt, path, notes
    if notes:
        notes.append("no readable checkpoint is left: training starts from the beginning")
    return None, None, notes


def chosen_weights(choice: str, state: TrainState, model: torch.nn.Module, job_dir: Path
                   ) -> tuple[dict[str, torch.Tensor], int]:
    """The one place that picks the weights of evaluate.weights: their state dict (on the CPU, in
    the standard layout) and epoch. last: `model` as training left it. best: the first epoch of the
    highest validation accuracy, the one best.pt holds (it is written on a strict improvement
    only); `model` itself when that is the last epoch. Validation decides, never the test set."""
    epoch = state.epoch
    if choice == "best":
        epoch = int(max(state.history, key=lambda row: row["val_accuracy"])["epoch"])
    source = model.state_dict()
    if epoch != state.epoch:
        path = job_dir / "best.pt"
        try:
            best = load(path)
        except FileNotFoundError:
            best = {}
        if best.get("epoch") != epoch:
            held = f"holds epoch {best['epoch']}" if best else "is missing"
            raise UserError(f"{path} {held}, not epoch {epoch}, the one of the best validation accuracy: those "
                            "weights are lost. evaluate.weights: last takes the last epoch's; deleting "
                            f"{job_dir} trains the job again")
        source = best["model_state_dict"]
    return {k: v.detach().to("cpu").contiguous() for k, v in source.items()}, epoch


def weights_file(state_dict: dict[str, torch.Tensor], params: Params, mean: list[float], std: list[float],
                 classes: list[str], epoch: int) -> dict[str, Any]:
    """The final-weights output: enough to rebuild and run the model without the checkpoint, and
    which weights they are (evaluate.weights, the epoch)."""
    return {"model": params.model.model_dump(), "state_dict": state_dict, "mean": mean, "std": std,
            "classes": classes, "weights": params.evaluate.weights, "epoch": epoch}
