"""Comparing runs: the compare command over a real store, the mistakes grid, TensorBoard event files."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import git_commit, make_project, run, serve_folder, set_params
from cifarpipe import report
from cifarpipe.commands import compare
from cifarpipe.tracking import tensorboard
from cifarpipe.config import UserError
from cifarpipe.tracking.run import EPOCH_METRICS
from cifarpipe.tracking.runs import StoredRun

EPOCHS = 2


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_archive):
    """A real store written by the real stages, with TensorBoard on: run A (`dvc repro`, killed
    inside epoch 2 and resumed) and run B (`dvc exp run -n lr-high`, a higher learning rate)."""
    base = tmp_path_factory.mktemp("compare")
    with serve_folder(base / "www") as server:
        project = make_project(base / "project", *tiny_archive, server)
        set_params(project, **{"train.epochs": EPOCHS, "tracking.tensorboard": True})
        git_commit(project, "tensorboard on")
        killed = run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": "step:2:3"}, check=False)
        assert killed.returncode != 0
        run(["dvc", "repro"], project)
        git_commit(project, "run A")
        run(["dvc", "exp", "run", "-n", "lr-high", "-S", "train.optimizer.lr=0.003"], project)
        yield project


def store(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def compare_cmd(project: Path, *args: str, check: bool = True):
    return run([sys.executable, "-m", "cifarpipe.commands.compare", *args], project, check=check)


def test_compare_prints_and_writes_the_table_and_curves_from_a_real_store(tracked):
    client = store(tracked)
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert len(runs) == 2
    out = compare_cmd(tracked, "--csv", "runs.csv", "--md", "runs.md", "--png", "val.png").stdout
    assert all(name in out for name in runs) and "2 runs of experiment 'cifar10'" in out
    assert "ranked by model_val_accuracy (the validation accuracy of each run's model" in out

    table = pd.read_csv(tracked / "runs.csv")
    # Only the params that differ: the learning rate, not the epochs or the seed.
    assert "train.optimizer.lr" in table.columns and "train.epochs" not in table.columns
    assert list(table["model_val_accuracy"]) == sorted(table["model_val_accuracy"], reverse=True)
    for row in table.to_dict("records"):
        r = runs[row["run"]]
        rid = r.info.run_id
        assert row["run_id"] == rid[:8] and row["status"] == "FINISHED"
        assert str(row["train.optimizer.lr"]) == r.data.params["train.optimizer.lr"]
        assert row["test_accuracy"] == pytest.approx(r.data.metrics["test_accuracy"])
        val = {m.step: m.value for m in client.get_metric_history(rid, "val_accuracy")}
        assert row["best_val_accuracy"] == pytest.approx(max(val.values()))
        assert row["weights_epoch"] == int(r.data.tags["weights_epoch"])  # the run's model: evaluate.weights best
        assert row["model_val_accuracy"] == pytest.approx(val[row["weights_epoch"]]) == row["best_val_accuracy"]
        seconds = client.get_metric_history(rid, "epoch_seconds")
        assert row["train_seconds"] == pytest.approx(sum(m.value for m in seconds))
    md = (tracked / "runs.md").read_text().splitlines()
    assert md[0].startswith("| run | run_id |") and len(md) == 2 + 2
    png = matplotlib.image.imread(tracked / "val.png")
    assert png.shape[0] > 300 and png.shape[1] > 500
    by_test = compare_cmd(tracked, "--by", "test_accuracy", "--csv", "by_test.csv").stdout
    assert "ranked by test_accuracy (test accuracy), highest first" in by_test
    ranked = pd.read_csv(tracked / "by_test.csv")
    assert list(ranked["test_accuracy"]) == sorted(ranked["test_accuracy"], reverse=True)

    # A filter on the run name picks one run; a filter matching none is a clear message, exit 1.
    name = table["run"][0]
    one = compare_cmd(tracked, "--filter", f"attributes.run_name = '{name}'", "--csv", "one.csv")
    assert len(pd.read_csv(tracked / "one.csv")) == 1 and "1 run of" in one.stdout
    none = compare_cmd(tracked, "--filter", "attributes.run_name = 'no-such-run'", check=False)
    assert none.returncode == 1 and "no runs" in none.stderr and "Traceback" not in none.stderr


def test_compare_says_when_max_runs_left_runs_out(tracked):
    """--max-runs (default 100) once cut the table without a word: it looked like every run."""
    cut = compare_cmd(tracked, "--max-runs", "1")
    assert "1 run of" in cut.stdout
    assert "note: only the newest 1 matching run(s) are listed; more match" in cut.stderr
    assert "note:" not in compare_cmd(tracked, "--max-runs", "2").stderr


def test_compare_without_runs_or_store_says_so(tmp_path, monkeypatch):
    no_store = compare_cmd(tmp_path, check=False)
    assert no_store.returncode == 2
    assert "no MLflow store" in no_store.stderr and "Traceback" not in no_store.stderr
    assert not (tmp_path / "mlflow.db").exists()  # reading never creates an empty store

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("cifar10")
    empty = compare_cmd(tmp_path, "--all-experiments", check=False)
    assert empty.returncode == 1 and "no runs" in empty.stderr and "Traceback" not in empty.stderr

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="no experiment named 'other'"):
        compare.main(["--experiment", "other"])
    with pytest.raises(UserError, match="rejected the filter"):
        compare.main(["--filter", "nonsense ==="])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(UserError, match="unreachable"):
        compare.main([])


def stored(name: str, params: dict, test_acc: float | None, val: list[float], seconds: list[float],
           tags: dict | None = None, start_end: tuple[int, int] | None = None) -> StoredRun:
    metrics = {} if test_acc is None else {"test_accuracy": test_acc}
    return StoredRun(run_id=name * 8, name=name, status="FINISHED", start_ms=(start_end or (None, None))[0],
                     end_ms=(start_end or (None, None))[1], params=params, metrics=metrics, tags=tags or {},
                     histories={"val_accuracy": list(enumerate(val, 1)), "epoch_seconds": list(enumerate(seconds, 1))})


def test_table_keeps_differing_params_and_ranks_by_the_models_validation_accuracy(tmp_path):
    runs = [stored("a", {"lr": "0.001", "epochs": "3"}, 0.5, [0.3, 0.45, 0.4], [1.0, 2.0, 1.0],
                   {"weights_epoch": "2"}),  # its model: the best epoch's weights, 0.45
            stored("b", {"lr": "0.003", "epochs": "3", "extra": "x"}, None, [0.4], [], {"dvc_experiment": "lr-3e-3"},
                   start_end=(1000, 6500)),  # no weights_epoch tag: the last epoch's weights
            stored("c", {"lr": "0.001", "epochs": "3"}, 0.6, [0.5, 0.6, 0.42], [3.0, 4.0, 1.0],
                   {"weights_epoch": "3"})]  # evaluate.weights last: 0.42, though its best epoch had 0.6
    table = compare.build_table(runs)
    assert list(table.columns) == ["run", "run_id", "dvc_experiment", "status", "extra", "lr", "model_val_accuracy",
                                   "weights_epoch", "best_val_accuracy", "test_accuracy", "train_seconds"]
    assert list(table["run"]) == ["a", "c", "b"]  # the validation accuracy of each run's model, highest first
    assert list(table["model_val_accuracy"]) == [0.45, 0.42, 0.4] and list(table["weights_epoch"]) == [2, 3, 1]
    assert list(table["dvc_experiment"]) == ["-", "-", "lr-3e-3"] and list(table["extra"]) == ["-", "-", "x"]
    assert list(table["best_val_accuracy"]) == [0.45, 0.6, 0.4]
    assert list(table["train_seconds"]) == [4.0, 8.0, 5.5]  # b: no epoch seconds, end - start
    assert math.isnan(table["test_accuracy"][2]) and compare.formatted(table)["test_accuracy"][2] == "-"
    assert list(compare.build_table(runs, "test_accuracy")["run"]) == ["c", "a", "b"]  # none last
    assert list(compare.build_table(runs, "best_val_accuracy")["run"]) == ["c", "a", "b"]
    assert list(compare.build_table(runs, "train_seconds")["run"]) == ["a", "b", "c"]  # fewest seconds first
    logged = stored("d", {}, 0.5, [0.3, 0.5], [1.0, 1.0], {"weights_epoch": "1"})
    logged.metrics["model_val_accuracy"] = 0.3  # the train stage's own figure wins
    assert compare.model_val_accuracy(logged) == 0.3 and compare.weights_epoch(logged) == 1
    compare.curves_png([(r.name, r.histories["val_accuracy"]) for r in runs], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mistakes_grid_shows_only_misclassified_images_most_confident_first(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.integers(0, 10, n)
    predictions = np.where(np.arange(n) % 2 == 0, (labels + 1) % 10, labels)  # even indices wrong
    confidences = rng.random(n)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    classes = [f"class{i}" for i in range(10)]
    shown = report.mistakes_png(images, labels, predictions, confidences, classes, tmp_path / "m.png", "t")
    wrong = np.flatnonzero(labels != predictions)
    assert len(shown) == 24 and set(shown) <= set(wrong)
    assert list(confidences[shown]) == sorted(confidences[wrong], reverse=True)[:24]
    assert matplotlib.image.imread(tmp_path / "m.png").shape[:2] == (930, 1140)  # 4x6 tiles at 100 dpi

    few = report.mistakes_png(images[:6], labels[:6], predictions[:6], confidences[:6], classes, tmp_path / "f.png", "t")
    assert sorted(few) == [0, 2, 4]
    none = report.mistakes_png(images, labels, labels, confidences, classes, tmp_path / "n.png", "t")
    assert len(none) == 0 and (tmp_path / "n.png").is_file()


def test_evaluate_writes_and_logs_the_mistakes_grid(tracked):
    assert matplotlib.image.imread(tracked / "outputs/mistakes.png").shape[:2] == (930, 1140)
    client = store(tracked)
    for r in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert "evaluation/mistakes.png" in {a.path for a in client.list_artifacts(r.info.run_id, "evaluation")}


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_epoch_once(tracked):
    client = store(tracked)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    folders = sorted((tracked / "outputs/tensorboard").iterdir())
    assert len(folders) == 2 and {f.name for f in folders} == {f"{r.info.run_name}_{r.info.run_id[:8]}" for r in runs}
    for r in runs:
        folder = tracked / "outputs/tensorboard" / f"{r.info.run_name}_{r.info.run_id[:8]}"
        assert [p.name for p in folder.iterdir() if "tfevents" in p.name] == [tensorboard.TENSORBOARD_FILE]
        got = scalars(folder)
        assert set(got) == set(EPOCH_METRICS)
        for key in EPOCH_METRICS:  # run A was killed in epoch 2 and resumed: still each epoch once
            want = [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]
            assert [s for s, _ in got[key]] == list(range(1, EPOCHS + 1)), key
            assert [v for _, v in got[key]] == pytest.approx([v for _, v in want], rel=1e-6), key
        arts = {a.path for a in client.list_artifacts(r.info.run_id, f"tensorboard/{folder.name}")}
        assert arts == {f"tensorboard/{folder.name}/{tensorboard.TENSORBOARD_FILE}"}


def test_tensorboard_rewrite_replaces_earlier_epochs(tmp_path):
    rows = [{"epoch": e, **{k: e + i / 10 for i, k in enumerate(EPOCH_METRICS)}} for e in (1, 2, 3)]
    folder = tmp_path / "run_1234"
    tensorboard.write_tensorboard(folder, rows[:2])
    (folder / "events.partial").write_bytes(b"half a file a kill left")  # ignored, then replaced
    tensorboard.write_tensorboard(folder, rows)  # e.g. a resumed job: the whole history again
    got = scalars(folder)
    assert got["train_loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [s for s, _ in got["images_per_second"]] == [1, 2, 3]
    assert sorted(p.name for p in folder.iterdir()) == [tensorboard.TENSORBOARD_FILE]


def test_dvc_plots_number_epochs_whole_and_draw_the_rate_on_a_log_scale(tracked):
    shown = json.loads(run(["dvc", "plots", "show", "--json"], tracked).stdout)
    assert not shown.get("errors"), shown["errors"]
    specs = {plot_id: chart["content"] for plot_id, (chart,) in shown["data"].items()}

    def x_axes(node):  # every x encoding of the spec, layers included
        if isinstance(node, dict):
            if isinstance(node.get("x"), dict) and node["x"].get("field") == "epoch":
                yield node["x"]
            for value in node.values():
                yield from x_axes(value)
        elif isinstance(node, list):
            for value in node:
                yield from x_axes(value)

    for plot_id in ("loss", "accuracy", "learning_rate"):
        axes = list(x_axes(specs[plot_id]))
        assert axes and all(a.get("axis") == {"format": "d", "tickMinStep": 1} for a in axes), (plot_id, axes)
    y = specs["learning_rate"]["encoding"]["y"]
    assert y["scale"]["type"] == "log" and y["axis"]["format"] == "~e" and y["field"] == "lr"
    assert all(float(v["lr"]) > 0 for v in specs["learning_rate"]["data"]["values"])  # a log scale has no 0
