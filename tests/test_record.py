"""One record across DVC and MLflow: run names, source/user tags, the reproduce note, dataset inputs,
system metrics and registered model versions, from two real `dvc exp run` in a project copy."""
from __future__ import annotations

import json
import shutil
import subprocess

import mlflow
import pytest
import numpy as np
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, make_project, run, serve_folder
from cifarpipe.tracking import datasets, model, provenance, record, registry
from cifarpipe.config import UserError, load_params, parse_params

MODEL = "cifar10-classifier"  # params.yaml's tracking.registered_model


@pytest.fixture(scope="module")
def exps(tmp_path_factory, tiny_archive):
    """Two experiments in one project: `-n lr-3e-3` with system metrics (sampled every 0.2 s, so a
    few-second training gets samples), and an unnamed one with system metrics switched off."""
    root = tmp_path_factory.mktemp("record")
    with serve_folder(root / "www") as server:
        project = make_project(root / "project", *tiny_archive, server)
        fast = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
        run(["dvc", "exp", "run", "-n", "lr-3e-3", "-S", "train.optimizer.lr=0.003"], project, env=fast)
        run(["dvc", "exp", "run", "-S", "train.batch_size=16", "-S", "tracking.system_metrics=false"], project, env=fast)
    names = run(["dvc", "exp", "list", "--name-only"], project).stdout.split()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    return project, names, client, runs


def test_mlflow_runs_are_named_after_the_dvc_experiments(exps):
    project, names, client, runs = exps
    assert len(names) == 2 and "lr-3e-3" in names
    assert sorted(runs) == sorted(names)  # the unnamed experiment's generated name too
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    for name, r in runs.items():
        tags = r.data.tags
        assert tags["dvc_experiment"] == name and tags["dvc_baseline_rev"] == head
        # what the UI's Source and Created-by columns show
        assert tags["mlflow.source.name"] == "dvc exp run" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"]
        note = tags["mlflow.note.content"]
        assert f"git checkout {head}" in note and f"dvc exp apply {name}" in note
    assert "dvc exp run -S train.optimizer.lr=0.003\n" in runs["lr-3e-3"].data.tags["mlflow.note.content"]


def test_dataset_inputs_name_the_data_and_its_parts(exps):
    project, names, client, runs = exps
    params = load_params(project / "params.yaml")
    split_hash = (project / "data/split_hash.txt").read_text().strip()
    digests = []
    for r in runs.values():
        inputs = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
        assert sorted(inputs) == ["test", "training", "validation"]
        for context, ds in inputs.items():
            assert ds.name == "cifar10" and ds.source_type == "http"
            assert json.loads(ds.source)["url"] == params.data.url
            profile = json.loads(ds.profile)
            assert profile["archive_md5"] == params.data.md5 and profile["part"] == context
            assert profile.get("split_hash") == (None if context == "test" else split_hash)
        assert {c: json.loads(d.profile)["num_images"] for c, d in inputs.items()} == \
            {"training": 425, "validation": 75, "test": 100}
        digests.append({c: d.digest for c, d in inputs.items()})
    assert digests[0] == digests[1] and len(set(digests[0].values())) == 3  # same data, three parts


def test_digests_tell_different_data_apart():
    def digest(context, md5="a" * 32, split_hash="s1"):
        return datasets.dataset_input(context, "https://example.org/c.tgz", md5, 10,
                                      None if context == "test" else split_hash).dataset.digest

    assert digest("training") != digest("training", md5="b" * 32)
    assert digest("training") != digest("training", split_hash="s2")
    assert digest("validation") != digest("validation", split_hash="s2")
    assert digest("test") != digest("test", md5="b" * 32)
    local = datasets.dataset_input("test", "/data/cifar-10-python.tar.gz", "a" * 32, 10).dataset
    assert local.source_type == "local"


def test_system_metrics_are_logged_when_on_and_absent_when_off(exps):
    project, names, client, runs = exps
    on = runs["lr-3e-3"].data.metrics
    off, = (r.data.metrics for n, r in runs.items() if n != "lr-3e-3")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/disk_usage_percentage"} <= on.keys()
    assert not [k for k in off if k.startswith("system/")]
    assert "train_loss" in off


def test_each_run_registers_a_version_tagged_with_its_test_accuracy(exps, monkeypatch):
    project, names, client, runs = exps
    versions = {mv.run_id: mv for mv in client.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(versions) == sorted(r.info.run_id for r in runs.values())
    for r in runs.values():
        mv = versions[r.info.run_id]
        assert float(mv.tags["test_accuracy"]) == pytest.approx(r.data.metrics["test_accuracy"], abs=1e-4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{max(int(v.version) for v in versions.values())}")
    assert len(model.predict(np.zeros((3, 32, 32, 3), np.uint8))["class"]) == 3
    # Registering is once per run: a second finalization returns the same version.
    r = runs["lr-3e-3"]
    assert registry.register_model_version(client, MODEL, r.info.run_id, versions[r.info.run_id].source) == \
        versions[r.info.run_id].version
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2


def test_a_registered_model_name_with_quotes_registers_and_gets_its_test_accuracy(exps, capsys, monkeypatch):
    """MLflow allows quotes in registered model names; a name such as "Bob's model" inside a search
    filter broke its syntax: every registration failed with a warning and the stages succeeded."""
    project, names, client, runs = exps
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")  # as in the stages
    r = runs["lr-3e-3"]
    uri = model.logged_model_uri(client, r.info.run_id)
    name = "Bob's \"best\" model"
    parse_params({**yaml.safe_load((REPO / "params.yaml").read_text()),
                  "tracking": {**yaml.safe_load((REPO / "params.yaml").read_text())["tracking"], "registered_model": name}})
    version = registry.register_model_version(client, name, r.info.run_id, uri)
    again = registry.register_model_version(client, name, r.info.run_id, uri)  # once per run: the same version
    assert str(version) == str(again) == "1"
    assert [str(v) for v in registry.tag_model_versions(client, name, r.info.run_id, {"test_accuracy": 0.5})] == ["1"]
    assert client.get_model_version(name, "1").tags["test_accuracy"] == "0.5"
    assert "warning" not in capsys.readouterr().err


def _git_repo_with_params(tmp_path, **changes):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "params"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(tmp_path / "params.yaml")


def test_outside_an_experiment_the_name_says_model_and_changed_params(tmp_path, monkeypatch):
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    params = _git_repo_with_params(tmp_path, **{"train.optimizer.lr": 0.003, "train.batch_size": 128})
    rec = record.run_record(params, provenance.read_git_state())
    assert rec.name == "course_cnn batch_size=128 lr=0.003"
    assert "dvc_experiment" not in rec.tags and rec.tags["mlflow.source.name"] == "stages/train.py"
    note = rec.tags["mlflow.note.content"]
    assert "dvc exp run -S train.batch_size=128 -S train.optimizer.lr=0.003" in note and "git checkout " in note
    assert "Uncommitted" not in note  # params.yaml is the diff, not an uncommitted change to warn about

    monkeypatch.setenv("DVC_STAGE", "train")
    assert record.run_record(params, provenance.read_git_state()).tags["mlflow.source.name"] == "dvc repro"
    same = load_params(REPO / "params.yaml")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert record.run_record(same, provenance.read_git_state()).name == "course_cnn"


def test_descriptive_names_stay_short_and_readable():
    name = record.descriptive_name
    assert name("cifar_resnet", {"model.name": "cifar_resnet", "model.width": 32}) == "cifar_resnet width=32"
    # two changed keys with the same last part are told apart
    assert name("course_cnn", {"train.batch_size": 128, "evaluate.batch_size": 500}) == \
        "course_cnn train.batch_size=128 evaluate.batch_size=500"
    assert name("course_cnn", {"train.augment.flip": False, "train.optimizer.betas": [0.9, 0.99]}) == \
        "course_cnn flip=false betas=[0.9,0.99]"
    long = name("course_cnn", {f"train.k{i}": 0.000123 for i in range(10)})
    assert len(long) <= 60 and long.endswith(" +7") and long.startswith("course_cnn k0=0.000123")
    assert record.changed_params({"a": 1, "b": 2, "c": 3}, None) == {}
    assert record.changed_params({"a": 1, "b": 2, "new": 3}, {"a": 1, "b": 1}) == {"b": 2}


def test_a_run_created_by_mlflow_run_gets_the_experiment_name_and_keeps_its_source(tmp_path, monkeypatch):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("cifar10")
    created = client.create_run(exp, tags={"mlflow.source.type": "PROJECT", "mlflow.source.name": "file:///repo",
                                           "mlflow.user": "alice"})
    rec = record.RunRecord("lr-3e-3", {"mlflow.source.name": "dvc exp run", "mlflow.source.type": "LOCAL",
                                         "mlflow.user": "bob", "dvc_experiment": "lr-3e-3",
                                         "mlflow.note.content": "dvc exp apply lr-3e-3"})
    record.log_record(client, created.info.run_id, rec)
    r = client.get_run(created.info.run_id)
    assert r.info.run_name == "lr-3e-3" and r.data.tags["dvc_experiment"] == "lr-3e-3"
    assert (r.data.tags["mlflow.source.type"], r.data.tags["mlflow.source.name"], r.data.tags["mlflow.user"]) == \
        ("PROJECT", "file:///repo", "alice")
    assert r.data.tags["mlflow.note.content"] == "dvc exp apply lr-3e-3"


@pytest.mark.parametrize("bad, message", [
    ("a/b", "tracking.registered_model = 'a/b': a registered model name cannot contain '/'"),
    ("models:x", "tracking.registered_model = 'models:x': a registered model name cannot contain ':'"),
    ("..", "tracking.registered_model = '..': not a usable registered model name"),
    ("   ", "tracking.registered_model = '   ': not a usable registered model name"),
    ("x" * 257, "at most 256 characters"),
])
def test_bad_registered_model_names_are_rejected_naming_the_key(bad, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"]["registered_model"] = bad
    with pytest.raises(UserError) as e:
        parse_params(raw)
    assert message in str(e.value)
    raw["tracking"]["registered_model"] = ""  # off
    assert parse_params(raw).tracking.registered_model == ""


def test_a_baseline_from_before_a_schema_change_still_gives_the_diff(tmp_path, monkeypatch):
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["tracking"]["registered_model"]  # as committed before the key existed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "old"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    params = load_params(REPO / "params.yaml").model_copy(update={"model": parse_params(
        {**raw, "model": {**raw["model"], "width": 32}, "tracking": {**raw["tracking"], "registered_model": ""}}).model})
    assert record.run_record(params, provenance.read_git_state()).name == "course_cnn width=32"


def test_outside_git_the_description_gives_no_git_commands():
    """Seen on the GPU machine (no git there): 'git checkout unknown' is no way to reproduce a run."""
    note = record.reproduce_note("unknown", None, {"train.epochs": 3}, [])
    assert "git checkout unknown" not in note and "outside a git checkout" in note
    assert "git checkout abc123" in record.reproduce_note("abc123", None, {}, [])
