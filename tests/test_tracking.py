"""MLflow logging that never costs training: a store that fails mid-run loses nothing."""
from __future__ import annotations

import errno
import json
import threading

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cifarpipe import atomic
from cifarpipe.training import checkpoint
from cifarpipe.config import UserError
from cifarpipe.tracking import model
from cifarpipe.tracking.job import open_run
from cifarpipe.tracking.delivery import deliver
from cifarpipe.tracking.journal import Journal


class FlakyClient:
    """A real MLflow client whose metric logging fails while `down` is set, like a store that went away."""

    def __init__(self, real: MlflowClient) -> None:
        self.real, self.down, self.calls = real, False, 0

    def log_batch(self, run_id, metrics=(), **kw):
        self.calls += 1
        if self.down and metrics:
            raise ConnectionError("store unreachable")
        return self.real.log_batch(run_id, metrics=metrics, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def row(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.1 * epoch, "val_loss": 2.0 / epoch,
            "val_accuracy": 0.1 * epoch, "lr": 1e-3, "epoch_seconds": 1.0, "images_per_second": 100.0}


@pytest.fixture
def tracker(tmp_path):
    real = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    flaky = FlakyClient(real)
    t = open_run(flaky, "test", None)
    yield t, flaky, real
    t.finish()


def test_metrics_sent_while_the_store_is_down_land_once_it_is_back(tracker, capsys):
    t, flaky, real = tracker
    flaky.down = True
    t.queue_history([row(1)])
    t.queue_history([row(2)])
    t._pool.submit(lambda: None).result()
    assert real.get_metric_history(t.run_id, "val_accuracy") == []
    assert "training goes on" in capsys.readouterr().err
    flaky.down = False
    t.queue_history([row(3)])
    assert t.drain()
    steps = [m.step for m in real.get_metric_history(t.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2, 3]  # no gaps, no duplicates


def test_metrics_are_kept_locally_if_the_store_never_comes_back(tracker, tmp_path, capsys):
    t, flaky, real = tracker
    flaky.down = True
    t.queue_history([row(1), row(2)])
    t.journal = Journal(tmp_path / "mlflow_pending.json")
    assert not t.drain(attempts=2, pause_s=0.01)
    saved = json.loads(t.journal.path.read_text())["items"]
    assert [(it["run_id"], it["kind"], len(it["metrics"])) for it in saved] == [(t.run_id, "metrics", 2 * 7)]
    assert "could not be sent" in capsys.readouterr().err
    assert t.drain()  # nothing queued twice: the journal holds them now
    flaky.down = False
    assert deliver(real, Journal(t.journal.path)) == 0 and not t.journal.path.exists()
    assert sorted(m.step for m in real.get_metric_history(t.run_id, "val_accuracy")) == [1, 2]


def test_resume_resends_only_what_the_run_lacks(tracker):
    t, _, real = tracker
    t.queue_history([row(1)])
    assert t.drain()
    t.queue_history([row(1), row(2)], skip=t.logged_steps())
    assert t.drain()
    assert [m.step for m in real.get_metric_history(t.run_id, "train_loss")] == [1, 2]


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.write_text(path, "good")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(path, "w") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1, "step": 0, "w": torch.ones(3)})

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device.*previous file is intact"):
        checkpoint.save(path, {"epoch": 2, "step": 0, "w": torch.zeros(3)})
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_chunk_that_landed_is_never_sent_again(tracker):
    t, flaky, real = tracker
    calls = {"n": 0}
    original = flaky.log_batch

    def second_chunk_fails(run_id, metrics=(), **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("store went away mid-batch")
        return original(run_id, metrics=metrics, **kw)

    flaky.log_batch = second_chunk_fails
    t.queue_history([row(e) for e in range(1, 131)])  # 910 values: two chunks of at most 900
    t._pool.submit(lambda: None).result()
    assert t.drain(pause_s=0.01)
    steps = [m.step for m in real.get_metric_history(t.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 131))  # each epoch once: the first chunk was not resent


def test_while_the_store_is_down_flushes_do_not_pile_up(tracker):
    t, flaky, _ = tracker
    flaky.down = True
    busy = threading.Event()  # the logging thread waits on it: no sleep, whatever the machine's speed
    t._pool.submit(busy.wait)
    for e in range(1, 6):
        t.queue_history([row(e)])
    busy.set()
    t._pool.submit(lambda: None).result()
    assert flaky.calls == 1  # one flush carried all five epochs
    flaky.down = False
    assert t.drain()


def test_a_checkpoint_queued_again_before_its_upload_ran_is_uploaded_once_in_its_newest_version(tracker, tmp_path):
    t, flaky, real = tracker
    uploads = []
    flaky.log_artifact = lambda run_id, path, artifact_path=None: (
        uploads.append(path), real.log_artifact(run_id, path, artifact_path))
    ckpt = tmp_path / "last.pt"
    busy = threading.Event()  # keeps the logging thread busy for 5 epochs: no sleep, no race
    t._pool.submit(busy.wait)
    for e in range(1, 6):
        ckpt.write_text(f"epoch {e}")
        t.log_artifact(ckpt, "checkpoints", background=True)
    busy.set()
    t._pool.submit(lambda: None).result()
    assert uploads == [str(ckpt)]
    logged = real.download_artifacts(t.run_id, "checkpoints/last.pt", str(tmp_path / "down"))
    assert open(logged).read() == "epoch 5"
    t.log_artifact(ckpt, "checkpoints", background=True)  # queued again once the first upload ran
    t._pool.submit(lambda: None).result()
    assert len(uploads) == 2


def test_the_model_is_logged_once_however_often_it_is_delivered(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # log_model uses MLflow's fluent API
    client = MlflowClient(uri)
    journal = Journal(tmp_path / "mlflow_pending.json")
    t = open_run(client, "test", None, journal=journal)
    weights = _weights_file(tmp_path / "model.pt")
    example = np.zeros((2, 32, 32, 3), np.uint8)
    exp_id = client.get_run(t.run_id).info.experiment_id
    # What an upload cut off by an outage leaves: a LoggedModel of the run that never became READY.
    client.create_logged_model(exp_id, name="model", source_run_id=t.run_id)
    for _ in range(2):  # e.g. the end of training, then a redelivery whose first answer was lost
        journal.add_model(t.run_id, weights, example)
        assert deliver(client, journal) == 0
    assert [(m.name, m.status.name) for m in client.search_logged_models([exp_id])] == [("model", "READY")]
    t.finish()



def _weights_file(path, seed: int = 0):
    """A weights file as the train stage writes it (checkpoint.weights_file), of an untrained course_cnn."""
    from cifarpipe.config import ModelParams
    from cifarpipe.training.models import build_model

    torch.manual_seed(seed)
    net = build_model(ModelParams(name="course_cnn", width=64))
    checkpoint.save_weights(path, {"model": {"name": "course_cnn", "width": 64}, "state_dict": net.state_dict(),
                                   "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26],
                                   "classes": [f"class{i}" for i in range(10)]})
    return path


def test_a_model_logged_on_a_gpu_machine_validates_and_loads_there(tmp_path, monkeypatch):
    """On the H200 every model logged with MLflow's pytorch flavour got "Failed to validate serving
    input example ... it can't be loaded on 'cuda' device": that pyfunc loads on CUDA whenever a GPU
    is present. Our model loads on the CPU unless its loader asks otherwise. A CPU can play that
    machine: what would pick CUDA asks torch.cuda.is_available(), and moving anything to CUDA here fails."""
    import logging

    import mlflow

    from cifarpipe.serving.inference import Classifier

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    handler = Collect()
    logging.getLogger("mlflow").addHandler(handler)
    try:
        t = open_run(MlflowClient(uri), "test", None, journal=Journal(tmp_path / "pending.json"))
        weights = _weights_file(tmp_path / "model.pt")
        example = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        model_uri = model.log_model(t.run_id, weights, example)
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert not [w for w in warnings if "validate serving input example" in w], warnings
    # What a user on a GPU machine types: no device named, the model loads and predicts on the CPU.
    loaded = mlflow.pyfunc.load_model(model_uri)
    assert loaded.unwrap_python_model().classifier.device.type == "cpu"
    expected = Classifier.from_weights(torch.load(weights, weights_only=True)).probabilities(example)
    got = loaded.predict(example)
    assert np.abs(got[[f"prob_class{i}" for i in range(10)]].to_numpy() - expected).max() < 1e-6
    t.finish()
