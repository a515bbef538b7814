"""The real pipeline end to end: `dvc repro`, `dvc exp run`, `mlflow run .` on a tiny archive over loopback HTTP."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import checkpoint_models, git_commit, kept_checkpoints, run, set_params
from cifarpipe.tracking.run import EPOCH_METRICS


def store(project) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def all_runs(project):
    """Runs in every experiment of the store: a stray run anywhere counts."""
    client = store(project)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def ran(stdout: str) -> set[str]:
    return {s for s in ("download", "split", "train", "evaluate") if f"Running stage '{s}'" in stdout}


def assert_complete_run(project, run, epochs: int):
    client = store(project)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.optimizer.lr"] and params["split.seed"] == "2025" and params["data.md5"]
    assert params["train.epochs"] == str(epochs)
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, epochs + 1)), key  # one value per epoch, no gaps, no duplicates
    assert {"test_accuracy", "test_loss"} <= run.data.metrics.keys()
    tags = run.data.tags
    assert tags["data_md5"] == params["data.md5"] and len(tags["split_hash"]) == 16
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    models = checkpoint_models(client, run.info.run_id)  # one per epoch, READY; best and last keep the file
    assert sorted(models) == list(range(1, epochs + 1)) and {s for s, _ in models.values()} == {"READY"}
    best = json.loads((project / "outputs/train_metrics.json").read_text())["best_epoch"]
    assert kept_checkpoints(client, run.info.run_id) == sorted({epochs, best})
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/per_class.csv", "evaluation/confusion.png", "evaluation/metrics.json"} <= evaluation
    reqs = client.download_artifacts(run.info.run_id, "environment/requirements.txt", str(project / "dl"))
    assert "torch==2.14.1" in open(reqs).read()


def test_data_stages_download_once_and_write_the_split(project, http_server):
    out = run(["dvc", "repro", "split"], project).stdout
    assert ran(out) == {"download", "split"}
    assert "verified" in out and "airplane" in out
    with np.load(project / "data/cifar10.npz") as z:
        assert z["train_images"].shape == (500, 32, 32, 3) and z["test_images"].dtype == np.uint8
    split = json.loads((project / "data/split.json").read_text())
    assert len(split["val"]) == 75 and sorted(split["train"] + split["val"]) == list(range(500))
    assert len((project / "data/split_hash.txt").read_text().strip()) == 16

    again = run(["dvc", "repro", "split"], project).stdout
    assert ran(again) == set()
    assert len(http_server.requests) == 1


def test_dvc_repro_trains_evaluates_and_tracks_one_complete_run(project, monkeypatch):
    proc = run(["dvc", "repro"], project)
    out = proc.stdout
    assert ran(out) == {"download", "split", "train", "evaluate"}
    # Trained in channels_last (params.yaml); the outputs are in the standard layout, so MLflow's
    # torch.export-based model logging has nothing to warn about.
    assert "No complete tensor found" not in proc.stderr + out
    state = torch.load(project / "outputs/model.pt", weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in state.values())
    runs = all_runs(project)
    assert len(runs) == 1
    assert_complete_run(project, runs[0], epochs=2)
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert '"accuracy"' in json.dumps(metrics) and "outputs/metrics.json" in json.dumps(metrics)
    test_acc = json.loads((project / "outputs/metrics.json").read_text())["accuracy"]
    assert runs[0].data.metrics["test_accuracy"] == pytest.approx(test_acc)
    assert test_acc > 0.3  # ten mean colours are easy: far above chance (0.1) even in 2 epochs
    # Each stage says where its seconds went, and the run keeps it (step 0).
    for stage, phases in (("train", ("start", "load_data", "epochs", "outputs")), ("evaluate", ("start", "deliver"))):
        line = next(l for l in out.splitlines() if l.startswith(f"{stage} stage: "))
        assert " s = start " in line, line
        logged = {k for k in runs[0].data.metrics if k.startswith(f"seconds/{stage}/")}
        assert {f"seconds/{stage}/{p}" for p in phases if p != "deliver"} <= logged, logged

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{runs[0].info.run_id}/model", dst_path=str(project / "m"))
    out = model.predict(np.zeros((2, 32, 32, 3), np.uint8))  # what a user has: uint8 images
    assert len(out) == 2 and set(out["class"]) <= set(torch.load(project / "outputs/model.pt", weights_only=True)["classes"])

    # A second repro does nothing and makes no MLflow run, even after Python wrote bytecode caches.
    (project / "src/cifarpipe/__pycache__").mkdir(exist_ok=True)
    (project / "src/cifarpipe/__pycache__/engine.cpython-311.pyc").write_bytes(b"\0")
    again = run(["dvc", "repro"], project).stdout
    assert ran(again) == set() and len(all_runs(project)) == 1

    # A train param reruns train and evaluate only; split.seed reruns split onward.
    set_params(project, **{"train.optimizer.lr": 0.002})
    assert ran(run(["dvc", "repro"], project).stdout) == {"train", "evaluate"}
    set_params(project, **{"split.seed": 7})
    assert ran(run(["dvc", "repro"], project).stdout) == {"split", "train", "evaluate"}
    assert len(all_runs(project)) == 3


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_dvc_exp_run_lands_in_mlflow_with_its_params(project):
    run(["dvc", "repro"], project)
    git_commit(project, "baseline results")
    run(["dvc", "exp", "run", "-S", "train.optimizer.lr=3e-4"], project)
    runs = all_runs(project)
    lrs = sorted(r.data.params["train.optimizer.lr"] for r in runs)
    assert lrs == ["0.0003", "0.001"]
    shown = run(["dvc", "exp", "show", "--json"], project).stdout
    assert "0.0003" in shown


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_mlflow_run_yields_exactly_one_complete_run(project):
    run(["dvc", "repro", "split"], project)  # the data stages, as a user would have them cached
    git_commit(project, "data")
    proc = run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "cifar10", "-P", "epochs=1", "-P", "lr=0.002"], project,
               env={"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"})
    runs = all_runs(project)
    assert len(runs) == 1, proc.stdout + proc.stderr
    r = runs[0]
    assert_complete_run(project, r, epochs=1)
    assert r.data.params["train.optimizer.lr"] == "0.002"
    assert r.data.params["epochs"] == "1"  # MLflow's own record of the -P value
    assert "0.002" in run(["dvc", "exp", "show", "--json"], project).stdout

    # Again with the same params: DVC has the results cached, yet the new run is complete too.
    run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "cifar10", "-P", "epochs=1", "-P", "lr=0.002"], project,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"})
    runs = all_runs(project)
    assert len(runs) == 2
    for r in runs:
        assert_complete_run(project, r, epochs=1)


def test_mlflow_run_entry_in_a_bare_environment_explains_the_env_manager(tmp_path):
    # `mlflow run .` without --env-manager local builds a bare virtualenv; -S (no site-packages) is one.
    import subprocess
    import sys

    from conftest import REPO
    proc = subprocess.run([sys.executable, "-S", str(REPO / "stages/mlflow_run.py"), "--epochs", "1"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--env-manager local" in proc.stderr and "torch" in proc.stderr


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_experiments_compare_in_dvc_and_applying_one_reruns_nothing(project):
    run(["dvc", "repro"], project)
    git_commit(project, "baseline results")  # metrics and plots files are committed, DVC's convention
    run(["dvc", "exp", "run", "-n", "lr-3e-3", "-S", "train.optimizer.lr=0.003"], project)
    run(["dvc", "exp", "run", "-n", "batch-16", "-S", "train.batch_size=16"], project)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    accuracies = {}
    for commit in shown:
        for exp in [commit] + [e for group in commit.get("experiments") or [] for e in group["revs"]]:
            metrics = (exp.get("data") or {}).get("metrics") or {}
            test = metrics.get("outputs/metrics.json", {}).get("data", {})
            train = metrics.get("outputs/train_metrics.json", {}).get("data", {})
            assert "error" not in json.dumps(metrics), exp
            accuracies[exp.get("name") or exp["rev"]] = (test.get("accuracy"), train.get("best_val_accuracy"))
    assert {"lr-3e-3", "batch-16"} <= accuracies.keys()
    assert all(a is not None and b is not None for a, b in accuracies.values()), accuracies

    diff = json.loads(run(["dvc", "metrics", "diff", "lr-3e-3", "batch-16", "--all", "--json"], project).stdout)
    assert {"accuracy", "loss", "per_class_accuracy.cat"} <= diff["outputs/metrics.json"].keys()
    assert "best_val_accuracy" in diff["outputs/train_metrics.json"]
    plots = json.loads(run(["dvc", "plots", "diff", "lr-3e-3", "batch-16", "--json"], project).stdout)
    assert not plots.get("errors"), plots["errors"]
    assert sorted(plots["data"]) == ["accuracy", "confusion", "learning_rate", "loss"]  # no default twins
    fields = {}
    for plot_id, (chart,) in plots["data"].items():  # one chart each, holding both experiments' values
        values = chart["content"]["data"]["values"]
        assert {v["rev"] for v in values} == {"lr-3e-3", "batch-16"}, plot_id
        fields[plot_id] = {v.get("field") for v in values}
    assert fields["loss"] == {"train_loss", "val_loss"} and fields["accuracy"] == {"train_accuracy", "val_accuracy"}

    # Back to the first experiment: its results are in git and DVC's cache, so nothing reruns,
    # and neither experiment's checkpoints were touched by the other.
    run(["dvc", "exp", "apply", "lr-3e-3"], project)
    assert ran(run(["dvc", "repro"], project).stdout) == set()
    assert "up to date" in run(["dvc", "status"], project).stdout
    assert len(list((project / "outputs/checkpoints").iterdir())) == 3
    # (batch-16 ran after lr-3e-3 in the same workspace, so it kept lr 0.003: DVC's -S behaviour)
    lr_run, = [r for r in all_runs(project) if (r.data.params["train.optimizer.lr"], r.data.params["train.batch_size"])
               == ("0.003", "32")]
    assert (project / "outputs/run_id.txt").read_text().strip() == lr_run.info.run_id


def test_the_plateau_scheduler_fires_and_the_lr_curve_shows_it(project):
    # patience 0, threshold 0: the rate drops tenfold after every epoch whose validation accuracy
    # does not beat the best so far, and only then. A rise in between tells validation accuracy
    # (mode max) from the loss: a scheduler stepped on the loss would fire on every epoch.
    set_params(project, **{"train.epochs": 5, "train.scheduler.patience": 0, "train.scheduler.threshold": 0.0,
                           "train.optimizer.lr": 0.003})
    run(["dvc", "repro", "train"], project)
    history = pd.read_csv(project / "outputs/history.csv")
    best, expected, fired = float("-inf"), [0.003], []
    for acc in history["val_accuracy"][:-1]:  # ReduceLROnPlateau's rule (mode max, threshold_mode rel)
        improved = acc > best
        best = acc if improved else best
        fired.append(not improved)
        expected.append(expected[-1] if improved else expected[-1] * 0.1)
    assert history["lr"].tolist() == pytest.approx(expected, rel=1e-9)
    assert any(fired[1:]) and not all(fired[1:]), f"the data must both stall and improve: {fired}"
    client = store(project)
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    logged = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert logged == pytest.approx(expected, rel=1e-9)
