"""TensorBoard event files of a run's per-epoch metrics (tracking.tensorboard: true)."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from cifarpipe import atomic
from cifarpipe.tracking.run import EPOCH_METRICS

TENSORBOARD_FILE = "events.out.tfevents.cifarpipe"  # fixed: each rewrite replaces the file (and its MLflow artifact)


def tensorboard_dir(root: Path, client: MlflowClient, run_id: str) -> Path:
    """`root/<run name>_<8 chars of the run id>`: one folder per run, named as the MLflow UI shows it
    (the id part keeps two runs with the same name apart); the id alone if the store does not answer."""
    try:
        name = client.get_run(run_id).info.run_name or ""
    except Exception:
        name = ""
    name = "".join(c if c.isalnum() or c in "-_.=" else "-" for c in name).strip(".")
    return root / (f"{name}_{run_id[:8]}" if name else run_id)


def write_tensorboard(folder: Path, history: list[dict[str, float]]) -> Path:
    """Rewrite the run's TensorBoard event file from the whole per-epoch history (the checkpoint's).

    One scalar per (metric, epoch), named as in MLflow. Rewriting, never appending, means a job
    resumed after a kill cannot write an epoch twice. The new file is completed under a name
    TensorBoard ignores (no 'tfevents' in it) and then renamed over the old one, so a kill at any
    moment leaves the previous complete file or the new one. Wall times are the training seconds
    (cumulative epoch_seconds), so TensorBoard's 'relative' axis shows training time.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    records = RecordWriter(buf)
    wall = time.time() - sum(float(r.get("epoch_seconds", 0.0)) for r in history)
    records.write(Event(wall_time=wall, file_version="brain.Event:2").SerializeToString())
    for row in history:
        wall += float(row.get("epoch_seconds", 0.0))
        values = [Summary.Value(tag=k, simple_value=float(row[k])) for k in EPOCH_METRICS if k in row]
        records.write(Event(wall_time=wall, step=int(row["epoch"]), summary=Summary(value=values)).SerializeToString())
    partial = folder / "events.partial"
    atomic.write_bytes(partial, buf.getvalue())
    os.replace(partial, folder / TENSORBOARD_FILE)
    return folder / TENSORBOARD_FILE

