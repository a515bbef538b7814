"""The journal of pending deliveries: what a stage could not deliver to the store yet.

Metric values, tags, artifact files, the model to log from the weights file, a terminal status, a
run to mark KILLED, an evaluation: each is an item of one atomic JSON file, `mlflow_pending.json`
beside the run-id file (outputs/). This module is the file alone and never imports MLflow (the
evaluate stage reads it before MLflow has loaded); tracking.delivery delivers its items.
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cifarpipe import atomic
from cifarpipe.config import UserError
from cifarpipe.workspace import beside_repository, experiment_name, in_temporary_copy, safe_name

JOURNAL_NAME = "mlflow_pending.json"


def journal_path(run_id_file: Path) -> Path:
    """The journal both stages share: beside the run-id file (outputs/mlflow_pending.json). Not a
    DVC output: it outlives reruns of either stage until everything in it is delivered.

    A DVC experiment run in a temporary copy (`--queue`, `--temp`) keeps it beside the original
    repository's, one file per experiment name (outputs/mlflow_pending-<name>.json): the copy is
    deleted when the experiment is killed, and rerunning that name delivers what was left."""
    name = experiment_name()
    if name and in_temporary_copy():
        folder = beside_repository(Path(run_id_file).parent)
        return folder / f"{Path(JOURNAL_NAME).stem}-{safe_name(name)}.json"
    return Path(run_id_file).parent / JOURNAL_NAME


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Journal:
    """The journal of deliveries the store has not taken yet: {"items": [...]}, rewritten atomically
    after every change, removed once empty. Each item names its run ("run_id") and its "kind":
    metrics, checkpoints, tags, artifact, model, status, abandon or evaluation (see
    tracking.delivery.deliver)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.errors: dict[str, str] = {}  # run id -> the error that stopped its last delivery
        # What the last delivery dropped for good: (item, why). A caller must not report those as logged.
        self.dropped: list[tuple[dict[str, Any], str]] = []
        try:
            self.items: list[dict[str, Any]] = json.loads(self.path.read_text())["items"]
        except FileNotFoundError:
            self.items = []
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(f"{self.path}: unreadable MLflow pending-deliveries journal ({type(e).__name__}: {e}); "
                            "move it away to continue (what it listed will then not reach MLflow)") from None

    def save(self) -> None:
        if self.items:
            atomic.write_text(self.path, json.dumps({"items": self.items}, indent=1) + "\n")
        else:
            self.path.unlink(missing_ok=True)

    def add(self, item: dict[str, Any]) -> None:
        if item["kind"] == "status":  # a run's status is set once, after everything else of the run
            self.items = [it for it in self.items if not (it["run_id"] == item["run_id"] and it["kind"] == "status")]
        self.items.append(item)
        self.save()

    def add_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.add({"run_id": run_id, "kind": "metrics", "metrics": [
            {"key": k, "value": float(v), "timestamp": now, "step": step} for k, v in metrics.items()]})

    def add_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        # The hash pins the file's content: a later job may overwrite the file before the store is back.
        self.add({"run_id": run_id, "kind": "artifact", "path": str(path), "artifact_path": artifact_path,
                  "sha256": file_sha256(path)})

    def add_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.add({"run_id": run_id, "kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def add_model(self, run_id: str, weights: Path, input_example: np.ndarray, step: int = 0) -> None:
        """The MLflow model to log from `weights`, with `input_example`: uint8 images (N, 32, 32, 3);
        `step`: the epoch whose weights these are."""
        example = np.ascontiguousarray(input_example, dtype=np.uint8)
        self.add({"run_id": run_id, "kind": "model", "weights": str(weights), "sha256": file_sha256(weights),
                  "example": base64.b64encode(example.tobytes()).decode(), "shape": list(example.shape),
                  "dtype": "uint8", "step": step})

    def add_checkpoint_files(self, run_id: str, files: dict[int, Path], keep: set[int]) -> None:
        """The checkpoint files of epochs `files` for their checkpoint models (tracking.checkpoints),
        each pinned by its hash; every other model of the run loses its file (`keep`: best and last)."""
        self.add({"run_id": run_id, "kind": "checkpoints", "metrics": [], "epochs": [], "keep": sorted(keep),
                  "files": [{"epoch": e, "path": str(p), "sha256": file_sha256(p)} for e, p in sorted(files.items())]})

    def add_evaluation(self, run_id: str, params: dict[str, Any], metrics: dict[str, float], artifacts: list[Path],
                       artifact_path: str = "evaluation", n_test: int = 0, per_class: list[dict] | None = None) -> None:
        """An evaluation of run `run_id`'s model; deliver() decides where it goes (see _deliver_evaluation).
        `per_class`: rows of the per-class table (class, support, correct, accuracy, precision), for
        the model card. It supersedes an undelivered older evaluation of the same run, whose files
        it has overwritten."""
        old = [it for it in self.items if it["run_id"] == run_id and it["kind"] == "evaluation"]
        if old:
            print(f"note: an undelivered earlier evaluation of run {run_id} is replaced by this one", file=sys.stderr)
        self.items = [it for it in self.items if it not in old]
        self.add({"run_id": run_id, "kind": "evaluation", "params": {k: str(v) for k, v in params.items()},
                  "metrics": {k: float(v) for k, v in metrics.items()}, "artifact_path": artifact_path, "n_test": n_test,
                  "per_class": per_class or [],
                  "artifacts": [{"path": str(a), "sha256": file_sha256(a)} for a in artifacts]})

    def remove(self, predicate) -> None:
        self.items = [it for it in self.items if not predicate(it)]
        self.save()
