"""The evaluate stage against an independent computation, and where its record goes in MLflow."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from conftest import run, set_params
from cifarpipe import report
from cifarpipe.config import ModelParams
from cifarpipe.training.models import build_model


def store(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def all_runs(project):
    client = store(project)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])


def rebuilt_model(project) -> tuple[torch.nn.Module, dict]:
    """The model from outputs/model.pt, rebuilt in plain torch."""
    weights = torch.load(project / "outputs/model.pt", weights_only=True)
    model = build_model(ModelParams(**weights["model"]))
    model.load_state_dict(weights["state_dict"])
    return model.eval(), weights


def normalized(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, (x/255 - mean) / std: the textbook normalisation, not the loader's."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_the_confusion_matrix_is_counts_of_actual_rows_and_predicted_columns():
    labels, preds = np.array([0, 0, 0, 1, 2]), np.array([1, 1, 2, 1, 2])
    cm = report.confusion_matrix(labels, preds, 3)
    assert cm.tolist() == [[0, 2, 1], [0, 1, 0], [0, 0, 1]]  # row 0: three images of class 0, none right
    table = report.per_class_table(cm, ["a", "b", "c"])
    assert table["support"].tolist() == [3, 1, 1] and table["accuracy"].tolist() == [0, 1, 1]
    long = report.confusion_long(labels, preds, ["a", "b", "c"])
    assert list(zip(long["actual"], long["predicted"]))[:3] == [("a", "b"), ("a", "b"), ("a", "c")]


def test_evaluate_agrees_with_an_independent_computation_and_the_logged_model_with_the_weights(project, monkeypatch):
    run(["dvc", "repro"], project)
    model, weights = rebuilt_model(project)
    with np.load(project / "data/cifar10.npz") as z:
        images, labels = z["test_images"], z["test_labels"].astype(np.int64)
    x = normalized(images, weights["mean"], weights["std"])
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 7]) for i in range(0, len(x), 7)])  # own batches: 7, not 50
    y = torch.from_numpy(labels)
    preds = logits.argmax(1).numpy()

    metrics = json.loads((project / "outputs/metrics.json").read_text())
    assert metrics["n_test"] == len(labels) == 100
    assert metrics["accuracy"] == (preds == labels).mean()
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)

    # The confusion table, counted here as (actual, predicted) pairs. The matrix is not symmetric,
    # so an evaluate that swapped rows and columns (or the CSV's columns) fails this comparison.
    names = np.array(weights["classes"])
    counts = np.zeros((10, 10), dtype=int)
    np.add.at(counts, (labels, preds), 1)
    assert (counts != counts.T).any()
    csv = pd.read_csv(project / "outputs/confusion.csv")
    assert list(csv.columns) == ["actual", "predicted"]
    got = np.zeros((10, 10), dtype=int)
    index = {n: i for i, n in enumerate(names)}
    np.add.at(got, ([index[a] for a in csv["actual"]], [index[p] for p in csv["predicted"]]), 1)
    assert (got == counts).all()
    per_class = pd.read_csv(project / "outputs/per_class.csv")
    assert per_class["support"].tolist() == counts.sum(1).tolist()  # rows: actual classes
    assert per_class["correct"].tolist() == np.diag(counts).tolist()

    # The MLflow model is the weights file's model: on the raw uint8 images, the same logits as the
    # network on the normalised ones, and evaluate's classes.
    [r] = all_runs(project)
    assert r.data.metrics["test_accuracy"] == metrics["accuracy"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    logged = mlflow.pyfunc.load_model(f"runs:/{r.info.run_id}/model", dst_path=str(project / "m"))
    assert torch.allclose(logged.unwrap_python_model().classifier.logits(images), logits, rtol=0, atol=1e-5)
    assert logged.predict(images)["class"].tolist() == names[preds].tolist()


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_other_evaluate_params_never_write_into_the_training_run(project):
    run(["dvc", "repro"], project)
    [train] = all_runs(project)
    client = store(project)
    before = client.get_metric_history(train.info.run_id, "test_accuracy")
    assert train.data.params["evaluate.tta_flip"] == "False"

    set_params(project, **{"evaluate.tta_flip": True})
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    runs = all_runs(project)
    assert len(runs) == 2
    train_now, evaluation = runs
    assert train_now.info.run_id == train.info.run_id
    assert client.get_metric_history(train.info.run_id, "test_accuracy") == before  # untouched
    assert train_now.data.params == train.data.params and train_now.data.tags == train.data.tags
    # The evaluation's own run: nested under the training run, params as evaluated, its metrics.
    tta = json.loads((project / "outputs/metrics.json").read_text())
    assert evaluation.data.tags["mlflow.parentRunId"] == train.info.run_id
    assert train.info.run_id in evaluation.data.tags["mlflow.note.content"]
    assert evaluation.data.params["evaluate.tta_flip"] == "True"
    assert evaluation.data.params["train.optimizer.lr"] == train.data.params["train.optimizer.lr"]
    assert evaluation.data.metrics["test_accuracy"] == tta["accuracy"]
    assert evaluation.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")} >= {
        "evaluation/metrics.json", "evaluation/per_class.csv", "evaluation/confusion.png"}

    # Back to the training's params: evaluate reruns into the training run; the same values are not
    # logged twice and no third run appears.
    set_params(project, **{"evaluate.tta_flip": False})
    assert "Running stage 'evaluate'" in run(["dvc", "repro"], project).stdout  # else the checks below prove nothing
    assert len(all_runs(project)) == 2
    assert client.get_metric_history(train.info.run_id, "test_accuracy") == before

    # The flipped evaluation again: it goes into its existing nested run, not a third one, once.
    set_params(project, **{"evaluate.tta_flip": True})
    assert "Running stage 'evaluate'" in run(["dvc", "repro"], project).stdout
    assert [r.info.run_id for r in all_runs(project)] == [train.info.run_id, evaluation.info.run_id]
    assert [m.value for m in client.get_metric_history(evaluation.info.run_id, "test_accuracy")] == [tta["accuracy"]]


def test_evaluate_never_reports_as_logged_what_reached_no_run(project):
    """(a) The store moved away after training: evaluate once created an empty store, dropped its
    results for want of the run and said "logged to MLflow", exit 0, and DVC recorded it. (b) The
    run deleted in the UI: "dropped: evaluation", then "logged to MLflow", exit 0."""
    run(["dvc", "repro", "train"], project)
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    (project / "mlflow.db").rename(project / "moved.db")
    proc = run(["dvc", "repro"], project, check=False)
    assert proc.returncode != 0 and "logged to MLflow" not in proc.stdout
    assert f"error: no MLflow store at {project / 'mlflow.db'}" in proc.stderr
    assert f"training run {run_id} (outputs/run_id.txt) was logged to a store there" in proc.stderr
    assert "outputs/metrics.json" in proc.stderr  # where the results are
    assert not (project / "mlflow.db").exists()  # no empty store made up
    assert "evaluate" in run(["dvc", "status"], project).stdout  # DVC recorded nothing: `dvc repro` reruns it

    (project / "moved.db").rename(project / "mlflow.db")
    client = store(project)
    client.delete_run(run_id)
    proc = run(["dvc", "repro"], project, check=False)
    assert proc.returncode != 0 and "logged to MLflow" not in proc.stdout
    assert f"MLflow run {run_id} (outputs/run_id.txt) is deleted" in proc.stderr
    assert f"mlflow runs restore --run-id {run_id}" in proc.stderr

    client.restore_run(run_id)
    proc = run(["dvc", "repro"], project)
    assert f"logged to MLflow (sqlite:///{project / 'mlflow.db'}): training run {run_id}" in proc.stdout
    assert client.get_run(run_id).data.metrics["test_accuracy"] == json.loads(
        (project / "outputs/metrics.json").read_text())["accuracy"]
