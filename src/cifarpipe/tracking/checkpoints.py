"""The training's checkpoints as MLflow LoggedModels: one per epoch, linked to the run at its epoch.

Each finished epoch gets a LoggedModel of type `checkpoint`, named `checkpoint-epoch-<N>`, with
param `epoch`, linked to the run as an output at step N (the run page's "Logged models" table,
column Step). The epoch's metrics are logged with that model's id, and the `train_*` / `val_*`
ones with their dataset (name and digest of the run's training / validation input), so the
model's page lists them and `search_logged_models` orders by them.

The checkpoint file (`checkpoint.pt`, training/checkpoint.py's full resumable dict) is uploaded
into the epoch's model when the epoch ends and stays only in the models of the best epoch (the
highest validation accuracy, first reached: the job's best.pt) and of the last one; the file of a
model that is neither any more is removed (tag `checkpoint_file` says `kept` or why not). The
store then holds two checkpoint files per run, not one per epoch: 94 MB each for cifar_resnet
width 128 with Adam, 2.8 GB for the gpu recipe's 30 epochs if every epoch kept its own.

Measured on a 2-core CPU, SQLite store, local artifacts (median of 8): search + create + output
link + 7 metrics + finalize 28 ms per epoch (a plain 7-metric log_batch: 6 ms), + 10 ms for a
0.75 MB course_cnn checkpoint, + 130 ms for a 94 MB one; all in the run's background thread. A
full pyfunc model per epoch (tracking.model.log_model) took 0.1-0.2 s and 1 MB of copied package
code per epoch, and is no resumable checkpoint (no optimizer state): the pyfunc model is logged
once, from the final weights.

Every step is idempotent, so a lost answer or a resumed job never duplicates anything: an epoch's
model is looked up by its epoch before one is created, a file is uploaded once (the tag), metrics
already in the run are skipped where asked.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient

from cifarpipe.tracking.store import MAX_METRICS_PER_CALL, short_error

CHECKPOINT_TYPE = "checkpoint"  # the LoggedModels' model_type: `model_type = 'checkpoint'` in a search
CHECKPOINT_FILE = "checkpoint.pt"  # the file's name in the model's artifacts
FILE_TAG = "checkpoint_file"
KEPT = "kept"
UPLOADING = "uploading"  # set before the upload: a process killed during it leaves a file that is known of
REMOVED = "removed: neither the best nor the last epoch"
SNAPSHOT_DIR = "mlflow-uploads"  # in the job's checkpoint folder: hard links of files waiting for upload
# Metrics computed on a dataset: the prefix of the key -> the dataset input's context.
_DATASET_OF = {"train_": "training", "val_": "validation"}


def model_name(epoch: int) -> str:
    return f"checkpoint-epoch-{epoch}"


def best_epoch(history: list[dict[str, float]]) -> int | None:
    """The epoch of the job's best.pt: the first with the highest validation accuracy (the loop
    saves best.pt only on a strict improvement)."""
    if not history:
        return None
    best = max(history, key=lambda row: row["val_accuracy"])  # max keeps the first of equal values
    return int(best["epoch"])


def kept_epochs(history: list[dict[str, float]]) -> set[int]:
    """The epochs whose models keep their checkpoint file: the best and the last."""
    return {int(history[-1]["epoch"]), best_epoch(history)} if history else set()


def final_files(history: list[dict[str, float]], best: Path, last: Path) -> dict[int, Path]:
    """A finished job's files for its kept models: epoch -> best.pt, last.pt (one file if the last
    epoch is the best)."""
    return {best_epoch(history): best, int(history[-1]["epoch"]): last}


def find(client: MlflowClient, experiment_id: str, run_id: str) -> dict[int, LoggedModel]:
    """The run's checkpoint models by epoch (any status). Should two exist for one epoch (a create
    whose answer was lost), the READY one, else the first created, is the epoch's."""
    found: dict[int, LoggedModel] = {}
    token = None
    while True:
        page = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND model_type = '{CHECKPOINT_TYPE}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": True}], page_token=token)
        for m in page:
            epoch = int(m.params.get("epoch", 0))
            if epoch and (epoch not in found or (m.status == LoggedModelStatus.READY
                                                 and found[epoch].status != LoggedModelStatus.READY)):
                found[epoch] = m
        token = page.token
        if not token:
            return found


def log_epochs(client: MlflowClient, run_id: str, experiment_id: str, *, metrics: Iterable[Metric] = (),
               epochs: Iterable[int] = (), datasets: dict[str, list[str]] | None = None,
               only_missing: bool = False) -> dict[int, LoggedModel]:
    """A checkpoint model for every epoch of `metrics` and `epochs` (created if missing, READY at
    the end), and `metrics` logged with their epoch's model id and dataset (`datasets`: context ->
    [name, digest]). `only_missing`: skip the metric values the run already has (a journal delivery
    whose answer may have been lost). Returns the run's checkpoint models by epoch; raises on any
    store error."""
    metrics = list(metrics)
    models = find(client, experiment_id, run_id)
    wanted = sorted({m.step for m in metrics} | set(epochs))
    # A model found unfinished (a kill or an outage between its steps) may lack its link to the run;
    # log_outputs adds a link however many there are, so the run's are read first.
    unfinished = [e for e in wanted if e in models and models[e].status != LoggedModelStatus.READY]
    links = {o.model_id for o in client.get_run(run_id).outputs.model_outputs} if unfinished else set()
    for epoch in wanted:
        if epoch in models and (epoch not in unfinished or models[epoch].model_id in links):
            continue  # there, and linked to the run
        if epoch not in models:
            models[epoch] = client.create_logged_model(
                experiment_id, name=model_name(epoch), source_run_id=run_id, params={"epoch": str(epoch)},
                model_type=CHECKPOINT_TYPE)
        client.log_outputs(run_id, [LoggedModelOutput(models[epoch].model_id, step=epoch)])
    linked = [_linked(m, models[m.step].model_id, datasets or {}) for m in metrics]
    if only_missing:
        have = {(m.key, m.step, m.value) for key in {m.key for m in linked}
                for m in client.get_metric_history(run_id, key)}
        linked = [m for m in linked if (m.key, m.step, m.value) not in have]
    for i in range(0, len(linked), MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=linked[i:i + MAX_METRICS_PER_CALL])
    for epoch in wanted:
        if models[epoch].status != LoggedModelStatus.READY:
            client.finalize_logged_model(models[epoch].model_id, LoggedModelStatus.READY)
    return models


def keep_files(client: MlflowClient, run_id: str, experiment_id: str, files: dict[int, Path],
               keep: set[int] | None, models: dict[int, LoggedModel] | None = None) -> None:
    """`files[epoch]` uploaded into its epoch's model as checkpoint.pt unless the model has it (or
    the epoch is not in `keep`); with `keep`, the file removed from every other model. An epoch
    without a model gets one. Raises on any store error; what was done stays done."""
    models = models if models is not None else find(client, experiment_id, run_id)
    missing = sorted(e for e in files if e not in models)
    if missing:
        models.update(log_epochs(client, run_id, experiment_id, epochs=missing))
    for epoch, path in sorted(files.items()):
        model = models[epoch]
        if model.tags.get(FILE_TAG) != KEPT and (keep is None or epoch in keep):
            if not Path(path).exists():  # a waiting snapshot the next epoch dropped meanwhile: no longer kept
                continue
            client.set_logged_model_tags(model.model_id, {FILE_TAG: UPLOADING})
            model.tags[FILE_TAG] = UPLOADING
            try:
                _upload(client, model.model_id, Path(path))
            except FileNotFoundError:  # dropped since the check above
                continue
            client.set_logged_model_tags(model.model_id, {FILE_TAG: KEPT})
            model.tags[FILE_TAG] = KEPT
    if keep is not None:
        for epoch, model in models.items():
            if epoch not in keep and model.tags.get(FILE_TAG) in (KEPT, UPLOADING):
                _remove_file(model)
                client.set_logged_model_tags(model.model_id, {FILE_TAG: REMOVED})


def _linked(m: Metric, model_id: str, datasets: dict[str, list[str]]) -> Metric:
    context = next((c for prefix, c in _DATASET_OF.items() if m.key.startswith(prefix)), None)
    name, digest = datasets.get(context, (None, None)) if context else (None, None)
    return Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=name, dataset_digest=digest)


def _upload(client: MlflowClient, model_id: str, path: Path) -> None:
    """`path` into the model as checkpoint.pt: a hard link of that name in a temporary folder
    beside it (no copy of the file), uploaded as the folder's content."""
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=path.parent) as tmp:
        named = Path(tmp) / CHECKPOINT_FILE
        try:
            os.link(path, named)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, named)
        client.log_model_artifacts(model_id, tmp)


def _remove_file(model: LoggedModel) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(model.artifact_location).delete_artifacts(CHECKPOINT_FILE)


class CheckpointLog:
    """A training job's checkpoint models while it runs: the epochs and files not in the store
    yet. The train stage's thread adds each epoch (add_epoch); the run's logging thread delivers
    them with the epoch's metrics (deliver) and keeps them on failure."""

    def __init__(self, client: MlflowClient, run_id: str, datasets: dict[str, list[str]],
                 snapshot_dir: Path | None, epochs: Iterable[int] = ()) -> None:
        self.client, self.run_id, self.datasets, self.snapshot_dir = client, run_id, datasets, snapshot_dir
        self.epochs: set[int] = set(epochs)  # models to make sure of (a resumed job: every epoch so far)
        self.files: dict[int, Path] = {}  # epoch -> its checkpoint's snapshot, not uploaded yet
        self.keep: set[int] = set()
        self._experiment_id: str | None = None
        self._warned = False
        self._lock = threading.Lock()
        self.discard()  # snapshots a killed process left: the job's end uploads best.pt and last.pt instead

    def add_epoch(self, history: list[dict[str, float]], checkpoint: Path) -> None:
        """Epoch history[-1] ended with `checkpoint` written: a hard link of it is the file to upload
        (the next epoch replaces `checkpoint`; the link keeps this epoch's bytes, no copy)."""
        epoch = int(history[-1]["epoch"])
        snapshot = None
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            snapshot = self.snapshot_dir / f"epoch-{epoch}.pt"
            snapshot.unlink(missing_ok=True)
            try:
                os.link(checkpoint, snapshot)
            except OSError:  # a file system without hard links: a copy
                shutil.copyfile(checkpoint, snapshot)
        with self._lock:
            self.epochs.add(epoch)
            self.keep = kept_epochs(history)
            if snapshot is not None:
                self.files[epoch] = snapshot
            dropped = [e for e in self.files if e not in self.keep]  # never kept: no upload needed
            for e in dropped:
                self.files.pop(e).unlink(missing_ok=True)

    def pending(self) -> bool:
        """Epochs whose models are not known to be in the store (files are tried along, see deliver)."""
        with self._lock:
            return bool(self.epochs)

    def take_epochs(self) -> list[int]:
        """The epochs whose models are not known to be in the store, handed over (to the journal)."""
        with self._lock:
            epochs, self.epochs = sorted(self.epochs), set()
        return epochs

    def deliver(self, metrics: list[Metric]) -> None:
        """Send `metrics` (epoch rows) with the pending epochs' models; raises on a store error,
        keeping them for the next call. Then the waiting files: a file the store does not take
        waits for the next call (said once on stderr), and at the job's end best.pt and last.pt
        stand in for whatever still waits."""
        with self._lock:
            epochs, files, keep = set(self.epochs), dict(self.files), set(self.keep)
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.run_id).info.experiment_id
        models = log_epochs(self.client, self.run_id, self._experiment_id, metrics=metrics, epochs=epochs,
                            datasets=self.datasets)
        with self._lock:
            self.epochs -= epochs
        try:
            keep_files(self.client, self.run_id, self._experiment_id, files, keep or None, models)
        except Exception as e:
            if not self._warned:
                print(f"warning: MLflow did not take a checkpoint file ({short_error(e)}); training goes on, the "
                      "file is tried again with the next epoch, and the job's end uploads the best and last "
                      "epochs' files", file=sys.stderr)
                self._warned = True
            return
        with self._lock:
            for epoch, path in files.items():
                if self.files.get(epoch) == path:
                    del self.files[epoch]
                    path.unlink(missing_ok=True)

    def discard(self) -> list[int]:
        """Drop the snapshots not uploaded (the end of the job uploads best.pt and last.pt); the
        epochs whose file was still waiting."""
        with self._lock:
            waiting = sorted(self.files)
            self.files.clear()
        if self.snapshot_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.snapshot_dir)
        return waiting
