"""Train's MLflow run is kept by a process of its own (tracking.job_process): the stage process
never loads MLflow, the child loads torch only where it logs the model (at close), the child dies
with the stage, and a store that does not answer is said before anything is trained. The child killed mid-training and a Ctrl-C to both are in
test_resume.py (they need its uninterrupted reference run)."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gone_within, run
from cifarpipe.config import UserError
from cifarpipe.pipeline import train, trial
from cifarpipe.tracking.job_process import JobProcess, Ready, RemoteRun


def test_the_train_stage_process_imports_neither_mlflow_nor_pandas():
    """What the MLflow process is for: 1.2 s of imports and the store's opening out of the stage's
    way (tracking.child). A module of the train stage importing MLflow again would undo it."""
    code = ("import sys\n"
            "import cifarpipe.pipeline.train, cifarpipe.pipeline.trial\n"
            "print(sorted(m for m in ('mlflow', 'pandas', 'sqlalchemy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module, name", [("job_process", "JobProcess"), ("delivery_process", "DeliveryProcess")])
def test_a_stages_mlflow_process_exits_when_the_stage_is_killed(tmp_path, module, name):
    """Train's and evaluate's MLflow processes are started first thing by their stage; a stage
    SIGKILLed at once must not leave them behind (tracking.child)."""
    code = ("import os, signal\n"
            f"from cifarpipe.tracking.{module} import {name}\n"
            f"p = {name}()\n"
            "print(p.proc.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    stage = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert stage.returncode == -9
    assert gone_within(int(stage.stdout.split()[0]), 60)
    if name == "DeliveryProcess":
        assert not (tmp_path / "mlflow.db").exists()  # it delivered nothing and made no store


def test_a_store_that_does_not_answer_is_the_stages_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.chdir(tmp_path)
    with JobProcess() as tracker:
        with pytest.raises(UserError) as error:
            tracker.ready()
        assert tracker.proc.wait(timeout=60) == 0  # it said so and ended
    assert "the MLflow tracking store http://127.0.0.1:9 is unreachable" in str(error.value)
    assert "Nothing was trained" in str(error.value)


class RecordingProcess:
    """JobProcess's stage side, recording each request as the pipe would carry it (pickled)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def ready(self) -> Ready:
        return Ready("sqlite:///mlflow.db", 0.0)

    def send(self, name: str, *args) -> None:
        self.requests.append(pickle.dumps((name, args)))

    def call(self, name: str, *args):
        self.send(name, *args)
        return "models:/m-0"

    def open(self, *args) -> RemoteRun:
        self.call("open", *args)
        return RemoteRun(self, "0" * 32, None)


def test_the_stages_requests_unpickle_without_torch(project, monkeypatch):
    """The MLflow process must not import torch to read a request (1.5-4 s on 2 cores; at open the
    stage waits for it): a torch object anywhere in a request (torch.__version__ is one) would make
    unpickling it import torch. Every request of a real training, unpickled in a fresh process."""
    run(["dvc", "repro", "split"], project)
    monkeypatch.chdir(project)
    recorder = RecordingProcess()
    assert train.main(trial.stage_paths(), Path("params.yaml"), "stages/train.py", [], recorder) == 0
    names = [pickle.loads(r)[0] for r in recorder.requests]
    assert names == ["open", "epoch_done", "epoch_done", "close"]
    code = ("import pickle, sys\n"
            "for request in pickle.load(sys.stdin.buffer):\n"
            "    pickle.loads(request)\n"
            "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(recorder.requests), capture_output=True,
                         check=True).stdout
    assert out.decode().strip() == "[]"
