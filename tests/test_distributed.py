"""Two training processes (torchrun + DDP, gloo on the CPU) through the real train stage: one MLflow
run, rank 0 alone writes, the same training as one process, and a checkpoint that resumes in any
number of processes."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import BIN, git_commit, make_project, run, serve_folder, set_params, stage_cmd
from test_resume import job_dir, runs_of

EPOCHS = 2


@pytest.fixture(scope="module")
def seed(tmp_path_factory, tiny_archive):
    """A project with the data stages done, and a 1-process training of it for reference."""
    base = tmp_path_factory.mktemp("ddp")
    with serve_folder(base / "www") as server:
        seed = make_project(base / "seed", *tiny_archive, server)
        # Batch 32: 13 steps per epoch on the 425 training images; 16 images per process with 2.
        set_params(seed, **{"train.epochs": EPOCHS, "tracking.system_metrics": False,
                            "tracking.registered_model": ""})
        run(["dvc", "repro", "split"], seed)
        git_commit(seed, "data stages done")
        one = base / "one-process"
        shutil.copytree(seed, one, symlinks=True)
        run(stage_cmd(one, "train"), one)
        yield seed, one


def copy_with(seed: Path, dest: Path, nproc: int) -> Path:
    shutil.copytree(seed, dest, symlinks=True)
    set_params(dest, **{"train.nproc_per_node": nproc})
    return dest


def history(project: Path) -> pd.DataFrame:
    return pd.read_csv(project / "outputs/history.csv").drop(columns=["epoch_seconds", "images_per_second"])


def test_two_processes_train_one_run_like_one_process(seed, tmp_path):
    seed_project, one = seed
    two = copy_with(seed_project, tmp_path / "two", 2)
    out = run(stage_cmd(two, "train"), two).stdout
    assert "torchrun --standalone --nproc_per_node=2" in out
    assert "16 in each of 2 processes" in out
    # Rank 0 alone prints, checkpoints and logs: each epoch once, one run, one job folder.
    for epoch in range(1, EPOCHS + 1):
        assert out.count(f"epoch {epoch:3d}/{EPOCHS}") == 1, out
    client, runs = runs_of(two)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.nproc_per_node"] == "2"
    for key in ("train_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, key)] == list(range(1, EPOCHS + 1))
    assert sorted(p.name for p in job_dir(two).iterdir()) == ["best.pt", "job.lock", "last.pt"]  # job.lock: rank 0's claim
    # The two processes together train on exactly the batches one process trains on: every
    # metric matches one process up to float rounding (both halves of each batch count, once).
    a, b = history(two), history(one)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-6)
    w2 = torch.load(two / "outputs/model.pt", weights_only=True)["state_dict"]
    w1 = torch.load(one / "outputs/model.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(w2[k], w1[k], rtol=1e-3, atol=1e-5) for k in w1)


@pytest.mark.slow  # the default run keeps two processes against one, and the resume tests
def test_a_checkpoint_resumes_across_world_sizes_in_the_same_run(seed, tmp_path):
    """Stopped in 2 processes by a SIGTERM that reaches one of them, resumed in 1 process and stopped
    again mid-epoch, finished in 2 (resuming mid-epoch): one MLflow run, every epoch logged once,
    and the training one process does alone."""
    seed_project, one = seed
    project = copy_with(seed_project, tmp_path / "p", 2)
    # Both workers freeze at step 4 and SIGTERM reaches rank 1 alone (torchrun's forwarded signal
    # lands at different steps): rank 0 must stop with it, at the next common check (step 10).
    def term_rank_1(agent: subprocess.Popen, workers: list[int]) -> None:
        rank1, = [w for w in workers if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{w}/environ").read_bytes()]
        os.kill(rank1, signal.SIGTERM)

    returncode, out = run_frozen(project, "step:1:4:STOP", term_rank_1)
    assert returncode == 143, out  # as one process: 128 + SIGTERM
    assert "stopped in epoch 1 after batch 10" in out and "Traceback" not in out
    ckpt = torch.load(job_dir(project) / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 10)
    assert ckpt["epoch_progress"]["seen"] == 10 * 32  # both processes' images, summed on rank 0
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    client, runs = runs_of(project)
    assert [r.info.status for r in runs] == ["KILLED"]

    set_params(project, **{"train.nproc_per_node": 1})
    stopped = run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "step:2:5:TERM"}, check=False)
    assert stopped.returncode == 143, stopped.stdout + stopped.stderr
    assert "resuming from" in stopped.stdout and "epoch 1, batch 10 of 13" in stopped.stdout

    set_params(project, **{"train.nproc_per_node": 2})
    done = run(stage_cmd(project, "train"), project)
    # Mid-epoch in 2 processes: rank 0 continues the checkpoint's sums, the other starts from zero.
    assert "epoch 2, batch 5 of 13, in 2 processes" in done.stdout
    assert (project / "outputs/run_id.txt").read_text().strip() == run_id
    client, runs = runs_of(project)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(history(project), history(one), check_exact=False, rtol=1e-4, atol=1e-6)


def _pid_namespaces() -> bool:
    """Whether this machine lets us make a PID namespace (root, or user namespaces allowed)."""
    try:
        return subprocess.run(["unshare", "-rfp", "--mount-proc", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _pid_namespaces(), reason="no PID namespace here (unshare -rfp refused)")
@pytest.mark.parametrize("pid_1", ["torchrun", pytest.param("stage", marks=pytest.mark.slow)])  # the same check
def test_two_processes_train_when_torchrun_or_the_stage_is_pid_1(seed, tmp_path, pid_1):
    """A container whose entrypoint is torchrun (or the stage): the workers' parent is PID 1, which
    the parent-death check once took for "torchrun died" (rank 1 exit 137, no message)."""
    seed_project, _ = seed
    project = copy_with(seed_project, tmp_path / "p", 2)
    cmd = stage_cmd(project, "train")
    if pid_1 == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *cmd[1:]]
    proc = run(["unshare", "-rfp", "--mount-proc", *cmd], project, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"epoch   {EPOCHS}/{EPOCHS}" in proc.stdout
    client, runs = runs_of(project)
    assert [(r.info.status, r.data.params["train.nproc_per_node"]) for r in runs] == [("FINISHED", "2")]


def stage_env(fault: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "CIFARPIPE_FAULT": fault}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def stopped_workers(agent: subprocess.Popen) -> list[int]:
    """The two workers under the stage's torchrun, once both have frozen themselves (SIGSTOP)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and agent.poll() is None:
        workers = _children(agent.pid)
        if len(workers) == 2 and all(Path(f"/proc/{w}/stat").read_text().split(")")[1].split()[0] == "T"
                                     for w in workers if Path(f"/proc/{w}/stat").exists()):
            return workers
        time.sleep(0.5)
    raise AssertionError("two stopped workers under torchrun")


def run_frozen(project: Path, fault: str, act) -> tuple[int, str]:
    """Run the train stage until both workers freeze themselves (`fault` ends in :STOP), call
    act(stage process, workers), let the workers go on; the stage's exit status and output."""
    agent = subprocess.Popen(stage_cmd(project, "train"), cwd=project, env=stage_env(fault),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers: list[int] = []
    try:
        workers = stopped_workers(agent)
        act(agent, workers)
        for w in workers:
            os.kill(w, signal.SIGCONT)
        out = agent.communicate(timeout=300)[0]  # reads while waiting: a full pipe would block the stage
        return agent.returncode, out
    finally:
        kill_tree(agent, workers)


def kill_tree(agent: subprocess.Popen, workers: list[int] = ()) -> None:
    """The stage and its workers, also workers that outlived it (a failed test leaves no frozen orphans)."""
    for pid in {agent.pid, *_children(agent.pid), *workers}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_kill_9_of_torchrun_takes_its_workers_down_and_the_rerun_finishes_the_same_run(seed, tmp_path):
    """torchrun starts each worker in a session of its own: without the parent-death signal a
    `kill -9` of torchrun would leave them training on as orphans beside the next run."""
    seed_project, _ = seed
    project = copy_with(seed_project, tmp_path / "p", 2)
    agent = subprocess.Popen(stage_cmd(project, "train"), cwd=project, env=stage_env("step:1:3:STOP"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # both freeze at step 3
    workers: list[int] = []
    try:
        workers = stopped_workers(agent)
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived torchrun"
    finally:
        kill_tree(agent, workers)
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    done = run(stage_cmd(project, "train"), project)
    assert "continuing MLflow run" in done.stdout
    client, runs = runs_of(project)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]


@pytest.mark.slow  # test_resume's SIGINT test covers the stop at a safe point in the default run
def test_sigterm_to_the_stage_stops_every_process_at_a_checkpoint_with_status_143(seed, tmp_path):
    """What `dvc` or a batch system does: SIGTERM to the stage's process (torchrun's), which forwards
    it to the workers; they checkpoint and the stage exits as one process would."""
    seed_project, _ = seed
    project = copy_with(seed_project, tmp_path / "p", 2)
    def term_stage(agent: subprocess.Popen, workers: list[int]) -> None:
        agent.send_signal(signal.SIGTERM)
        time.sleep(1)  # torchrun forwards SIGTERM to the frozen workers (delivered on SIGCONT)

    returncode, out = run_frozen(project, "step:1:3:STOP", term_stage)
    assert returncode == 143, out
    assert "Traceback" not in out
    # At the first common check after the signal: step 10 if it landed before SIGCONT, later otherwise.
    where = re.search(r"stopped in epoch (\d+) after batch (\d+)|stopped after epoch (\d+)", out)
    assert where, out
    ckpt = torch.load(job_dir(project) / "last.pt", weights_only=True)
    if where[1]:
        assert (ckpt["epoch"] + 1, ckpt["step"]) == (int(where[1]), int(where[2]))
    else:
        assert (ckpt["epoch"], ckpt["step"]) == (int(where[3]), 0)


def test_a_batch_that_does_not_split_evenly_is_refused_before_any_process_starts(seed, tmp_path):
    seed_project, _ = seed
    project = copy_with(seed_project, tmp_path / "p", 3)  # batch 32 over 3 processes
    proc = run(stage_cmd(project, "train"), project, check=False)
    assert proc.returncode == 2
    assert "train.batch_size = 32 does not split evenly over 3 processes" in proc.stderr
    assert "torchrun" not in proc.stdout


def test_an_error_in_a_process_ends_the_stage_with_its_status(seed, tmp_path):
    """A UserError on rank 0 (here: an unreachable store) exits 2 with its message, as one process does."""
    seed_project, _ = seed
    project = copy_with(seed_project, tmp_path / "p", 2)
    proc = run(stage_cmd(project, "train"), project, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: the MLflow tracking store http://127.0.0.1:9 is unreachable" in proc.stderr
