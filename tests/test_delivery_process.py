"""Evaluate's MLflow delivery runs in a process of its own (tracking.delivery_process): what happens
when that process dies, and that it never outlives a stage that died."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import gone_within, run
from cifarpipe.tracking.delivery_process import DeliveryFailed, DeliveryProcess
from cifarpipe.tracking.journal import JOURNAL_NAME, Journal


def test_a_delivery_process_killed_leaves_the_evaluation_pending_and_the_next_repro_delivers_it(project):
    run(["dvc", "repro", "train"], project)
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    killed = run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": "delivery:0"}, check=False)
    assert killed.returncode != 0 and "logged to MLflow" not in killed.stdout
    assert "the MLflow delivery process was killed by signal 9 before answering" in killed.stderr
    assert f"it waits in outputs/{JOURNAL_NAME}" in killed.stderr
    pending = json.loads((project / "outputs" / JOURNAL_NAME).read_text())["items"]
    assert [(it["kind"], it["run_id"]) for it in pending] == [("evaluation", run_id)]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert "test_accuracy" not in client.get_run(run_id).data.metrics  # nothing of it reached the run

    delivered = run(["dvc", "repro"], project)
    assert f"logged to MLflow (sqlite:///{project / 'mlflow.db'}): training run {run_id}" in delivered.stdout
    assert client.get_run(run_id).data.metrics["test_accuracy"] == json.loads(
        (project / "outputs/metrics.json").read_text())["accuracy"]
    assert not (project / "outputs" / JOURNAL_NAME).exists()


def test_the_delivery_process_dies_with_its_stage_also_after_the_request(tmp_path):
    """A stage killed once its request is sent: the delivery process must not go on delivering behind
    it (a rerun of the stage would deliver the same journal at the same time); the evaluation stays
    pending, for the rerun."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run("0").info.run_id
    (tmp_path / "metrics.json").write_text("{}\n")
    journal = Journal(tmp_path / JOURNAL_NAME)
    journal.add_evaluation(run_id, {"data.url": "file:///x", "data.md5": "0"}, {"test_accuracy": 0.5, "test_loss": 1.0},
                           [tmp_path / "metrics.json"])
    code = ("import json, os, signal, sys\n"
            "from cifarpipe.tracking.delivery_process import DeliveryProcess\n"
            "d = DeliveryProcess()\n"
            "d.proc.stdin.write(json.dumps({'journal': sys.argv[1], 'run_id': sys.argv[2]}) + '\\n')\n"
            "d.proc.stdin.flush()\n"
            "print(d.proc.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    stage = subprocess.run([sys.executable, "-c", code, str(journal.path), run_id], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert stage.returncode == -9
    assert gone_within(int(stage.stdout.split()[0]), 60)
    assert "test_accuracy" not in client.get_run(run_id).data.metrics, stage.stderr[-2000:]
    assert [it["kind"] for it in Journal(journal.path).items] == ["evaluation"]


def test_a_delivery_process_that_fails_says_so_and_is_not_taken_for_an_outage(tmp_path, monkeypatch):
    """A store MLflow cannot use makes the child fail on its own: the stage must say that it failed
    (exit 1, its error above), not that the delivery merely waits for the store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    monkeypatch.chdir(tmp_path)
    with DeliveryProcess() as delivery, pytest.raises(DeliveryFailed) as failed:
        delivery.deliver(tmp_path / JOURNAL_NAME, "0" * 32)
    assert not failed.value.killed
    assert "the MLflow delivery process failed with exit status 1 (its error is above)" in str(failed.value)
