"""cifarpipe-tune: an Optuna search whose trials are the train stage's training, pruned on
validation accuracy, nested under one MLflow parent run, resumable from its journal file, and whose
winner, written as a recipe, trains through `dvc exp run -S recipe=<name>` to the same numbers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, git_commit, run
from cifarpipe.commands import tuning
from cifarpipe.config import UserError, load_params

TUNE = [sys.executable, "-m", "cifarpipe.commands.tune"]
# The tiny archive's classes differ by colour: lr 1e-3 learns them within an epoch, lr 1e-6 cannot,
# so the median pruner (after one complete trial) stops the second trial after its first epoch.
SPACE = """\
trials: {trials}
epochs: {epochs}
sampler: {{name: tpe, startup_trials: 2, seed: 0}}
pruner: {{name: median, startup_trials: 1, warmup_epochs: 0}}
params:
  train.optimizer.lr: {{type: float, low: 1.0e-6, high: 3.0e-3, log: true}}
  train.batch_size: {{type: categorical, choices: [32, 64]}}
fixed:
  train.label_smoothing: 0.05
first_trials:
  - {{train.optimizer.lr: 0.001, train.batch_size: 32}}
  - {{train.optimizer.lr: 1.0e-6, train.batch_size: 64}}
"""


def write_space(project: Path, name: str = "search", trials: int = 3, epochs: int = 2) -> Path:
    path = project / "tune" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SPACE.format(trials=trials, epochs=epochs))
    return path


def study_runs(project: Path, study: str):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    [parent] = client.search_runs(exp_ids, f"tags.`tune.study` = '{study}' and attributes.run_name = 'tune-{study}'")
    trials = client.search_runs(exp_ids, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, sorted(trials, key=lambda r: int(r.data.tags["tune.trial"]))


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture
def data_ready(project):
    run(["dvc", "repro", "split"], project)
    git_commit(project, "data")
    return project


def test_a_search_prunes_nests_continues_and_its_winner_reproduces_through_dvc_exp_run(data_ready):
    project = data_ready
    space = write_space(project)
    out = run(TUNE + [str(space)], project).stdout
    assert "trial 1 pruned after epoch 1" in out, out
    client, parent, trials = study_runs(project, "search")
    assert parent.info.status == "FINISHED" and [r.data.tags["tune.trial"] for r in trials] == ["0", "1", "2"]
    states = {r.data.tags["tune.trial"]: (r.data.tags["trial_state"], r.info.status) for r in trials}
    assert states["0"] == ("COMPLETE", "FINISHED") and states["1"] == ("PRUNED", "KILLED"), states
    for r in trials:  # every param in force, per-epoch metrics, nothing from the test set
        assert r.data.params["train.label_smoothing"] == "0.05" and r.data.params["train.epochs"] == "2"
        assert not [k for k in r.data.metrics if k.startswith("test")]
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")]
        assert steps == ([1] if r.data.tags["trial_state"] == "PRUNED" else [1, 2])
    assert (project / "outputs/tune/search.journal").is_file()

    space.write_text(SPACE.format(trials=4, epochs=2))  # one more trial: the same study continues
    out = run(TUNE + [str(space)], project).stdout
    assert "3 of 4 trials finished" in out, out
    client, again, trials = study_runs(project, "search")
    assert again.info.run_id == parent.info.run_id and len(trials) == 4

    [best] = [r for r in trials if r.info.run_id == again.data.tags["best_trial_run_id"]]
    # evaluate.weights best (params.yaml's): a trial's value is its best epoch's validation accuracy
    assert again.data.metrics["best_val_accuracy"] == max(history(client, best.info.run_id, "val_accuracy"))
    recipe = (project / "recipes/search.yaml").read_text()
    assert recipe.startswith("# cifarpipe-tune study search") and best.info.run_id in recipe
    values = tuning.flatten_mapping(yaml.safe_load(recipe))
    assert values["train.optimizer.lr"] == float(best.data.params["train.optimizer.lr"])
    run(["git", "add", "recipes/search.yaml"], project)
    run(["dvc", "exp", "run", "-n", "winner", "-S", "recipe=search"], project)
    reproduced = pd.read_csv(project / "outputs/history.csv")
    for key in ("val_accuracy", "val_loss", "train_loss"):  # the same numbers, bit for bit (CPU)
        assert reproduced[key].tolist() == history(client, best.info.run_id, key), key


@pytest.mark.slow  # the default run keeps the main search test
def test_a_trial_killed_with_its_command_is_tried_again_when_the_command_is_rerun(data_ready):
    project = data_ready
    space = write_space(project, "killed", trials=2, epochs=3)
    proc = subprocess.Popen(TUNE + [str(space)], cwd=project, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    for line in proc.stdout:
        if line.startswith("trial 0 epoch 1/3"):
            proc.send_signal(signal.SIGKILL)  # no cleanup: trial 0 stays RUNNING in the journal and MLflow
            break
    proc.wait()
    out = run(TUNE + [str(space)], project).stdout
    assert "trial 0 was interrupted: queued again with the same values" in out, out
    client, parent, trials = study_runs(project, "killed")
    assert [(r.data.tags["trial_state"], r.info.status) for r in trials][0] == ("INTERRUPTED", "KILLED")
    retry = next(r for r in trials[1:] if r.data.tags["tune.searched"] == trials[0].data.tags["tune.searched"])
    assert retry.data.tags["trial_state"] == "COMPLETE" and parent.info.status == "FINISHED"


def test_a_search_file_is_checked_before_any_training(tmp_path):
    base = load_params(Path(__file__).parents[1] / "params.yaml")

    def problem(text: str) -> str:
        path = tmp_path / "space.yaml"
        path.write_text(textwrap.dedent(text))
        with pytest.raises(UserError) as e:
            spec, _ = tuning.load_spec(path)
            tuning.check_spec(spec, base, path)
        return str(e.value)

    ok = "trials: 2\nepochs: 1\nparams:\n  train.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
    assert "unknown key 'trails'" in problem(ok.replace("trials:", "trails:"))
    assert "train.optimizer.lrr" in problem(ok.replace("optimizer.lr:", "optimizer.lrr:"))
    assert "train.optimizer.lr = 0.0" in problem(ok.replace("low: 1.0e-4", "low: 0.0").replace(", log: true", ""))
    assert "log: true needs low > 0" in problem(ok.replace("low: 1.0e-4", "low: 0.0"))
    assert "set by `epochs`" in problem(ok + "  train.epochs: {type: int, low: 1, high: 3}\n")
    assert "train.batch_size = 0" in problem(ok + "  train.batch_size: {type: categorical, choices: [64, 0]}\n")
    assert "outside its search space" in problem(ok + "first_trials:\n  - {train.optimizer.lr: 0.5}\n")
    assert "data.url" in problem(ok + "fixed:\n  data.url: x\n")  # a recipe sets model/train/evaluate only
    assert "train.scheduler.warmup_epochs" in problem(ok + "fixed:\n  train.scheduler.warmup_epochs: 1\n")
    spec, study = tuning.load_spec(_write(tmp_path / "fine.yaml", ok))
    tuning.check_spec(spec, base, tmp_path / "fine.yaml")
    assert study == "fine"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow  # two worker processes on 2 shared cores: about a minute
def test_two_workers_share_one_study_and_one_parent_run(data_ready):
    project = data_ready
    space = write_space(project, "pair", trials=4)
    out = run(TUNE + [str(space), "--workers", "2"], project).stdout
    assert "[worker 0] trial" in out and "[worker 1] trial" in out, out
    client, parent, trials = study_runs(project, "pair")
    finished = [r for r in trials if r.data.tags.get("trial_state") in ("COMPLETE", "PRUNED")]
    assert parent.info.status == "FINISHED" and len(finished) >= 4  # a worker may start one more as the other ends
    assert len({r.data.tags["tune.trial"] for r in trials}) == len(trials)


def test_the_pruner_never_stops_a_trial_in_its_warm_up_epochs(tmp_path):
    """warmup_epochs: 1 -> epoch 1 is never pruned, epoch 2 is (Optuna counts steps from 0, we count epochs from 1)."""
    import optuna

    from cifarpipe.commands.tune import open_study

    spec = tuning.TuneSpec.model_validate({
        "trials": 3, "epochs": 3, "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 1},
        "params": {"train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    study = open_study(spec, "warm", tmp_path / "warm.journal", worker_index=0)
    distribution = {"train.optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    study.add_trial(optuna.trial.create_trial(params={"train.optimizer.lr": 1e-3}, distributions=distribution,
                                              value=0.9, intermediate_values={1: 0.9, 2: 0.9, 3: 0.9}))
    trial = study.ask(distribution)
    trial.report(0.1, 1)
    assert not trial.should_prune()  # far below the median, but in the warm-up
    trial.report(0.1, 2)
    assert trial.should_prune()


def test_optunas_lock_left_by_a_killed_writer_is_removed_when_the_study_lock_is_free(tmp_path, monkeypatch, capsys):
    """A kill while a trial writes to the journal leaves Optuna's lock (a symbolic link): the next
    command, holding the study's lock, removes it instead of waiting on it."""
    from optuna.storages.journal import JournalFileSymlinkLock

    from cifarpipe.commands.tune import open_study, study_lock

    monkeypatch.chdir(tmp_path)
    journal = Path("outputs/tune/stale.journal")
    journal.parent.mkdir(parents=True)
    journal.touch()
    JournalFileSymlinkLock(str(journal)).acquire()  # held by a process that is gone
    assert os.path.lexists(f"{journal}.lock")
    spec = tuning.TuneSpec.model_validate({"trials": 1, "epochs": 1, "params": {
        "train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    with study_lock(journal):
        assert not os.path.lexists(f"{journal}.lock")
        assert len(open_study(spec, "stale", journal).trials) == 0  # the journal is writable at once
    assert "removed outputs/tune/stale.journal.lock" in capsys.readouterr().out


def test_a_trials_value_is_the_accuracy_of_the_weights_the_pipeline_keeps():
    assert tuning.trial_value([0.5, 0.7, 0.6], "best") == 0.7
    assert tuning.trial_value([0.5, 0.7, 0.6], "last") == 0.6


@pytest.mark.slow  # test_weights_and_stopping covers early stopping in the default run
def test_early_stopping_ends_a_trial_as_complete_not_pruned(data_ready):
    """train.early_stopping (patience 1, an improvement of more than 0.9 needed) stops every trial
    after epoch 2, as it would stop the train stage: the trial is complete with 2 epochs."""
    project = data_ready
    space = project / "tune" / "early.yaml"
    space.parent.mkdir(exist_ok=True)
    space.write_text(textwrap.dedent("""\
        trials: 1
        epochs: 4
        pruner: {name: none}
        params:
          train.optimizer.lr: {type: float, low: 1.0e-3, high: 2.0e-3}
        fixed:
          train.early_stopping.patience: 1
          train.early_stopping.min_delta: 0.9
        """))
    out = run(TUNE + [str(space)], project).stdout
    assert "trial 0: train.early_stopping ended it after epoch 2" in out, out
    client, parent, [trial] = study_runs(project, "early")
    assert (trial.data.tags["trial_state"], trial.info.status) == ("COMPLETE", "FINISHED")
    assert trial.data.tags["stopped_early_after_epoch"] == "2"
    accuracies = history(client, trial.info.run_id, "val_accuracy")
    assert len(accuracies) == 2 and parent.data.metrics["best_val_accuracy"] == max(accuracies)
