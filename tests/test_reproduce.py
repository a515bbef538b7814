"""Reproduce from a run: precise dirty-state tags, the refusals, and real reproductions of tiny runs
(`dvc repro`, `dvc exp run -S`) in a fresh worktree, compared value by value with the record."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, make_project, run, serve_folder, stage_cmd
from cifarpipe.commands import reproduce
from cifarpipe.commands.reproduction import check_reproducible, compare, format_differences, plan_params, record_notes
from cifarpipe.config import UserError, flatten_mapping
from cifarpipe.tracking import in_force, provenance
from cifarpipe.tracking.run import EPOCH_METRICS
from cifarpipe.tracking.runs import StoredRun

REPRODUCE = [sys.executable, "-m", "cifarpipe.commands.reproduce"]


def _snapshot(project: Path) -> dict:
    """What the reproduction must not touch: params.yaml, dvc.lock, every file under outputs/ and
    data/ (bytes), git's view of the workspace, its worktrees."""
    files = {p: p.read_bytes() for folder in ("outputs", "data") for p in sorted((project / folder).rglob("*"))
             if p.is_file() and not p.is_symlink()}
    files.update({p: p.read_bytes() for p in (project / "params.yaml", project / "dvc.lock")})
    return {"files": files, "status": run(["git", "status", "--porcelain"], project).stdout,
            "head": run(["git", "rev-parse", "HEAD"], project).stdout,
            "worktrees": run(["git", "worktree", "list"], project).stdout}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_archive):
    """A tiny project after `dvc repro` (2 epochs, 500 images), committed with its results, then
    reproduced once: (project, client, original run id, the reproduction's process, workspace
    snapshots before and after)."""
    root = tmp_path_factory.mktemp("reproduce")
    with serve_folder(root / "www") as server:
        project = make_project(root / "project", *tiny_archive, server)
        run(["dvc", "repro"], project)
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "results"], project)
        original = (project / "outputs/run_id.txt").read_text().strip()
        before = _snapshot(project)
        proc = run([*REPRODUCE, original], project, check=False)
        after = _snapshot(project)
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        yield project, client, original, proc, before, after


def test_a_run_is_reproduced_exactly_without_touching_the_workspace(trained):
    project, client, original, proc, before, after = trained
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reproduced exactly" in proc.stdout
    assert after == before  # params.yaml, dvc.lock, outputs, data, git status, worktrees
    worktree = Path(re.search(r"\(in (\S+)\)", proc.stdout).group(1))
    assert not worktree.exists() and worktree.parent != project and project not in worktree.parents
    new, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.reproduces = '{original}'")
    assert client.get_experiment(new.info.experiment_id).name == "cifar10-reproduce"
    assert new.data.tags["reproduction"] == "exact" and new.info.status == "FINISHED"
    assert new.data.tags["mlflow.source.git.commit"] == client.get_run(original).data.tags["mlflow.source.git.commit"]
    # the reproduction trained (its own epochs) and registered no model version
    assert len(client.get_metric_history(new.info.run_id, "val_accuracy")) == 2
    assert [v.run_id for v in client.search_model_versions("name = 'cifar10-classifier'")] == [original]


def test_a_tampered_record_is_reported_value_by_value(trained, tmp_path, monkeypatch, capsys):
    project, client, original, proc, before, after = trained
    new, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.reproduces = '{original}'")
    shutil.copy(project / "mlflow.db", tmp_path / "mlflow.db")  # tamper a copy: the other tests keep the record
    copy = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    recorded = {m.step: m.value for m in copy.get_metric_history(original, "val_loss")}
    copy.log_metric(original, "val_loss", recorded[2] + 0.001, step=2)  # a second value for epoch 2
    test_accuracy = copy.get_run(original).data.metrics["test_accuracy"]
    copy.log_metric(original, "test_accuracy", test_accuracy + 0.01)  # the latest value is the one compared
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(project)
    assert reproduce.main([original, "--compare-with", new.info.run_id]) == 1
    out = capsys.readouterr().out
    assert "NOT reproduced" in out and "in 2 value(s)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert sorted(rows) == ["test_accuracy", "val_loss"]
    assert rows["val_loss"][1] == "2" and rows["val_loss"][-1] == "-"  # two values recorded: no one difference
    assert repr(recorded[2]) in rows["val_loss"] and repr(recorded[2] + 0.001) in rows["val_loss"]
    assert rows["test_accuracy"][1:] == ["-", repr(test_accuracy + 0.01), repr(test_accuracy), "-0.01"]


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_a_run_with_uncommitted_code_is_refused_naming_the_files(trained, tmp_path):
    project, client, original, *_ = trained
    train_py = project / "stages/train.py"
    text = train_py.read_text()
    train_py.write_text(text + "# an uncommitted comment\n")
    try:
        # The train stage alone, its outputs redirected: the shared project's outputs stay as they are.
        cmd = [str(tmp_path / a[len("outputs/"):]) if a.startswith("outputs/") else a for a in stage_cmd(project, "train")]
        run(cmd, project)
    finally:
        train_py.write_text(text)
    dirty = (tmp_path / "run_id.txt").read_text().strip()
    tags = client.get_run(dirty).data.tags
    assert (tags["git_dirty"], tags["git_dirty_code"], tags["git_dirty_code_files"]) == ("true", "true", "stages/train.py")
    assert re.fullmatch(r"[0-9a-f]{12}", tags["git_diff_sha256"])
    assert "Uncommitted code changes when it ran" in tags["mlflow.note.content"]
    proc = run([*REPRODUCE, dirty], project, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"error: run {dirty} was trained with uncommitted code changes (stages/train.py; diff sha256 " \
           f"{tags['git_diff_sha256']})" in proc.stderr
    assert run(["git", "worktree", "list"], project).stdout.count("\n") == 1


def _fake_run(client: MlflowClient, original: str, *, tags: dict | None = None, params: dict | None = None,
              status: str = "FINISHED", test_accuracy: bool = True) -> str:
    """A run with `original`'s record, some of it changed: each refusal on a record made to fit it."""
    r = client.get_run(original)
    new = client.create_run(r.info.experiment_id, tags={**{k: v for k, v in r.data.tags.items()
                                                          if not k.startswith("mlflow.")},
                                                       "mlflow.source.git.commit": r.data.tags["mlflow.source.git.commit"],
                                                       **(tags or {})}).info.run_id
    for k, v in {**r.data.params, **(params or {})}.items():
        client.log_param(new, k, v)
    for k in EPOCH_METRICS:
        for m in client.get_metric_history(original, k):
            client.log_metric(new, k, m.value, step=m.step)
    if test_accuracy:
        client.log_metric(new, "test_accuracy", r.data.metrics["test_accuracy"])
    client.delete_tag(new, "git_dirty_code") if (tags or {}).get("git_dirty_code") == "DELETE" else None
    client.set_terminated(new, status)
    return new


@pytest.mark.parametrize("change, reason", [
    ({"tags": {"mlflow.source.git.commit": "0123456789abcdef0123456789abcdef01234567"}},
     "was trained at commit 0123456789abcdef0123456789abcdef01234567, which this repository does not have"),
    ({"tags": {"git_dirty": "true", "git_dirty_code": "DELETE"}}, "the record can't tell whether its code was commit"),
    ({"status": "KILLED"}, "did not finish (status KILLED)"),
    ({"test_accuracy": False}, "has no test_accuracy"),
    ({"tags": {"data_md5": "0" * 32}}, "record is inconsistent: tag data_md5 00000000000000000000000000000000"),
])
def test_records_that_cant_be_reproduced_are_refused_with_the_reason(trained, change, reason, monkeypatch):
    project, client, original, *_ = trained
    fake = _fake_run(client, original, **change)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.chdir(project)
    with pytest.raises(UserError) as e:
        reproduce.main([fake])
    assert reason in str(e.value)
    assert run(["git", "worktree", "list"], project).stdout.count("\n") == 1


def test_when_the_data_cant_be_had_the_pipeline_failure_says_so_and_the_worktree_goes(trained, tmp_path):
    """The run's md5 is not the workspace archive's, and its URL serves another archive: the
    download stage refuses, the command says so, and leaves no worktree behind."""
    project, client, original, *_ = trained
    fake = _fake_run(client, original, tags={"data_md5": "f" * 32}, params={"data.md5": "f" * 32})
    proc = run([*REPRODUCE, fake], project, check=False)
    assert proc.returncode == 2
    assert "is not the run's archive; the download stage fetches" in proc.stdout
    assert "the pipeline failed in the worktree" in proc.stderr and "checksum mismatch" in proc.stderr
    worktree = Path(re.search(r"\(in (\S+)\)", proc.stdout).group(1))
    assert not worktree.exists()
    assert run(["git", "worktree", "list"], project).stdout.count("\n") == 1


@pytest.mark.slow
def test_a_dvc_exp_run_is_reproduced_exactly(trained):
    project, client, *_ = trained
    run(["dvc", "exp", "run", "-S", "train.optimizer.lr=0.003"], project)
    exp_run = (project / "outputs/run_id.txt").read_text().strip()
    tags = client.get_run(exp_run).data.tags
    assert tags["git_dirty"] == "true" and tags["git_dirty_code"] == "false"
    assert "params.yaml" in tags["git_dirty_files"].split(", ")
    assert client.get_run(exp_run).data.params["train.optimizer.lr"] == "0.003"
    before = _snapshot(project)
    proc = run([*REPRODUCE, exp_run], project, check=False)
    assert proc.returncode == 0 and "reproduced exactly" in proc.stdout, proc.stdout + proc.stderr
    assert _snapshot(project) == before


# ------------------------------------------------------------ pure parts, no pipeline
def _run(**kw) -> StoredRun:
    base = dict(run_id="r1", experiment="e", status="FINISHED", params={"data.md5": "a" * 32, "train.seed": "1"},
                tags={"mlflow.source.git.commit": "c" * 40, "git_dirty": "true", "git_dirty_code": "false",
                      "data_md5": "a" * 32, "split_hash": "s"},
                metrics={"test_accuracy": 0.5, "test_loss": 1.0},
                histories={"val_accuracy": [(1, 0.1), (2, 0.2)], "lr": [(1, 1e-3), (2, 1e-3)]})
    base.update(kw)
    return StoredRun(**base)


def test_comparison_reports_every_differing_value_and_nothing_else():
    a = _run()
    assert compare(a, _run(run_id="r2")) == []
    b = _run(histories={"val_accuracy": [(1, 0.1), (2, 0.2000001)], "lr": [(1, 1e-3)],
                        "epoch_seconds": [(1, 9.0)]}, metrics={"test_accuracy": 0.5, "test_loss": 1.1},
             tags={**a.tags, "split_hash": "t"}, params={**a.params, "train.seed": "2"})
    got = {(d.name, d.epoch): d for d in compare(a, b)}
    assert sorted(got) == sorted([("val_accuracy", 2), ("lr", 2), ("test_loss", None), ("tag split_hash", None),
                                  ("param train.seed", None)])
    assert got[("val_accuracy", 2)].recorded == "0.2" and got[("val_accuracy", 2)].reproduced == "0.2000001"
    assert got[("lr", 2)].reproduced == "-"
    assert [d.name for d in compare(a, b, tolerance=1e-6, ignore_params=["train.seed"])] == ["lr", "test_loss", "tag split_hash"]
    nan = _run(histories={"val_accuracy": [(1, math.nan)]})
    assert compare(nan, nan) == [] and compare(nan, _run(histories={"val_accuracy": [(1, 0.1)]}))
    table = format_differences(compare(a, b))
    assert table.splitlines()[0].split() == ["metric", "epoch", "recorded", "reproduced", "difference"]


def test_params_that_are_not_the_pipelines_are_not_compared():
    """`mlflow run .` logs its entry point's parameters (epochs, batch_size '' ...) beside the
    pipeline's; an MLflow model logs its model_config (device). A reproduction by `dvc repro` has
    neither: that is no difference in what was trained."""
    entry_point = {"recipe": "fast", "epochs": "2", "batch_size": "", "lr": "", "model": "", "optimizer": "",
                   "seed": "", "device": "cpu"}
    a = _run(params={**_run().params, **entry_point})
    assert compare(a, _run(params={**_run().params, "recipe": "fast"})) == []
    assert [d.name for d in compare(a, _run())] == ["param recipe"]  # `recipe` is the pipeline's own key


def test_a_continued_runs_params_in_force_are_what_is_compared_and_reproduced():
    """A run resumed with evaluate.batch_size changed keeps its first value as a param (MLflow params
    are immutable) and records the change as a tag: its reproduction runs with, and compares, the
    value in force."""
    changed = _run(params={**_run().params, "evaluate.batch_size": "50"},
                   tags={**_run().tags, "param_changed.evaluate.batch_size": "50 -> 25"})
    assert changed.params_in_force["evaluate.batch_size"] == "25"
    assert compare(changed, _run(params={**_run().params, "evaluate.batch_size": "25"})) == []
    assert [d.name for d in compare(changed, _run(params={**_run().params, "evaluate.batch_size": "50"}))] == [
        "param evaluate.batch_size"]
    assert "continued with params changed (evaluate.batch_size 50 -> 25)" in record_notes(changed)[0]
    assert in_force.change_tags({"a": "1", "b": "2"}, {"param_changed.b": "2 -> 3"}, {"a": "5", "b": "2", "c": "9"}) == (
        {"param_changed.a": "1 -> 5"}, ["param_changed.b"])  # b back to its logged value: the tag goes


def test_only_uncommitted_code_and_unknown_records_are_refused_before_git_is_asked():
    assert check_reproducible(_run(), lambda c: True) == "c" * 40
    exp = _run(tags={**_run().tags, "dvc_baseline_rev": "d" * 40})
    assert check_reproducible(exp, lambda c: c == "d" * 40) == "d" * 40
    for tags, reason in [({"git_dirty_code": "true", "git_dirty_files": "src/x.py"}, "uncommitted code changes (src/x.py)"),
                         ({"mlflow.source.git.commit": "unknown"}, "records no git commit"),
                         # a nested "-eval-" run has no commit tags of its own: that is not why it is refused
                         ({"mlflow.source.git.commit": "", "evaluation_of": "t1"},
                          "is an evaluation of run t1's model with other evaluate params, not a training: "
                          "reproduce the training run (cifarpipe-reproduce t1)")]:
        with pytest.raises(UserError, match=re.escape(reason)):
            check_reproducible(_run(tags={**_run().tags, **tags}), lambda c: True)


def test_params_plan_writes_logged_values_and_keeps_a_recipe_only_if_it_agrees():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    logged = {k: str(v) for k, v in flatten_mapping(committed).items()}
    logged.update({"recipe": "fast", "train.batch_size": "512", "train.optimizer.lr": "0.003",
                   "train.optimizer.betas": "[0.9, 0.99]", "train.amp": "False"})
    plan = plan_params(committed, logged, "cifar10-reproduce", {"train.batch_size": 512})
    assert plan.raw["recipe"] == "fast" and plan.raw["train"]["batch_size"] == 512
    assert plan.raw["train"]["optimizer"]["lr"] == 0.003 and plan.raw["train"]["optimizer"]["betas"] == [0.9, 0.99]
    assert plan.raw["train"]["amp"] is False and plan.raw["tracking"]["registered_model"] == ""
    assert plan.raw["tracking"]["experiment"] == "cifar10-reproduce" and plan.notes == ()
    other = plan_params(committed, logged, "x", {"train.batch_size": 256})  # the recipe changed since
    assert other.raw["recipe"] == "course" and "recipe" in other.set_on_purpose and other.notes
    assert other.raw["train"]["batch_size"] == 512
    with pytest.raises(UserError, match="logged no value for train.epochs"):
        plan_params(committed, {k: v for k, v in logged.items() if k != "train.epochs"}, "x", {})


def test_git_state_tells_params_and_outputs_from_code(tmp_path, monkeypatch):
    for rel in ("dvc.yaml", "params.yaml", "stages/train.py", "src/cifarpipe/training/engine.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs/metrics.json").write_text("{}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "c"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    state = provenance.read_git_state().tags()
    assert state["git_dirty"] == "false" and state["git_dirty_code"] == "false"
    for rel in ("params.yaml", "dvc.lock", "outputs/metrics.json"):  # what `dvc exp run` changes
        (tmp_path / rel).write_text((tmp_path / rel).read_text() + "\n# changed\n")
    git = provenance.read_git_state()
    state = git.tags()
    assert (state["git_dirty"], state["git_dirty_code"]) == ("true", "false") and "git_diff_sha256" not in state
    assert state["git_dirty_files"] == "dvc.lock, outputs/metrics.json, params.yaml"
    assert git.code == ()
    (tmp_path / "src/cifarpipe/training/engine.py").write_text("# changed\n")
    git = provenance.read_git_state()
    state = git.tags()
    assert state["git_dirty_code"] == "true" and state["git_dirty_code_files"] == "src/cifarpipe/training/engine.py"
    assert state["git_dirty_files"] == "dvc.lock, outputs/metrics.json, params.yaml, src/cifarpipe/training/engine.py"
    assert git.code == ("src/cifarpipe/training/engine.py",)
    first = state["git_diff_sha256"]
    (tmp_path / "src/cifarpipe/training/engine.py").write_text("# changed otherwise\n")
    assert provenance.read_git_state().tags()["git_diff_sha256"] != first
    assert len(provenance._file_list([f"src/file_{i}.py" for i in range(500)])) <= 1000
    assert provenance._file_list(["a", "b"]) == "a, b"
