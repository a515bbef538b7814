"""Training survives SIGKILL at any moment and resumes into the same MLflow run, bit for bit on CPU."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import (checkpoint_models, git_commit, kept_checkpoints, make_project, run, serve_folder, set_params,
                      process_state, stage_cmd, user_env)
from cifarpipe.tracking.run import EPOCH_METRICS

EPOCHS = 3


def runs_of(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


TIMING = {"epoch_seconds", "images_per_second"}  # wall-clock figures: the only values allowed to differ


def final_weights(project: Path) -> dict[str, torch.Tensor]:
    return torch.load(project / "outputs/model.pt", weights_only=True)["state_dict"]


def job_dir(project: Path) -> Path:
    """The checkpoint folder of the (one) training job: outputs/checkpoints/<fingerprint>/."""
    folders = [d for d in (project / "outputs/checkpoints").iterdir() if d.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def last_checkpoint(project: Path) -> dict | None:
    path = job_dir(project) / "last.pt"
    return torch.load(path, weights_only=True) if path.exists() else None


def strays(project: Path) -> list[str]:
    return [str(p) for folder in ("outputs", "data") for p in (project / folder).rglob("*") if p.name.endswith(".tmp")]


def without_timing(csv: Path) -> list[dict]:
    return pd.read_csv(csv).drop(columns=sorted(TIMING)).to_dict("records")


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
    """Bitwise the same weights, the same test metrics, the same history (every epoch once, every
    value equal but wall-clock time), in one FINISHED MLflow run whose curves equal the reference's."""
    a, b = final_weights(project), final_weights(done)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((project / "outputs/metrics.json").read_text()) == json.loads((done / "outputs/metrics.json").read_text())
    assert without_timing(project / "outputs/history.csv") == without_timing(done / "outputs/history.csv")
    summary, reference = (json.loads((p / "outputs/train_metrics.json").read_text()) for p in (project, done))
    summary.pop("train_seconds"), reference.pop("train_seconds")
    assert summary == reference
    client, runs = runs_of(project)
    assert [r.info.status for r in runs] == ["FINISHED"], "a resumed training must finish the one MLflow run"
    r = runs[0]
    done_client, done_runs = runs_of(done)
    for key in EPOCH_METRICS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
        assert [step for step, _ in history] == list(range(1, EPOCHS + 1)), f"{key}: {history}"
        if key not in TIMING:
            expected = sorted((m.step, m.value) for m in done_client.get_metric_history(done_runs[0].info.run_id, key))
            assert history == expected, key
    for key in ("test_accuracy", "test_loss"):
        assert r.data.metrics[key] == done_runs[0].data.metrics[key], key
    # One checkpoint model per epoch, never two for one step however often the job was killed and
    # resumed; the best and the last epochs' keep the file, as in the uninterrupted run.
    models = checkpoint_models(client, r.info.run_id)
    assert sorted(models) == list(range(1, EPOCHS + 1)) and {s for s, _ in models.values()} == {"READY"}
    assert kept_checkpoints(client, r.info.run_id) == kept_checkpoints(done_client, done_runs[0].info.run_id)
    ids = {m.model_id for m in client.search_logged_models([r.info.experiment_id], filter_string="model_type = 'checkpoint'")}
    outputs = client.get_run(r.info.run_id).outputs.model_outputs
    assert sorted(o.step for o in outputs if o.model_id in ids) == list(range(1, EPOCHS + 1))  # each linked once
    assert strays(project) == []


# Each fault: where CIFARPIPE_FAULT kills training (SIGKILL), and what must be on disk right after,
# so a test proves the kill landed where it says.
FAULTS = {
    "step:1:3": "before the first checkpoint",
    "step:2:5": "inside epoch 2",
    "validation:2": "while validating epoch 2",
    "checkpoint_write:2": "with epoch 2's checkpoint half written",
    "after_checkpoint:1": "right after epoch 1's checkpoint, before its metrics were sent",
    f"after_checkpoint:{EPOCHS}": "after the last epoch's checkpoint, before the final outputs",
    f"finish:{EPOCHS}": "after the final checkpoint and outputs, before the MLflow run is complete",
    "evaluate:0": "during evaluate, with some of its outputs written",
}


def assert_killed_where_said(project: Path, fault: str, killed) -> None:
    ckpt = last_checkpoint(project)
    client, runs = runs_of(project)
    if fault == "evaluate:0":  # training finished and delivered; evaluate wrote part of its outputs
        assert [r.info.status for r in runs] == ["FINISHED"] and ckpt["complete"]
        assert (project / "outputs/per_class.csv").exists() and not (project / "outputs/confusion.csv").exists()
        assert "test_accuracy" not in runs[0].data.metrics
        return
    assert [r.info.status for r in runs] == ["RUNNING"]  # SIGKILL: nothing could mark it
    logged = runs[0].data.metrics
    if fault == "step:1:3":
        assert ckpt is None and "epoch   1/" not in killed.stdout and "val_accuracy" not in logged
        return
    assert (ckpt["epoch"], ckpt["step"]) == {"step:2:5": (1, 0), "validation:2": (1, 0), "checkpoint_write:2": (1, 0),
                                             "after_checkpoint:1": (1, 0)}.get(fault, (EPOCHS, 0))
    if fault == "checkpoint_write:2":
        assert strays(project), "the kill must land with a temporary checkpoint file half written"
    if fault == "after_checkpoint:1":
        assert "val_accuracy" not in logged  # its metrics were never queued
    if fault.startswith("finish"):
        assert ckpt["complete"] and (project / "outputs/model.pt").exists()
    else:
        assert not ckpt["complete"]


# Five of the eight moments run with `pytest -m slow` only (the default run stays near 10 minutes):
# each neighbours a moment that stays (before the first checkpoint and validation ~ inside epoch 2,
# after a checkpoint ~ after the final outputs, evaluate ~ tests/test_delivery_process.py).
SLOW_FAULTS = {"step:1:3", "validation:2", "after_checkpoint:1", f"after_checkpoint:{EPOCHS}", "evaluate:0"}


@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAULTS else f for f in FAULTS])
def test_sigkill_then_dvc_repro_resumes_to_the_same_result(baseline, tmp_path, fault):
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    killed = run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": fault}, check=False)
    assert killed.returncode != 0
    assert_killed_where_said(project, fault, killed)
    resumed = run(["dvc", "repro"], project).stdout
    expected = {"step:1:3": "killed before the first checkpoint", f"after_checkpoint:{EPOCHS}": "all 3 epochs are trained",
                f"finish:{EPOCHS}": "all 3 epochs are trained",
                "evaluate:0": "Stage 'train' didn't change"}.get(fault, "resuming from outputs/checkpoints/")
    assert expected in resumed
    assert_same_as_uninterrupted(project, done)


def test_sigint_saves_mid_epoch_and_resumes_exactly(baseline, tmp_path):
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    stopped = run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "step:2:4:INT"}, check=False)
    assert stopped.returncode == 130
    assert "stopped in epoch 2 after batch 4" in stopped.stdout and "dvc repro" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    ckpt = last_checkpoint(project)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 4) and ckpt["epoch_progress"]["seen"] == 4 * 32
    _, runs = runs_of(project)
    assert runs[0].info.status == "KILLED"
    resumed = run(["dvc", "repro"], project)
    assert "epoch 2, batch 4" in resumed.stdout
    assert_same_as_uninterrupted(project, done)


def test_an_mlflow_process_killed_mid_training_stops_the_stage_and_repro_completes_the_same_run(baseline, tmp_path):
    """Train's MLflow process (tracking.job_process) SIGKILLed as epoch 1's metrics reach it: the
    stage stops at its next call to it (epoch 2's checkpoint is written by then) with a clear
    message, and `dvc repro` resumes into the same run, every epoch logged once."""
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    stopped = run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "mlflow_process:1"}, check=False)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert ("error: the MLflow process of this training was killed by signal 9. What was trained is in the job's "
            "checkpoints: `dvc repro` resumes, in the same MLflow run") in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert last_checkpoint(project)["epoch"] == 2  # epoch 2 trained and saved before the stage found it gone
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    resumed = run(["dvc", "repro"], project)
    assert "resuming from outputs/checkpoints/" in resumed.stdout
    assert (project / "outputs/run_id.txt").read_text().strip() == run_id
    assert_same_as_uninterrupted(project, done)


@pytest.mark.slow  # test_sigint_saves_mid_epoch_and_resumes_exactly covers the safe stop in the default run
def test_ctrl_c_to_the_process_group_stops_at_a_safe_point_and_the_mlflow_process_records_it(baseline, tmp_path):
    """A terminal's Ctrl-C reaches the stage and its MLflow process alike: the MLflow process must
    not die of it, but record the run KILLED when the stage, stopped at its safe point, says so."""
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    stage = subprocess.Popen(stage_cmd(project, "train"), cwd=project, start_new_session=True, text=True,
                             env=user_env({"CIFARPIPE_FAULT": "step:2:4:STOP"}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while process_state(stage.pid) != "T":
            assert stage.poll() is None and time.monotonic() < deadline, "the stage never reached step 4 of epoch 2"
            time.sleep(0.2)
        os.killpg(stage.pid, signal.SIGINT)  # what the terminal sends: to every process of the group
        os.kill(stage.pid, signal.SIGCONT)
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    assert stage.returncode == 130, out + err
    assert "stopped in epoch 2 after batch 4" in out and "Traceback" not in err
    _, runs = runs_of(project)
    assert [r.info.status for r in runs] == ["KILLED"]
    run(["dvc", "repro"], project)
    assert_same_as_uninterrupted(project, done)


def test_a_resume_with_other_evaluate_params_records_them_and_its_evaluation_lands_in_its_run(baseline, tmp_path):
    """Killed, then evaluate.batch_size changed (what a user does after an out-of-memory error in
    validation): the resumed run kept the old value, got no test_accuracy, and its test metrics went
    into a nested "-eval-" run; the registered version had no test_accuracy tag."""
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    assert run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": "step:2:3"}, check=False).returncode != 0
    set_params(project, **{"evaluate.batch_size": 25})
    out = run(["dvc", "repro"], project).stdout
    assert "continues with params changed since it last ran: evaluate.batch_size 50 -> 25" in out
    assert "resuming from outputs/checkpoints/" in out
    client, runs = runs_of(project)
    [r] = runs  # no nested evaluation run
    assert r.data.params["evaluate.batch_size"] == "50"  # MLflow params are immutable: the tag says what ran
    assert r.data.tags["param_changed.evaluate.batch_size"] == "50 -> 25"
    accuracy = json.loads((project / "outputs/metrics.json").read_text())["accuracy"]
    assert r.data.metrics["test_accuracy"] == accuracy
    [version] = client.search_model_versions(f"run_id = '{r.info.run_id}'")
    assert float(version.tags["test_accuracy"]) == round(accuracy, 4)


@pytest.mark.slow  # every kill test compares with an uninterrupted run bit for bit, which needs the same
def test_two_fresh_runs_give_identical_results(baseline, tmp_path):
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    run(["dvc", "repro"], project)
    assert_same_as_uninterrupted(project, done)


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_other_params_train_in_their_own_folder_and_switching_back_resumes(baseline, tmp_path):
    seed, _ = baseline
    project = fresh_copy(seed, tmp_path / "p")
    run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": "after_checkpoint:1"}, check=False)
    first = job_dir(project)
    old = torch.load(first / "last.pt", weights_only=True)
    set_params(project, **{"train.optimizer.lr": 0.002})
    out = run(["dvc", "repro"], project).stdout
    assert "resuming" not in out
    client, runs = runs_of(project)
    status = {r.info.run_id: r.info.status for r in runs}
    assert status[old["mlflow_run_id"]] == "KILLED"  # not left RUNNING forever
    assert sorted(status.values()) == ["FINISHED", "KILLED"]
    assert torch.load(first / "last.pt", weights_only=True)["epoch"] == 1  # untouched by the other job
    assert len(list((project / "outputs/checkpoints").iterdir())) == 2

    set_params(project, **{"train.optimizer.lr": 0.001})
    back = run(["dvc", "repro"], project).stdout
    assert f"resuming from {first.relative_to(project)}/last.pt: epoch 2" in back
    _, runs = runs_of(project)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_other_training_code_never_resumes_a_checkpoint(baseline, tmp_path):
    seed, _ = baseline
    project = fresh_copy(seed, tmp_path / "p")
    own_code = {"PYTHONPATH": str(project / "src")}  # the stages run this copy's library
    run(["dvc", "repro"], project, env={**own_code, "CIFARPIPE_FAULT": "after_checkpoint:1"}, check=False)
    with open(project / "src/cifarpipe/training/engine.py", "a") as f:
        f.write("\n# a change to the training loop\n")
    out = run(["dvc", "repro"], project, env=own_code).stdout
    assert "resuming" not in out
    assert len(list((project / "outputs/checkpoints").iterdir())) == 2


def test_an_unreachable_store_stops_training_before_it_starts(baseline, tmp_path):
    seed, _ = baseline
    project = fresh_copy(seed, tmp_path / "p")
    uri = "http://127.0.0.1:9"
    proc = run(["dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert proc.returncode != 0
    assert f"the MLflow tracking store {uri} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project / "outputs/checkpoints").exists()


def test_every_epoch_trains_on_full_batches_only(baseline):
    # drop_last: 425 training images in batches of 32 are 13 full batches, 416 images; the 9 left
    # over never make a short step. train_accuracy is correct / images seen, so accuracy * 416 is a
    # whole number of images for every epoch; with 425 seen it would be (gcd(416, 425) = 1) only at 0 or 1.
    _, done = baseline
    accuracy = pd.read_csv(done / "outputs/history.csv")["train_accuracy"]
    assert ((accuracy > 0) & (accuracy < 1)).all()
    correct = accuracy * 416
    assert (correct - correct.round()).abs().max() < 1e-6, correct.tolist()


@pytest.mark.slow  # the default run keeps test_with_no_readable_checkpoint_left_training_starts_fresh
def test_an_unreadable_last_checkpoint_is_set_aside_and_training_resumes_from_best(baseline, tmp_path):
    """A truncated last.pt (a partial copy, a disk fault) must not block `dvc repro` forever: it is
    kept under another name, and training resumes from best.pt, here an older one (epoch 1 of a
    run that had logged epoch 2), so the retrained epoch 2 must not appear twice in MLflow."""
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "after_checkpoint:1"}, check=False)
    epoch1 = tmp_path / "epoch1.pt"
    shutil.copy(job_dir(project) / "last.pt", epoch1)
    run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "after_checkpoint:2"}, check=False)
    folder = job_dir(project)
    _, runs = runs_of(project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_accuracy")] == [1]
    run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "after_checkpoint:3"}, check=False)
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_accuracy")) == [1, 2]
    data = (folder / "last.pt").read_bytes()
    (folder / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    shutil.copy(epoch1, folder / "best.pt")  # the newest readable checkpoint is epoch 1's
    resumed = run(["dvc", "repro"], project).stdout
    aside = [p.name for p in folder.iterdir() if p.name.startswith("last.pt.unreadable-")]
    assert len(aside) == 1 and "set aside as" in resumed and aside[0] in resumed, resumed
    assert "not a readable checkpoint" in resumed and "best.pt (epoch 1) is the newest readable checkpoint" in resumed
    assert f"resuming from {folder.relative_to(project)}/best.pt: epoch 2, batch 0" in resumed
    assert_same_as_uninterrupted(project, done)


def test_with_no_readable_checkpoint_left_training_starts_fresh(tmp_path):
    from cifarpipe.training import checkpoint

    (tmp_path / "last.pt").write_bytes(b"\x80garbage")
    torch.save({"epoch": 1}, tmp_path / "best.pt")  # loads, but is no checkpoint of this pipeline
    resume, path, notes = checkpoint.resume_point(tmp_path)
    assert resume is None and path is None and "starts from the beginning" in notes[-1]
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["best.pt.unreadable", "last.pt.unreadable"]
    assert checkpoint.resume_point(tmp_path) == (None, None, [])  # nothing left to try: a plain fresh start


# The course's basic loop with a warm-up: SGD (Nesterov momentum), epochs 1-2 of 3 warming up from
# lr * 0.25. A kill inside the warm-up must resume to the bitwise same result, through the momentum
# buffers and the per-epoch warm-up rate.
WARMUP = {"train.optimizer.name": "sgd", "train.optimizer.lr": 0.01, "train.optimizer.nesterov": True,
          "train.scheduler.warmup_epochs": 2, "train.scheduler.warmup_start_factor": 0.25}


@pytest.fixture(scope="module")
def warmup_baseline(baseline, tmp_path_factory):
    seed, _ = baseline
    base = tmp_path_factory.mktemp("warmup")
    warm_seed = fresh_copy(seed, base / "seed")
    set_params(warm_seed, **WARMUP)
    git_commit(warm_seed, "SGD with warm-up")
    done = fresh_copy(warm_seed, base / "uninterrupted")
    run(["dvc", "repro"], done)
    return warm_seed, done


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_sgd_with_warmup_is_logged_and_a_kill_inside_the_warmup_resumes_exactly(warmup_baseline, tmp_path):
    seed, done = warmup_baseline
    client, (reference,) = runs_of(done)
    logged = reference.data.params
    assert (logged["train.optimizer.name"], logged["train.optimizer.momentum"], logged["train.optimizer.nesterov"],
            logged["train.scheduler.warmup_epochs"], logged["train.scheduler.warmup_start_factor"]) == \
        ("sgd", "0.9", "True", "2", "0.25")
    lrs = [m.value for m in sorted(client.get_metric_history(reference.info.run_id, "lr"), key=lambda m: m.step)]
    assert lrs == pytest.approx([0.0025, 0.00625, 0.01], rel=1e-12)  # per epoch: 0.25, 0.625, 1 x lr

    project = fresh_copy(seed, tmp_path / "p")
    killed = run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": "step:2:5"}, check=False)
    assert killed.returncode != 0
    assert (last_checkpoint(project)["epoch"], last_checkpoint(project)["step"]) == (1, 0)
    # Resumed at the start of warm-up epoch 2, then stopped inside it: a mid-epoch checkpoint in warm-up.
    stopped = run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "step:2:4:INT"}, check=False)
    assert stopped.returncode == 130 and "resuming from outputs/checkpoints/" in stopped.stdout
    assert (last_checkpoint(project)["epoch"], last_checkpoint(project)["step"]) == (1, 4)
    assert "epoch 2, batch 4" in run(["dvc", "repro"], project).stdout
    assert_same_as_uninterrupted(project, done)


def test_a_finished_job_run_again_for_a_new_experiment_is_recorded_in_a_run_of_its_own(baseline, tmp_path):
    """The train stage as `dvc exp run` runs it (DVC_EXP_NAME set), with a param outside the
    fingerprint changed, after the job finished: a new run named after the experiment, pointing to
    the run that trained the weights; the finished run is left as it was. (The same through
    `dvc exp run` and torchrun: the slow test below.)"""
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    run(stage_cmd(project, "train"), project)
    first = (project / "outputs/run_id.txt").read_text().strip()
    set_params(project, **{"train.log_every": 5})
    out = run(stage_cmd(project, "train"), project, env={"DVC_EXP_NAME": "every-5"}).stdout
    checkpoint = job_dir(project) / "last.pt"
    assert f"{checkpoint.relative_to(project)}: this job (the same params that shape training" in out
    assert f"finished in MLflow run {first}: nothing is trained now" in out and "training course_cnn" not in out
    new = (project / "outputs/run_id.txt").read_text().strip()
    client, runs = runs_of(project)
    r, old = client.get_run(new), client.get_run(first)
    assert new != first and (r.info.run_name, r.info.status, r.data.tags["reuses_run"]) == ("every-5", "FINISHED", first)
    assert (r.data.params["train.log_every"], old.data.params["train.log_every"]) == ("5", "0")
    assert [m.step for m in client.get_metric_history(new, "val_accuracy")] == list(range(1, EPOCHS + 1))
    assert old.info.status == "FINISHED" and "reuses_run" not in old.data.tags
    assert torch.load(checkpoint, weights_only=True)["mlflow_run_id"] == first
    # Run again as the same experiment with the same params: that run is the record, nothing new.
    again = run(stage_cmd(project, "train"), project, env={"DVC_EXP_NAME": "every-5"}).stdout
    assert f"recorded in MLflow run {new}, this execution's" in again and len(runs_of(project)[1]) == 2
    assert [m.step for m in client.get_metric_history(new, "val_accuracy")] == list(range(1, EPOCHS + 1))


@pytest.mark.slow  # 1.5 min on 2 shared cores; the test above covers the rule in the default run
def test_a_new_experiment_reusing_a_finished_job_gets_a_run_of_its_own(baseline, tmp_path):
    """`dvc exp run -S train.nproc_per_node=2` after a finished `dvc repro`: the params that shape
    training are the same, so the finished job's weights are reused, as a cache. The experiment once
    came back with the old 1-process run's record (its run id, its name, no dvc_experiment tag)."""
    seed, done = baseline
    project = fresh_copy(seed, tmp_path / "p")
    run(["dvc", "repro"], project)
    git_commit(project, "trained")
    first = (project / "outputs/run_id.txt").read_text().strip()
    out = run(["dvc", "exp", "run", "-n", "two-procs", "-S", "train.nproc_per_node=2"], project).stdout
    checkpoint = job_dir(project) / "last.pt"
    assert (f"{checkpoint.relative_to(project)}: this job (the same params that shape training, data and code) "
            f"finished in MLflow run {first}: nothing is trained now") in out
    new = (project / "outputs/run_id.txt").read_text().strip()
    assert new != first and f"recorded in MLflow run {new}, this execution's" in out
    client, runs = runs_of(project)
    r, old = client.get_run(new), client.get_run(first)
    assert (r.info.run_name, r.info.status, r.data.tags["dvc_experiment"]) == ("two-procs", "FINISHED", "two-procs")
    assert (r.data.tags["reuses_run"], r.data.tags["reuses_checkpoint"]) == (first, str(checkpoint.relative_to(project)))
    assert "No training ran in this run" in r.data.tags["mlflow.note.content"]
    assert (r.data.params["train.nproc_per_node"], old.data.params["train.nproc_per_node"]) == ("2", "1")
    assert r.data.metrics["test_accuracy"] == old.data.metrics["test_accuracy"]  # the same weights, evaluated
    for key in ("val_accuracy", "train_loss"):  # the reused job's curves, once each
        assert [(m.step, m.value) for m in sorted(client.get_metric_history(new, key), key=lambda m: m.step)] == \
            [(m.step, m.value) for m in sorted(client.get_metric_history(first, key), key=lambda m: m.step)]
    assert "reuses_run" not in old.data.tags and len(client.get_metric_history(first, "val_accuracy")) == EPOCHS
    assert torch.load(checkpoint, weights_only=True)["mlflow_run_id"] == first  # the checkpoint names who trained it
