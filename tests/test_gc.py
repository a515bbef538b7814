"""cifarpipe-gc on a real tiny project: finished jobs' checkpoint folders and FINISHED runs' last.pt
artifacts go; unfinished jobs, jobs in use, jobs whose run is RUNNING and jobs a commit still needs
stay; a dry run changes nothing; the printed `mlflow gc` command works."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conftest import BIN, git_commit, run, set_params

GC = [sys.executable, "-m", "cifarpipe.commands.gc"]


def folder_of(project: Path, run_id: str) -> Path:
    for d in (project / "outputs/checkpoints").iterdir():
        if torch.load(d / "last.pt", weights_only=True)["mlflow_run_id"] == run_id:
            return d
    raise AssertionError(f"no checkpoint folder of run {run_id}")


def files(project: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for folder in ("outputs", "mlruns") for p in (project / folder).rglob("*")}


def train_killed(project: Path, lr: float, fault: str) -> str:
    set_params(project, **{"train.optimizer.lr": lr})
    run(["dvc", "repro", "train"], project, env={"CIFARPIPE_FAULT": fault}, check=False)
    return (project / "outputs/run_id.txt").read_text().strip()


def checkpoint_models(client: MlflowClient, run_id: str) -> list[str]:
    """Two checkpoints logged as LoggedModels (model_type checkpoint), val_accuracy 0.5 and 0.7."""
    exp = client.get_run(run_id).info.experiment_id
    ids = []
    for step, acc in ((1, 0.5), (2, 0.7)):
        m = client.create_logged_model(exp, name=f"checkpoint-{step}", source_run_id=run_id, model_type="checkpoint")
        path = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")).parent / f"ckpt{step}.bin"
        path.write_bytes(os.urandom(50_000))
        client.log_model_artifact(m.model_id, str(path))
        client.log_batch(run_id, metrics=[Metric("val_accuracy", acc, int(time.time() * 1000), step, model_id=m.model_id)])
        client.finalize_logged_model(m.model_id, "READY")
        ids.append(m.model_id)
    return ids


def holding_a_file(client: MlflowClient, run_id: str) -> list:
    """The run's active checkpoint models that still hold a file."""
    return [m for m in client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                                   filter_string=f"source_run_id = '{run_id}' AND model_type = 'checkpoint'")
            if list(client.list_logged_model_artifacts(m.model_id))]


def test_gc_removes_only_what_no_job_run_or_commit_needs(project):
    set_params(project, **{"train.epochs": 2})
    run(["dvc", "repro"], project)
    git_commit(project, "job a")
    run_a = (project / "outputs/run_id.txt").read_text().strip()
    run(["dvc", "exp", "run", "-n", "b", "-S", "train.optimizer.lr=0.003"], project)
    run_b = (project / "outputs/run_id.txt").read_text().strip()
    run_c = train_killed(project, 0.005, "after_checkpoint:1")  # unfinished: resumable
    run_d = train_killed(project, 0.007, "finish:2")  # complete checkpoint, run still RUNNING (c's: KILLED now)
    run(["git", "checkout", "params.yaml", "dvc.lock", "outputs"], project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [client.get_run(r).info.status for r in (run_a, run_b, run_c, run_d)] == [
        "FINISHED", "FINISHED", "KILLED", "RUNNING"]
    folders = {name: folder_of(project, r) for name, r in zip("abcd", (run_a, run_b, run_c, run_d))}
    # Commit "job a"'s model gone from the DVC cache: its checkpoint is what rebuilds its outputs
    md5 = next(o["md5"] for o in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["outs"]
               if o["path"] == "outputs/model.pt")
    (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()
    (project / "outputs/model.pt").unlink()
    (folders["b"] / "notes.txt").write_text("mine")
    low, best = checkpoint_models(client, run_b)
    assert len(holding_a_file(client, run_b)) >= 3  # the two above and the real best/last epoch's

    holder = subprocess.Popen([sys.executable, "-c", "import time; from cifarpipe.training import checkpoint; "
                               f"checkpoint.claim({str(folders['b'])!r}); print('claimed', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "claimed"
    before = files(project)
    dry = run(GC, project).stdout
    holder.kill()
    holder.wait()
    assert files(project) == before  # a dry run changes nothing
    assert f"{folders['b'].name}" in dry and "in use: a process is training this job now" in dry, dry

    out = run(GC + ["--delete"], project).stdout
    lines = {f: next(line for line in out.splitlines() if folder.name in line) for f, folder in folders.items()}
    assert "needs it: its model is not in the DVC cache" in lines["a"] and "commit" in lines["a"], out
    assert "delete: finished" in lines["b"], out
    assert "unfinished job (epoch 1" in lines["c"] and "is RUNNING" in lines["d"], out
    assert sorted(p.name for p in folders["b"].iterdir()) == ["notes.txt"]  # not ours: kept
    for name in "acd":
        assert (folders[name] / "last.pt").is_file()
    assert "deleted: checkpoint folders" in out and "freed" in out

    def val(m) -> float:
        return max(x.value for x in m.metrics if x.key == "val_accuracy")
    # FINISHED: one file left per run, the best validation accuracy's (b had the two above besides its epochs')
    for r in (run_a, run_b):
        [kept] = holding_a_file(client, r)
        assert val(kept) == max(val(m) for m in client.search_logged_models(
            [client.get_run(r).info.experiment_id], filter_string=f"source_run_id = '{r}' AND model_type = 'checkpoint'"))
    assert low not in {m.model_id for m in client.search_logged_models([client.get_run(run_b).info.experiment_id])}
    listed = [line for line in out.splitlines() if line.strip().startswith("run ")]  # the store's items
    assert run_b[:8] in {line.split()[1] for line in listed} <= {run_a[:8], run_b[:8]}  # FINISHED only, never c, d

    [command] = [line.strip() for line in out.splitlines() if "mlflow gc --backend-store-uri" in line]
    assert "dvc gc --workspace --all-commits --all-experiments --dry" in out
    env_part, *args = shlex.split(command)
    key, value = env_part.split("=", 1)
    low_dir = Path(client.get_run(run_b).info.artifact_uri.removeprefix("file://")).parents[1] / "models" / low
    assert low_dir.is_dir()
    subprocess.run(args, cwd=project, env={**os.environ, key: value, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                   check=True, capture_output=True)
    assert not (low_dir / "artifacts").exists()  # the soft-deleted checkpoint model's files, gone for good


@pytest.mark.slow  # the default run keeps the main gc test above
def test_gc_keeps_a_job_that_only_a_run_reusing_its_weights_needs(project):
    """`dvc exp run -S evaluate.weights=last` on a finished job trains nothing and records itself in
    a run of its own (tag reuses_run); the commit of that state names that run, not the job's."""
    run(["dvc", "repro"], project)
    trained = (project / "outputs/run_id.txt").read_text().strip()
    run(["dvc", "exp", "run", "-n", "last", "-S", "evaluate.weights=last"], project)
    reusing = (project / "outputs/run_id.txt").read_text().strip()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert reusing != trained and client.get_run(reusing).data.tags["reuses_run"] == trained
    git_commit(project, "weights last")
    md5 = next(o["md5"] for o in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["outs"]
               if o["path"] == "outputs/model.pt")
    (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()  # only the checkpoint rebuilds it
    (project / "outputs/model.pt").unlink()
    folder = folder_of(project, trained)
    out = run(GC + ["--delete"], project).stdout
    [line] = [line for line in out.splitlines() if folder.name in line]
    assert "keep:" in line and "needs it: its model is not in the DVC cache" in line, out
    assert (folder / "last.pt").is_file()
