"""Checkpoints: the course's dict plus everything an exact resume needs.

Keys (the course's first): epoch, model_state_dict, optimizer_state_dict, scheduler_state_dict,
loss; then step (optimizer steps into the unfinished epoch, 0 at an epoch boundary),
epoch_progress (that epoch's running sums), history (one dict of metrics per finished epoch),
best_val_accuracy, rng (torch CPU and CUDA generator states), mlflow_run_id, fingerprint and
complete. Only tensors, numbers, strings, lists and dicts: `torch.load(weights_only=True)` reads
it, so loading a checkpoint never runs code from the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from cifarpipe import atomic, faults
from cifarpipe.config import Params, UserError

# Keys that do not change what training computes; a resume with them changed is still exact.
_NOT_FINGERPRINTED = {"train.log_every", "train.device", "train.num_workers"}


def fingerprint(flat_params: dict[str, Any], data_md5: str, split_hash: str) -> str:
    """Hash of the training-relevant params and the data: a checkpoint resumes only into the same job."""
    relevant = {k: v for k, v in flat_params.items()
                if k.split(".")[0] in ("model", "train") and k not in _NOT_FINGERPRINTED}
    blob = json.dumps({"params": relevant, "data_md5": data_md5, "split_hash": split_hash}, sort_keys=True)
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


def load_for_resume(path: Path, expected_fingerprint: str, log=print) -> tuple[dict[str, Any] | None, str | None]:
    """(checkpoint to resume or None to start fresh, MLflow run id of an abandoned unfinished job).

    Policy: an unfinished checkpoint with the same fingerprint is resumed. One whose params or
    data differ is never resumed silently: it is kept, renamed to `<name>.stale-<fingerprint>.pt`,
    and training starts fresh with a message saying so; its MLflow run is returned so the caller
    can mark it KILLED rather than leave it RUNNING. A checkpoint of a finished training is the
    result of an earlier job, so a new run (DVC reran the stage) starts fresh.
    """
    path = Path(path)
    if not path.exists():
        return None, None
    ckpt = load(path)
    if ckpt.get("complete"):
        log(f"{path}: previous training finished; starting a new one")
        return None, None
    if ckpt.get("fingerprint") != expected_fingerprint:
        kept = path.with_name(f"{path.stem}.stale-{ckpt.get('fingerprint', 'unknown')}.pt")
        path.replace(kept)
        log(f"{path}: an unfinished training with other params or data (fingerprint {ckpt.get('fingerprint')}, "
            f"now {expected_fingerprint}); not resuming it. Kept as {kept}; starting fresh.")
        return None, ckpt.get("mlflow_run_id")
    return ckpt, None


def weights_file(model: torch.nn.Module, params: Params, mean: list[float], std: list[float],
                 classes: list[str]) -> dict[str, Any]:
    """The final-weights output: enough to rebuild and run the model without the checkpoint."""
    return {"model": params.model.model_dump(), "state_dict": model.state_dict(),
            "mean": mean, "std": std, "classes": classes}
