"""Named recipes (recipes/<name>.yaml, selected by params.yaml's `recipe` key): validated, applied
on load, seen by DVC, printed by train and logged to MLflow as the values in force."""
from __future__ import annotations

import ast
import json
import re
import shutil
import sys

from mlflow.tracking import MlflowClient
import pytest
import yaml

from cifarpipe.config import OptimizerParams, UserError, flatten, load_params
from conftest import REPO, git_commit, run, set_params, stage_cmd

BENCH = REPO / "benchmarks" / "bench.py"


def _copy(dest, recipes: dict[str, str] | None = None):
    """params.yaml and recipes/ in `dest`, plus these recipes; the path of params.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", dest / "params.yaml")
    shutil.copytree(REPO / "recipes", dest / "recipes")
    for name, text in (recipes or {}).items():
        (dest / "recipes" / f"{name}.yaml").write_text(text)
    return dest / "params.yaml"


def test_an_unknown_recipe_names_the_valid_ones(tmp_path):
    path = _copy(tmp_path)
    path.write_text(path.read_text().replace("\nrecipe: course", "\nrecipe: fastest"))
    with pytest.raises(UserError) as e:
        load_params(path)
    assert str(e.value).startswith(f"{path}: recipe = 'fastest': no such recipe; valid: air, course, fast, gpu, sgd")
    with pytest.raises(UserError, match="valid: air, course, fast, gpu, sgd"):  # a name, never a path
        load_params(REPO / "params.yaml", recipe="../params")


def test_a_recipe_sets_only_keys_params_yaml_has_in_its_own_sections(tmp_path):
    path = _copy(tmp_path, {"typo": "train: {optimizer: {lrr: 0.1}}", "data": "data: {retries: 5}",
                            "bad": "train: {batch_size: 0}"})
    with pytest.raises(UserError, match=r"^recipes/typo.yaml: unknown key 'train.optimizer.lrr'"):
        load_params(path, recipe="typo")
    with pytest.raises(UserError, match=r"^recipes/data.yaml: a recipe is a mapping of the sections model, train, evaluate"):
        load_params(path, recipe="data")
    with pytest.raises(UserError, match=r"^recipes/bad.yaml: train.batch_size = 0: "):
        load_params(path, recipe="bad")


def test_the_recipes_hold_the_measured_values():
    base = flatten(load_params(REPO / "params.yaml", recipe="course"))
    assert base == flatten(load_params(REPO / "params.yaml"))  # the default: params.yaml unchanged
    assert base["recipe"] == "course"
    # fast: the course CNN's fast CPU recipe (benchmarks/bench.py trains this file as its fast recipe)
    fast = flatten(load_params(REPO / "params.yaml", recipe="fast"))
    assert {k: v for k, v in fast.items() if base[k] != v} == {
        "recipe": "fast", "train.batch_size": 256, "train.optimizer.lr": 0.004, "train.scheduler.patience": 0,
        "train.augment.crop_padding": 0, "train.label_smoothing": 0.1}
    # gpu: the command measured on an NVIDIA H200 (90.2 % test accuracy in 28.7 s of training)
    gpu = flatten(load_params(REPO / "params.yaml", recipe="gpu"))
    assert {k: v for k, v in gpu.items() if base[k] != v} == {
        "recipe": "gpu", "model.name": "cifar_resnet", "model.width": 128, "train.batch_size": 512,
        "train.epochs": 30, "train.optimizer.lr": 0.002, "train.scheduler.patience": 1,
        "train.label_smoothing": 0.1, "evaluate.tta_flip": True}
    # air: airbench94's kind of training (docs/9-gpu-recipe.md); the course's keys it leaves alone stay
    air = flatten(load_params(REPO / "params.yaml", recipe="air"))
    changed = {k: v for k, v in air.items() if base[k] != v}
    assert changed["model.name"] == "airnet" and changed["model.tta"] == "flip_translate"
    assert (changed["train.optimizer.name"], changed["train.scheduler.name"], changed["train.batch_size"],
            changed["train.epochs"]) == ("sgd", "linear", 1024, 16)
    assert air["evaluate.tta_flip"] is False and air["split.val_fraction"] == 0.15


@pytest.mark.skipif("name" not in OptimizerParams.model_fields,
                    reason="enable at merge: needs train.optimizer.name / train.scheduler.name (the optim branch)")
def test_the_sgd_recipe_is_the_courses_basic_loop():
    p = load_params(REPO / "params.yaml", recipe="sgd")
    assert (p.train.optimizer.name, p.train.optimizer.momentum, p.train.optimizer.lr) == ("sgd", 0.9, 0.001)
    assert p.train.scheduler.name == "none"


def _runs(project):
    # A client of its own: mlflow.set_tracking_uri() here would outlive the test and send later
    # tests' fluent calls (MLflow's log_model, pyfunc.load_model) to this project's store.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return sorted(client.search_runs([client.get_experiment_by_name("cifar10").experiment_id]),
                  key=lambda r: r.info.start_time)


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
def test_one_flag_selects_a_recipe_in_dvc_exp_run_and_mlflow_logs_its_values(project):
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    proc = run(["dvc", "exp", "run", "-S", "recipe=fast"], project)
    # the stage prints what the recipe changed (params.yaml of the test copy has batch 32)
    assert "recipe fast: train.batch_size 32 -> 256, train.augment.crop_padding 4 -> 0" in proc.stdout
    # back to the course's recipe: only params.yaml's `recipe` key changes, and DVC must rerun train
    run(["dvc", "exp", "run", "-S", "recipe=course"], project)
    fast, course = _runs(project)
    assert fast.info.status == course.info.status == "FINISHED"
    assert fast.data.params["recipe"] == "fast"
    recipe = flatten(load_params(REPO / "params.yaml", recipe="fast"))  # the values recipes/fast.yaml sets
    for key in ("train.batch_size", "train.optimizer.lr", "train.scheduler.patience", "train.augment.crop_padding",
                "train.label_smoothing"):
        assert fast.data.params[key] == str(recipe[key]), key
    assert (course.data.params["recipe"], course.data.params["train.batch_size"]) == ("course", "32")
    # two jobs, two fingerprints: the checkpoint folders follow the values in force
    assert fast.data.tags["fingerprint"] != course.data.tags["fingerprint"]
    shown = run(["dvc", "exp", "show", "--json"], project).stdout
    assert '"recipe": "fast"' in shown


def test_the_train_stage_gives_dvc_the_values_in_force(project):
    """What DVC compares comes from files: params.yaml says batch 32 and lr 0.001 under recipe fast,
    which trains batch 256 and lr 0.004. The train stage's outputs/params_in_force.yaml is a params
    file of evaluate in dvc.yaml, so `dvc params diff` and `dvc exp show` list the values in force.
    (Through two real `dvc exp run`: the slow test below.)"""
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    set_params(project, **{"recipe": "fast", "train.epochs": 1})
    run(stage_cmd(project, "train"), project)
    in_force = yaml.safe_load((project / "outputs/params_in_force.yaml").read_text())
    assert (in_force["recipe"], in_force["train"]["batch_size"], in_force["train"]["optimizer"]["lr"]) == ("fast", 256, 0.004)
    assert in_force == {k: v for k, v in yaml.safe_load(yaml.safe_dump(
        load_params(project / "params.yaml").model_dump(mode="json"))).items() if k in in_force}
    diff = run(["dvc", "params", "diff", "--all"], project).stdout  # HEAD (no training yet) vs the workspace
    assert re.search(r"outputs/params_in_force.yaml\s+train.batch_size\s+-\s+256", diff), diff
    assert re.search(r"params.yaml\s+train.batch_size\s+32\s+32", diff), diff
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    workspace = next(row for row in shown if row["rev"] == "workspace")["data"]["params"]
    assert workspace["outputs/params_in_force.yaml"]["data"]["train"]["optimizer"]["lr"] == 0.004


@pytest.mark.slow  # 1.5 min on 2 shared cores; the test above covers it in the default run
def test_dvc_shows_the_values_in_force_of_every_experiment(project):
    """`dvc exp run -n fastexp -S recipe=fast`, then `dvc exp run -n e3 -S train.epochs=2` (in the
    workspace fastexp left, so the fast recipe again): both trained batch 256 and lr 0.004, but DVC
    listed params.yaml's 32 and 0.001 only. outputs/params_in_force.yaml, a params file of evaluate,
    gives DVC the values that trained."""
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    run(["dvc", "exp", "run", "-n", "fastexp", "-S", "recipe=fast", "-S", "train.epochs=1"], project)
    run(["dvc", "exp", "run", "-n", "e3", "-S", "train.epochs=2"], project)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    exps = {e["name"]: e["revs"][0]["data"]["params"] for row in shown for e in row.get("experiments") or []}
    for name, epochs in (("fastexp", 1), ("e3", 2)):
        own, in_force = exps[name]["params.yaml"]["data"], exps[name]["outputs/params_in_force.yaml"]["data"]
        assert (own["recipe"], own["train"]["batch_size"], own["train"]["optimizer"]["lr"]) == ("fast", 32, 0.001)
        assert (in_force["recipe"], in_force["train"]["batch_size"], in_force["train"]["optimizer"]["lr"],
                in_force["train"]["epochs"]) == ("fast", 256, 0.004, epochs)
    diff = run(["dvc", "params", "diff", "--all"], project).stdout  # HEAD (no training) vs the workspace (e3)
    assert re.search(r"outputs/params_in_force.yaml\s+train.batch_size\s+-\s+256", diff), diff
    assert re.search(r"outputs/params_in_force.yaml\s+train.optimizer.lr\s+-\s+0.004", diff), diff
    assert re.search(r"params.yaml\s+train.batch_size\s+32\s+32", diff), diff


def _mlflow_run(project, *params: str):
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "cifar10",
         *(a for p in params for a in ("-P", p))], project, env=env)
    (r,) = _runs(project)
    return r, env


def test_mlflow_run_takes_the_recipe_as_a_parameter(project):
    r, _ = _mlflow_run(project, "recipe=fast", "epochs=1")
    assert r.info.status == "FINISHED"
    assert (r.data.params["recipe"], r.data.params["train.batch_size"], r.data.params["train.epochs"]) == ("fast", "256", "1")


@pytest.mark.slow  # 1.5 min; tests/test_reproduce.py's pure test covers the comparison in the default run
def test_a_run_of_mlflow_run_reproduces(project):
    """The issue's command: `mlflow run . -P recipe=fast -P epochs=2`, then `cifarpipe-reproduce <id>`,
    which once said "NOT reproduced" on MLflow's own entry-point parameters (batch_size '', ...)."""
    r, env = _mlflow_run(project, "recipe=fast", "epochs=2")
    assert r.data.params["batch_size"] == "''"  # MLflow's own record of the entry point's -P values
    proc = run([sys.executable, "-m", "cifarpipe.commands.reproduce", r.info.run_id], project, env=env, check=False)
    assert proc.returncode == 0 and "reproduced exactly" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_mlflow_run_refuses_a_parameter_its_recipe_would_override(tmp_path):
    proc = run([sys.executable, str(REPO / "stages" / "mlflow_run.py"), "--recipe", "gpu", "--epochs", "5"],
               tmp_path, check=False)
    assert proc.returncode == 2
    assert "recipe 'gpu' sets what -P epochs=5 (the recipe sets train.epochs=30) would change" in proc.stderr
    assert "+ dvc" not in proc.stdout  # stopped before any DVC command
    proc = run([sys.executable, str(REPO / "stages" / "mlflow_run.py"), "--recipe", "fastest"], tmp_path, check=False)
    assert proc.returncode == 2 and "valid: air, course, fast, gpu, sgd" in proc.stderr


@pytest.mark.slow  # a benchmark's harness, not the pipeline
def test_bench_takes_a_recipe_as_the_base_of_its_configurations(tmp_path, tiny_archive):
    archive, _ = tiny_archive
    bench = [sys.executable, str(BENCH), "--archive", str(archive), "--params", str(REPO / "params.yaml"),
             "--device", "cpu", "--skip", "course", "--skip", "fast", "--skip", "resnet", "--skip", "tracking"]
    proc = run([*bench, "--recipe", "fastest", "--out", str(tmp_path / "no.json")], tmp_path, check=False)
    assert proc.returncode == 1 and "valid: air, course, fast, gpu, sgd" in proc.stderr
    assert not (tmp_path / "no.json").exists()
    out = tmp_path / "bench.json"
    run([*bench, "--recipe", "fast", "--set", "train.epochs=1", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    (config,) = report["configurations"].values()
    assert (config["recipe"], config["train.batch_size"], config["train.epochs"]) == ("fast", 256, 1)
    (command,) = report["commands"].values()
    assert command.startswith("dvc exp run -S recipe=fast -S train.epochs=1")
    # Without --recipe, the benchmark's fast recipe is recipes/fast.yaml itself: one source of its values.
    both = [*bench[:bench.index("--skip")], "--skip", "course", "--skip", "resnet", "--skip", "tracking"]
    run([*both, "--set", "train.epochs=1", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    fast = report["configurations"]["ours, course CNN, fast recipe"]
    expected = flatten(load_params(REPO / "params.yaml", recipe="fast"))
    assert fast == {**expected, "train.epochs": 1}
    assert report["commands"]["ours, course CNN, fast recipe"] == "dvc exp run -S train.epochs=1 -S recipe=fast"
