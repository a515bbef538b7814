"""Queued sweeps into one store: `dvc exp run --queue` + `dvc queue start -j 2` run each experiment in a
temporary copy of the repository (.dvc/tmp/exps/...), in parallel; every run lands in the repository's
own ./mlflow.db (no MLFLOW_TRACKING_URI), complete, with its artifacts outside the deleted copy."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import checkpoint_models, git_commit, kept_checkpoints, pyfunc_models, run
from cifarpipe.tracking import store
from cifarpipe.tracking.run import EPOCH_METRICS


def wait_for_queue(project: Path, deadline_s: float = 900) -> str:
    """`dvc queue status` once no experiment is queued or running (the workers then exit by themselves)."""
    deadline = time.monotonic() + deadline_s
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        tasks = [line for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
        if tasks and not any(s in line for line in tasks for s in ("Queued", "Running")):
            return status
        if time.monotonic() > deadline:
            run(["dvc", "queue", "stop", "--kill"], project, check=False)  # leave no worker behind
            raise AssertionError(f"the queue did not finish:\n{status}")
        time.sleep(3)


@pytest.mark.slow  # 2.5 to 4.5 min on 2 shared cores: 4 pipelines, 2 at a time
def test_a_queued_sweep_with_two_workers_puts_every_run_into_the_repositorys_store(project):
    run(["dvc", "repro", "split"], project)  # data in DVC's cache: the queued experiments train at once
    git_commit(project, "data")
    assert not (project / "mlflow.db").exists()  # a fresh clone: the two first trainings create it together
    run(["dvc", "exp", "run", "--queue", "-S", "train.optimizer.lr=0.001,0.003", "-S", "train.seed=0,1"], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    status = wait_for_queue(project)
    assert status.count("Success") == 4, status

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cifar10")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4
    assert {(r.data.params["train.optimizer.lr"], r.data.params["train.seed"]) for r in runs} == {
        ("0.001", "0"), ("0.001", "1"), ("0.003", "0"), ("0.003", "1")}
    names = {r.data.tags.get("dvc_experiment") for r in runs}
    assert None not in names and len(names) == 4
    for r in runs:
        run_id = r.info.run_id
        assert r.info.status == "FINISHED", r.info
        for key in EPOCH_METRICS:  # every epoch of every run, once
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], (run_id, key)
        assert len(client.get_metric_history(run_id, "test_accuracy")) == 1  # evaluate ran too
        # The artifacts outlive the temporary copy: in the repository's mlruns/, readable now.
        assert ".dvc/tmp" not in r.info.artifact_uri and r.info.artifact_uri.startswith((project / "mlruns").as_uri())
        assert sorted(checkpoint_models(client, run_id)) == [1, 2] and 2 in kept_checkpoints(client, run_id)
        assert Path(client.download_artifacts(run_id, "history.csv", str(project / "dl" / run_id))).read_text()
    models = pyfunc_models(client, exp.experiment_id)
    assert sorted((m.source_run_id, m.status.name) for m in models) == sorted((r.info.run_id, "READY") for r in runs)
    assert not list((project / ".dvc").rglob("mlflow.db"))


def test_processes_opening_a_fresh_sqlite_store_at_once_all_get_it(tmp_path):
    """MLflow creates a new SQLite store's tables without a lock: four processes connecting to one
    fresh file and creating the same experiment at the same moment must all succeed."""
    code = ("from cifarpipe.tracking import store; c = store.connect(); "
            "print(store.create_experiment(c, 'cifar10'))")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * 4, "\n".join(err[-2000:] for _, _, err in results)
    [exp_id] = {out.strip() for _, out, _ in results}  # one experiment, the same id for all
    # the creation race's loser (MLflow's "already exists") takes the winner's experiment
    assert store.create_experiment(MlflowClient(env["MLFLOW_TRACKING_URI"]), "cifar10") == exp_id


@pytest.mark.slow  # about 1 min; the default run covers the same rule with the test below it
def test_a_queued_run_with_a_relative_store_uri_lands_in_the_repositorys_store(project):
    """MLFLOW_TRACKING_URI=sqlite:///mlflow.db is relative: the queued stage runs in DVC's temporary
    copy, which DVC deletes; the run must land in the repository's ./mlflow.db, as the stage says."""
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    env = {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    run(["dvc", "exp", "run", "--queue", "-n", "q8", "-S", "train.seed=8"], project, env=env)
    run(["dvc", "queue", "start"], project, env=env)
    assert "Success" in wait_for_queue(project)
    logs = run(["dvc", "queue", "logs", "q8"], project).stdout
    assert f"logged to MLflow (sqlite:///{project / 'mlflow.db'})" in logs, logs
    run(["dvc", "exp", "apply", "q8"], project)
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    r = client.get_run(run_id)
    assert (r.info.status, r.data.params["train.seed"], r.data.tags["dvc_experiment"]) == ("FINISHED", "8", "q8")
    assert "test_accuracy" in r.data.metrics
    assert not list((project / ".dvc").rglob("mlflow.db"))


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite:///{root}/mlflow.db"),
    ("sqlite:///stores/a.db?timeout=20", "sqlite:///{root}/stores/a.db?timeout=20"),
    ("file:./mlruns", "file://{root}/mlruns"),
    ("mlruns", "{root}/mlruns"),
    ("sqlite:////elsewhere/mlflow.db", "sqlite:////elsewhere/mlflow.db"),  # absolute: as given
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
@pytest.mark.parametrize("dvc_root", [True, False])
def test_a_relative_store_uri_in_dvcs_temporary_copy_is_taken_in_the_repository(tmp_path, monkeypatch, capsys, uri,
                                                                                 expected, dvc_root):
    """What a queued stage's process resolves, with DVC_ROOT (dvc 3.x) and without it (an older DVC:
    the temporary copy's path, <repo>/.dvc/tmp/exps/<name>/, says where the repository is)."""
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test, also where tracking_uri exports
    monkeypatch.delenv("DVC_ROOT", raising=False)
    if dvc_root:
        monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setattr(store, "_REBASED_URI", None)
    want = expected.format(root=repo.resolve())
    assert [store.tracking_uri(), store.tracking_uri()] == [want, want]
    err = capsys.readouterr().err
    assert err.count(f"note: MLflow store {want}") == (want != uri)  # said once, naming the store used
