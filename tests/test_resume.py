"""Training survives SIGKILL at any moment and resumes into the same MLflow run, bit for bit on CPU."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import git_commit, make_project, run, serve_folder, set_params, stage_cmd
from cifarpipe.tracking import EPOCH_METRICS

EPOCHS = 3


def runs_of(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def final_weights(project: Path) -> dict[str, torch.Tensor]:
    return torch.load(project / "outputs/model.pt", weights_only=True)["state_dict"]


def strays(project: Path) -> list[str]:
    return [str(p) for folder in ("outputs", "data") for p in (project / folder).rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_archive):
    """An uninterrupted run (3 epochs), plus a copy of the project with only the data stages done,
    from which each interrupted run starts."""
    base = tmp_path_factory.mktemp("resume")
    with serve_folder(base / "www") as server:
        seed = make_project(base / "seed", *tiny_archive, server)
        set_params(seed, **{"train.epochs": EPOCHS})
        run(["dvc", "repro", "split"], seed)
        git_commit(seed, "data stages done")
        done = base / "uninterrupted"
        shutil.copytree(seed, done, symlinks=True)
        run(["dvc", "repro"], done)
        yield seed, done


def fresh_copy(seed: Path, dest: Path) -> Path:
    shutil.copytree(seed, dest, symlinks=True)
    return dest


def assert_same_as_uninterrupted(project: Path, done: Path) -> None:
    a, b = final_weights(project), final_weights(done)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((project / "outputs/metrics.json").read_text()) == json.loads((done / "outputs/metrics.json").read_text())
    client, runs = runs_of(project)
    assert len(runs) == 1, "a resumed training must continue the same MLflow run"
    r = runs[0]
    assert r.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), f"{key}: {steps}"
    _, done_runs = runs_of(done)
    for key in ("train_loss", "val_accuracy", "val_loss", "test_accuracy"):
        assert r.data.metrics[key] == done_runs[0].data.metrics[key], key
    assert strays(project) == []


@pytest.mark.parametrize("fault", [
    "step:2:5",            # SIGKILL inside epoch 2
    "validation:2",        # SIGKILL while validating epoch 2
    "checkpoint_write:2",  # SIGKILL with epoch 2's checkpoint half written
    "after_checkpoint:1",  # SIGKILL right after epoch 1's checkpoint, before its metrics were sent
])
def test_sigkill_then_dvc_repro_resumes_to_the_same_result(baseline, tmp_path, fault):
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    killed = run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": fault}, check=False)
    assert killed.returncode != 0
    resumed = run(["dvc", "repro"], project)
    assert "resuming from outputs/checkpoints/last.pt" in resumed.stdout
    assert_same_as_uninterrupted(project, done)


def test_sigint_saves_mid_epoch_and_resumes_exactly(baseline, tmp_path):
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    stopped = run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "step:2:4:INT"}, check=False)
    assert stopped.returncode == 130
    assert "stopped in epoch 2 after batch 4" in stopped.stdout and "dvc repro" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    ckpt = torch.load(project / "outputs/checkpoints/last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 4)
    _, runs = runs_of(project)
    assert runs[0].info.status == "KILLED"
    resumed = run(["dvc", "repro"], project)
    assert "epoch 2, batch 4" in resumed.stdout
    assert_same_as_uninterrupted(project, done)


def test_two_fresh_runs_give_identical_results(baseline, tmp_path):
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    run(["dvc", "repro"], project)
    assert_same_as_uninterrupted(project, done)


def test_a_checkpoint_from_other_params_is_kept_and_not_resumed(baseline, tmp_path):
    seed, _ = baseline
    project = fresh_copy(seed, tmp_path / "p")
    run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": "after_checkpoint:1"}, check=False)
    old = torch.load(project / "outputs/checkpoints/last.pt", weights_only=True)
    set_params(project, **{"train.optimizer.lr": 0.002})
    out = run(["dvc", "repro"], project).stdout
    assert "not resuming it" in out and "starting fresh" in out
    kept = project / f"outputs/checkpoints/last.stale-{old['fingerprint']}.pt"
    assert kept.exists()
    client, runs = runs_of(project)
    status = {r.info.run_id: r.info.status for r in runs}
    assert status[old["mlflow_run_id"]] == "KILLED"  # not left RUNNING forever
    assert sorted(status.values()) == ["FINISHED", "KILLED"]


def test_an_unreachable_store_stops_training_before_it_starts(baseline, tmp_path):
    seed, _ = baseline
    project = fresh_copy(seed, tmp_path / "p")
    uri = "http://127.0.0.1:9"
    proc = run(["dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert proc.returncode != 0
    assert f"the MLflow tracking store {uri} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project / "outputs/checkpoints/last.pt").exists()
