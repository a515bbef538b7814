"""benchmarks/bench.py, shrunk: every configuration runs end to end on the tiny archive and the
report has what the README quotes. Structure only: speed is measured by running the benchmark,
never asserted in a test."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO, run

BENCH = [sys.executable, str(REPO / "benchmarks" / "bench.py")]
SWEEP = ["train.batch_size=64 train.optimizer.lr=0.003", "train.batch_size=128 train.optimizer.lr=0.001"]


@pytest.mark.slow  # a benchmark's harness, not the pipeline
def test_the_benchmark_runs_every_configuration_and_reports_them(tmp_path, tiny_archive):
    archive, _ = tiny_archive
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmpdir"  # the benchmark's temporary files, which must all be gone at the end
    scratch.mkdir()
    proc = run([*BENCH, "--archive", str(archive), "--params", str(REPO / "params.yaml"), "--device", "cpu",
                "--course-epochs", "1", "--set", "train.epochs=2", "--resnet", "train.batch_size=32",
                "--resnet-seconds", "1e-6", "--tracking-epochs", "1", "--tracking-repeats", "1", "--target", "0.05",
                "--sweep", SWEEP[0], "--sweep", SWEEP[1], "--out", str(out)], tmp_path, env={"TMPDIR": str(scratch)})
    # torch keeps its kernel cache there on purpose (fused Adam on the CPU creates torchinductor_<user>)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["course loop (DataLoader, batch 8)", "ours, course CNN, params.yaml",
                     "ours, course CNN, fast recipe", "ours, cifar_resnet train.batch_size=32"]
    course, ours, fast, resnet = report["results"]
    assert report["target_accuracy"] == course["final_accuracy"]  # the target is the course loop's result
    assert len(course["epochs"]) == 1 and len(ours["epochs"]) == 2 and len(fast["epochs"]) == 2
    # 1 microsecond: over after the first step on any machine (with 1 s, a fast one finished both
    # epochs first and the key was missing), so the time limit's stop is checked, not the speed.
    assert resnet["extra"]["stopped_after_seconds"] == 1e-6 and len(resnet["epochs"]) == 1
    for r in report["results"]:
        assert r["images_per_second"] > 0 and 0 <= r["final_accuracy"] <= 1
        # "best" is the epoch chosen on validation accuracy, with that epoch's test accuracy beside it
        assert "best_accuracy" not in r
        vals = [e["val_accuracy"] for e in r["epochs"]]
        best = r["epochs"][vals.index(max(vals))]
        assert (r["best_val_epoch"], r["test_accuracy_at_best_val"]) == (best["epoch"], best["test_accuracy"])
        # "time to target" is the training time of the first epoch at or above it
        hit = next((e for e in r["epochs"] if e["test_accuracy"] >= report["target_accuracy"]), None)
        assert r["seconds_to_target"] == (hit["train_seconds"] if hit else None)
    # the configurations are params.yaml plus the overrides, as `dvc exp run -S` would set them
    # the fast recipe is the sweep candidate with the highest final validation accuracy; the
    # candidates were never evaluated on the test set
    sweep = report["sweep"]
    assert [row["candidate"] for row in sweep] == SWEEP
    chosen = max(sweep, key=lambda row: row["final_val_accuracy"])["candidate"]
    assert f"chosen on validation accuracy: {chosen}" in proc.stdout
    assert "test acc" not in "".join(line for line in proc.stdout.splitlines() if line.strip().startswith("sweep "))
    configs = report["configurations"]
    for item in chosen.split():
        key, value = item.split("=")
        assert str(configs["ours, course CNN, fast recipe"][key]) == value
    assert configs["ours, course CNN, params.yaml"]["train.optimizer.lr"] == 0.001
    assert configs["ours, cifar_resnet train.batch_size=32"]["model.name"] == "cifar_resnet"
    assert f"fast recipe: dvc exp run -S train.epochs=2 -S model.name=course_cnn -S {chosen.replace(' ', ' -S ')}" \
        in proc.stdout
    overhead = report["mlflow_overhead"]
    assert len(overhead["seconds_off"]) == len(overhead["seconds_on"]) == len(overhead["seconds_off_again"]) == 1
    assert "wall_noise_floor_median" in overhead
    assert overhead["tracking_cpu_seconds"] > 0 and overhead["setup_seconds"] > 0


def test_a_bad_override_stops_the_benchmark_before_any_training(tmp_path, tiny_archive):
    archive, _ = tiny_archive
    proc = run([*BENCH, "--archive", str(archive), "--params", str(REPO / "params.yaml"),
                "--set", "train.optimizer.lrr=1", "--out", str(tmp_path / "b.json")], tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --set: unknown key 'train.optimizer.lrr'"
    assert not (tmp_path / "b.json").exists()


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_best_and_the_chosen_recipe_are_picked_on_validation_never_test(bench, monkeypatch):
    # Validation and test disagree on purpose: a choice made on test would pick the other one.
    r = bench.Result("x", epochs=[{"epoch": 1, "train_seconds": 1.0, "val_accuracy": 0.5, "test_accuracy": 0.9},
                                  {"epoch": 2, "train_seconds": 2.0, "val_accuracy": 0.7, "test_accuracy": 0.6}])
    assert r.best_val_epoch["epoch"] == 2 and r.best_val_epoch["test_accuracy"] == 0.6
    finals = {"a": (0.6, 0.9), "b": (0.7, 0.5)}  # candidate -> (final val, the test it would have had)
    calls = []

    def fake_engine(name, arrays, sp, params, device, tracking_dir, max_seconds=None, test=True):
        calls.append(test)
        val, test_acc = finals[name.removeprefix("sweep ")]
        row = {"epoch": 1, "train_seconds": 1.0, "val_accuracy": val}
        return bench.Result(name, epochs=[row | {"test_accuracy": test_acc} if test else row])

    monkeypatch.setattr(bench, "our_engine", fake_engine)
    chosen, table = bench.choose_recipe({"a": None, "b": None}, None, None, None)
    assert chosen == "b" and calls == [False, False]
    assert [row["final_val_accuracy"] for row in table] == [0.6, 0.7]
