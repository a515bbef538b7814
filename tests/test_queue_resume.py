"""Killed queued experiments resume: DVC runs a queued (or --temp) experiment in a temporary copy,
<repo>/.dvc/tmp/exps/tmpXXXX/, deleted when the experiment ends, also when it was killed. Its
checkpoints and journal live beside the repository instead, so queueing the experiment again
under the same name continues it, in the same MLflow run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import git_commit, run, set_params, stage_cmd
from test_queue import wait_for_queue
from cifarpipe import workspace
from cifarpipe.config import UserError
from cifarpipe.tracking import provenance
from cifarpipe.tracking.journal import journal_path
from cifarpipe.training import checkpoint


def test_paths_in_a_dvc_temporary_copy_are_the_repositorys(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    copies = [repo / ".dvc/tmp/exps" / name for name in ("tmpaaaa", "tmpbbbb")]
    for d in copies:
        d.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "lr3")
    monkeypatch.chdir(copies[0])
    assert workspace.in_temporary_copy()
    assert workspace.beside_repository("outputs/checkpoints") == repo / "outputs/checkpoints"
    assert workspace.beside_repository("/abs/path") == Path("/abs/path")
    assert journal_path(Path("outputs/run_id.txt")) == repo / "outputs/mlflow_pending-lr3.json"
    first = provenance.workspace_tags()
    monkeypatch.chdir(copies[1])  # the experiment queued again: a new copy, the same workspace
    assert provenance.workspace_tags() == first and str(repo) in first["workspace"]
    monkeypatch.setenv("DVC_EXP_NAME", "lr1")  # another experiment: its own journal and workspace
    assert journal_path(Path("outputs/run_id.txt")) == repo / "outputs/mlflow_pending-lr1.json"
    assert provenance.workspace_tags()["workspace_key"] != first["workspace_key"]
    monkeypatch.delenv("DVC_ROOT")  # an older DVC: the working directory's place still says it
    assert workspace.beside_repository("outputs/checkpoints") == repo / "outputs/checkpoints"

    monkeypatch.chdir(repo)  # `dvc repro` in the repository itself: paths as given
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert not workspace.in_temporary_copy()
    assert workspace.beside_repository("outputs/checkpoints") == Path("outputs/checkpoints")
    assert journal_path(Path("outputs/run_id.txt")) == Path("outputs/mlflow_pending.json")


def test_a_job_folder_is_trained_by_one_process_at_a_time(tmp_path):
    job = tmp_path / "checkpoints" / "0123abcd"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cifarpipe.training import checkpoint; "
                               f"checkpoint.claim({str(job)!r}); print('claimed', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert checkpoint.is_claimed(job)
        with pytest.raises(UserError, match="another process is training this job"):
            checkpoint.claim(job)
    finally:
        holder.kill()
        holder.wait()
    assert not checkpoint.is_claimed(job)  # the kernel dropped the dead process's lock: nothing stale
    checkpoint.claim(job)
    assert checkpoint.is_claimed(job)


def _temporary_copy(project: Path, name: str) -> Path:
    """What DVC makes for a queued experiment: a copy of the workspace under .dvc/tmp/exps/."""
    copy = project / ".dvc/tmp/exps" / name
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns(".dvc", "mlflow.db*", "mlruns"))
    return copy


def test_a_train_stage_killed_in_one_temporary_copy_resumes_in_the_next(project):
    """The queue's path without the queue: the train stage SIGKILLed after epoch 1 in one copy,
    the copy deleted (as DVC deletes it), then the stage run in a new copy of the same experiment."""
    set_params(project, **{"train.epochs": 2})
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    env = {"DVC_ROOT": str(project), "DVC_EXP_NAME": "lr3"}
    first = _temporary_copy(project, "tmpfirst")
    killed = run(stage_cmd(project, "train"), first, env={**env, "CIFARPIPE_FAULT": "after_checkpoint:1"}, check=False)
    assert killed.returncode == -9, killed.stderr
    [job] = (project / "outputs/checkpoints").iterdir()
    saved = torch.load(job / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and not saved["complete"]
    assert not (first / "outputs/checkpoints").exists()
    shutil.rmtree(first)

    second = _temporary_copy(project, "tmpsecond")
    out = run(stage_cmd(project, "train"), second, env=env).stdout
    assert f"resuming from {job / 'last.pt'}: epoch 2" in out, out
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [r] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.run_id == saved["mlflow_run_id"] and r.info.status == "FINISHED" and r.info.run_name == "lr3"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1, 2]
    assert not (project / "outputs/mlflow_pending-lr3.json").exists()  # everything delivered


@pytest.mark.slow  # 2 to 4 min on 2 shared cores: a queued pipeline, killed, queued again
def test_a_queued_experiment_killed_mid_epoch_resumes_when_queued_again(project):
    set_params(project, **{"train.epochs": 3})
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    queue = ["dvc", "exp", "run", "--queue", "-n", "lr3", "-S", "train.optimizer.lr=0.003"]
    run(queue, project)
    # SIGKILL after step 5 of epoch 2 (the queue's workers take their environment from `dvc queue start`)
    run(["dvc", "queue", "start"], project, env={"CIFARPIPE_FAULT": "step:2:5"})
    assert "Failed" in wait_for_queue(project)
    [job] = (project / "outputs/checkpoints").iterdir()
    killed = torch.load(job / "last.pt", weights_only=True)
    assert killed["epoch"] == 1 and not killed["complete"]
    assert not [p for p in (project / ".dvc/tmp/exps").glob("tmp*")]  # DVC deleted its copy

    run(queue, project)  # the same name and params, then start: it resumes
    run(["dvc", "queue", "start"], project)
    status = wait_for_queue(project)
    assert status.count("Success") == 1, status
    logs = run(["dvc", "queue", "logs", "lr3"], project, check=False).stdout
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [r] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.run_id == killed["mlflow_run_id"] and r.info.status == "FINISHED", logs
    for key in ("train_loss", "val_accuracy"):  # every epoch once, in the killed attempt's run
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == [1, 2, 3]
    assert len(client.get_metric_history(r.info.run_id, "test_accuracy")) == 1
    assert torch.load(job / "last.pt", weights_only=True)["complete"]
    assert "lr3" in run(["dvc", "exp", "list", "--name-only"], project).stdout.split()
