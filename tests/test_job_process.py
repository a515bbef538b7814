"""Train's MLflow run is kept by a process of its own (tracking.job_process): the stage process
never loads MLflow, the child dies with the stage, and a store that does not answer is said
before anything is trained. The child killed mid-training and a Ctrl-C to both are in
test_resume.py (they need its uninterrupted reference run)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import gone_within
from cifarpipe.config import UserError
from cifarpipe.tracking.job_process import JobProcess


def test_the_train_stage_process_imports_neither_mlflow_nor_pandas():
    """What the MLflow process is for: 1.2 s of imports and the store's opening out of the stage's
    way (tracking.child). A module of the train stage importing MLflow again would undo it."""
    code = ("import sys\n"
            "import cifarpipe.pipeline.train, cifarpipe.pipeline.trial\n"
            "print(sorted(m for m in ('mlflow', 'pandas', 'sqlalchemy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_mlflow_process_exits_when_its_stage_is_killed(tmp_path):
    """Started first thing by the stage; a stage SIGKILLed at once must not leave it behind."""
    code = ("import os, signal\n"
            "from cifarpipe.tracking.job_process import JobProcess\n"
            "p = JobProcess()\n"
            "print(p.proc.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    stage = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert stage.returncode == -9
    assert gone_within(int(stage.stdout.split()[0]), 60)


def test_a_store_that_does_not_answer_is_the_stages_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.chdir(tmp_path)
    with JobProcess() as tracker:
        with pytest.raises(UserError) as error:
            tracker.ready()
        assert tracker.proc.wait(timeout=60) == 0  # it said so and ended
    assert "the MLflow tracking store http://127.0.0.1:9 is unreachable" in str(error.value)
    assert "Nothing was trained" in str(error.value)
