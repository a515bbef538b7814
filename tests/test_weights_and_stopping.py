"""Which weights are the model (evaluate.weights) and early stopping (train.early_stopping), through
the real stages: the weights file, evaluate, the MLflow model and tags; a kill + resume stops at the
epoch an uninterrupted training stops at."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import git_commit, make_project, run, serve_folder, set_params
from cifarpipe.serving.inference import Classifier

# On the tiny archive with lr 0.003 (a CPU trains bitwise the same every time) validation accuracy
# reaches its best, 74 of 75 images, at epoch 4 and stays there in epochs 5 and 6: patience 2 stops
# training after epoch 6 of 7, with the best weights two epochs before the last ones.
SETTINGS = {"train.epochs": 7, "train.optimizer.lr": 0.003, "train.early_stopping.patience": 2}
BEST, STOP = 4, 6


def client_of(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def all_runs(project: Path) -> list:
    client = client_of(project)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])


def job_file(project: Path, name: str) -> dict:
    [path] = (project / "outputs/checkpoints").glob(f"*/{name}")
    return torch.load(path, weights_only=True)


def weights_file(project: Path) -> dict:
    return torch.load(project / "outputs/model.pt", weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].contiguous()) for k in a)


def without_timing(project: Path) -> tuple[list, dict]:
    history = pd.read_csv(project / "outputs/history.csv").drop(columns=["epoch_seconds", "images_per_second"])
    summary = json.loads((project / "outputs/train_metrics.json").read_text())
    summary.pop("train_seconds")
    return history.to_dict("records"), summary


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_archive):
    """A project with SETTINGS and its data stages done (the seed of each test's copy), and a copy
    trained and evaluated by one uninterrupted `dvc repro`."""
    base = tmp_path_factory.mktemp("stopping")
    with serve_folder(base / "www") as server:
        seed = make_project(base / "seed", *tiny_archive, server)
        set_params(seed, **SETTINGS)
        run(["dvc", "repro", "split"], seed)
        git_commit(seed, "early stopping on, data stages done")
        done = base / "uninterrupted"
        shutil.copytree(seed, done, symlinks=True)
        out = run(["dvc", "repro"], done).stdout
        yield seed, done, out


def test_early_stopping_ends_training_and_the_best_epoch_is_the_model_everywhere(stopped, monkeypatch):
    _, done, out = stopped
    history = pd.read_csv(done / "outputs/history.csv")
    accuracy = history["val_accuracy"].tolist()
    assert len(accuracy) == STOP and accuracy.index(max(accuracy)) + 1 == BEST, accuracy  # the data's premise
    assert f"training stops after epoch {STOP} of 7" in out
    summary = json.loads((done / "outputs/train_metrics.json").read_text())
    assert (summary["epochs_trained"], summary["epochs_requested"], summary["stopped_early"]) == (STOP, 7, True)
    assert (summary["weights_epoch"], summary["best_epoch"]) == (BEST, BEST)
    assert summary["model_val_accuracy"] == accuracy[BEST - 1]

    # The weights file holds best.pt's weights (epoch 4), not the last ones (epoch 6).
    best, last, weights = job_file(done, "best.pt"), job_file(done, "last.pt"), weights_file(done)
    assert (best["epoch"], last["epoch"], last["stopped_early"], last["complete"]) == (BEST, STOP, True, True)
    assert (weights["weights"], weights["epoch"]) == ("best", BEST)
    assert same_tensors(weights["state_dict"], best["model_state_dict"])
    assert not same_tensors(weights["state_dict"], last["model_state_dict"])
    assert all(t.is_contiguous() for t in weights["state_dict"].values())
    metrics = json.loads((done / "outputs/metrics.json").read_text())
    assert metrics["weights_epoch"] == BEST and f"of the best weights (epoch {BEST})" in out

    # The run says so, and its MLflow model is best.pt's network.
    [r] = all_runs(done)
    assert r.data.params["train.epochs"] == "7" and r.data.params["evaluate.weights"] == "best"
    tags = r.data.tags
    assert (tags["weights"], tags["weights_epoch"], tags["stopped_early_at"], tags["epochs_trained"]) == \
        ("best", str(BEST), str(STOP), str(STOP))
    assert r.data.metrics["model_val_accuracy"] == accuracy[BEST - 1]
    assert r.data.metrics["test_accuracy"] == metrics["accuracy"]
    steps = [m.step for m in client_of(done).get_metric_history(r.info.run_id, "val_accuracy")]
    assert steps == list(range(1, STOP + 1))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{done / 'mlflow.db'}")
    logged = mlflow.pyfunc.load_model(f"runs:/{r.info.run_id}/model", dst_path=str(done / "m"))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    reference = Classifier.from_weights({**weights, "state_dict": best["model_state_dict"]})
    assert torch.equal(logged.unwrap_python_model().classifier.logits(images), reference.logits(images))


def switch_weights(project: Path, weights: str, says: str = "nothing is trained now") -> str:
    set_params(project, **{"evaluate.weights": weights})
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage 'train'" in out and says in out, out
    assert not re.search(r"^epoch +\d+/", out, re.M), out  # no epoch trained
    return out


def test_switching_to_the_last_weights_rewrites_the_outputs_in_a_run_of_their_own_without_training(stopped,
                                                                                                    tmp_path):
    _, done, _ = stopped
    project = shutil.copytree(done, tmp_path / "p", symlinks=True)
    switch_weights(project, "last")
    weights = weights_file(project)
    assert (weights["weights"], weights["epoch"]) == ("last", STOP)
    assert same_tensors(weights["state_dict"], job_file(project, "last.pt")["model_state_dict"])
    assert json.loads((project / "outputs/metrics.json").read_text())["weights_epoch"] == STOP

    # The run that trained keeps what it logged; a run of their own records the last weights, with
    # the job's history, its own model and evaluation.
    first, second = all_runs(project)
    assert (first.data.params["evaluate.weights"], first.data.tags["weights_epoch"]) == ("best", str(BEST))
    assert (second.data.params["evaluate.weights"], second.data.tags["weights_epoch"]) == ("last", str(STOP))
    assert second.data.tags["reuses_run"] == first.info.run_id and second.info.status == "FINISHED"
    assert second.data.tags["stopped_early_at"] == str(STOP)
    metrics = json.loads((project / "outputs/metrics.json").read_text())
    assert second.data.metrics["test_accuracy"] == metrics["accuracy"]
    assert second.data.metrics["model_val_accuracy"] == pd.read_csv(project / "outputs/history.csv")["val_accuracy"].iloc[-1]
    history = client_of(project).get_metric_history(second.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, STOP + 1))


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_switching_back_to_the_best_weights_makes_the_first_run_the_record_again(stopped, tmp_path):
    _, done, _ = stopped
    project = shutil.copytree(done, tmp_path / "p", symlinks=True)
    switch_weights(project, "last")
    switch_weights(project, "best", says="(no retraining)")  # the first run's own context: it is completed again
    first, second = all_runs(project)
    assert (project / "outputs/run_id.txt").read_text().strip() == first.info.run_id
    assert same_tensors(weights_file(project)["state_dict"], job_file(project, "best.pt")["model_state_dict"])
    assert (first.data.tags["weights_epoch"], second.data.tags["weights_epoch"]) == (str(BEST), str(STOP))
    assert first.data.metrics["test_accuracy"] == json.loads((project / "outputs/metrics.json").read_text())["accuracy"]


@pytest.mark.parametrize("fault", [
    "after_checkpoint:5",  # epoch 5 without improvement: the counter (1) is in the checkpoint, not yet at patience
    pytest.param(f"after_checkpoint:{STOP}", marks=pytest.mark.slow),  # stopped, outputs not yet written
])
def test_a_kill_and_resume_stops_at_the_same_epoch_as_an_uninterrupted_training(stopped, tmp_path, fault):
    seed, done, _ = stopped
    project = shutil.copytree(seed, tmp_path / "p", symlinks=True)
    killed = run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": fault}, check=False)
    assert killed.returncode != 0
    ckpt = job_file(project, "last.pt")
    epoch = int(fault.split(":")[1])
    assert (ckpt["epoch"], ckpt["epochs_without_improvement"], ckpt["stopped_early"]) == \
        (epoch, epoch - BEST, epoch == STOP)
    resumed = run(["dvc", "repro"], project).stdout
    expected = (f"early stopping ended training after epoch {STOP} of 7" if epoch == STOP
                else f"training stops after epoch {STOP} of 7")
    assert expected in resumed, resumed
    assert without_timing(project) == without_timing(done)
    assert same_tensors(weights_file(project)["state_dict"], weights_file(done)["state_dict"])
    assert json.loads((project / "outputs/metrics.json").read_text()) == \
        json.loads((done / "outputs/metrics.json").read_text())
    [r] = all_runs(project)
    assert r.info.status == "FINISHED" and r.data.tags["stopped_early_at"] == str(STOP)
