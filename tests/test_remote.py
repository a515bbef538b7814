"""Sharing data and models between machines with a DVC remote (here a local folder, as a cloud or SSH
remote would be): `dvc push` from one clone, `dvc pull` into a fresh clone gives the data outputs and
the trained model, and nothing needs to run there."""
from __future__ import annotations

from pathlib import Path

from conftest import git_commit, run

PULLED = ["data/cifar10.npz", "data/split.json", "data/split_hash.txt", "outputs/model.pt",
          "outputs/confusion.png", "outputs/mistakes.png"]
IN_GIT = ["outputs/run_id.txt", "outputs/history.csv", "outputs/train_metrics.json", "outputs/metrics.json",
          "outputs/per_class.csv", "outputs/confusion.csv", "dvc.lock"]


def test_push_then_pull_into_a_fresh_clone_gives_data_and_model_and_nothing_reruns(project, tmp_path):
    run(["dvc", "repro"], project)
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], project)
    git_commit(project, "trained; the team's DVC remote")
    run(["dvc", "push"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    for rel in IN_GIT:  # cache: false outputs travel by git
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel
    assert not (clone / "outputs/model.pt").exists()
    run(["dvc", "pull"], clone)
    for rel in PULLED:
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel
    # Deliberately not shared: the training checkpoints (no DVC output) and the raw archive (cache: false,
    # not in git: 163 MB that the download stage fetches again if it is ever needed).
    assert not (clone / "outputs/checkpoints").exists()
    assert not (clone / "data/raw/cifar-10-python.tar.gz").exists()
    repro = run(["dvc", "repro", "--allow-missing"], clone)
    assert "Running stage" not in repro.stdout, repro.stdout
    assert not (clone / "mlflow.db").exists()  # nothing was trained or evaluated
