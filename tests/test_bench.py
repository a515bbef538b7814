"""benchmarks/bench.py, shrunk: every configuration runs end to end on the tiny archive and the
report has what the README quotes. Structure only: speed is measured by running the benchmark,
never asserted in a test."""
from __future__ import annotations

import json
import sys

from conftest import REPO, run

BENCH = [sys.executable, str(REPO / "benchmarks" / "bench.py")]


def test_the_benchmark_runs_every_configuration_and_reports_them(tmp_path, tiny_archive):
    archive, _ = tiny_archive
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmpdir"  # the benchmark's temporary files, which must all be gone at the end
    scratch.mkdir()
    proc = run([*BENCH, "--archive", str(archive), "--params", str(REPO / "params.yaml"), "--device", "cpu",
                "--course-epochs", "1", "--set", "train.epochs=2", "--resnet", "train.batch_size=32",
                "--resnet-seconds", "1", "--tracking-epochs", "1", "--tracking-repeats", "1", "--target", "0.05",
                "--out", str(out)], tmp_path, env={"TMPDIR": str(scratch)})
    # torch keeps its kernel cache there on purpose (fused Adam on the CPU creates torchinductor_<user>)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["course loop (DataLoader, batch 8)", "ours, course CNN, params.yaml",
                     "ours, course CNN, fast recipe", "ours, cifar_resnet train.batch_size=32"]
    course, ours, fast, resnet = report["results"]
    assert report["target_accuracy"] == course["final_accuracy"]  # the target is the course loop's result
    assert len(course["epochs"]) == 1 and len(ours["epochs"]) == 2 and len(fast["epochs"]) == 2
    assert resnet["extra"]["stopped_after_seconds"] == 1.0
    for r in report["results"]:
        assert r["images_per_second"] > 0 and 0 <= r["final_accuracy"] <= 1
        # "time to target" is the training time of the first epoch at or above it
        hit = next((e for e in r["epochs"] if e["test_accuracy"] >= report["target_accuracy"]), None)
        assert r["seconds_to_target"] == (hit["train_seconds"] if hit else None)
    # the configurations are params.yaml plus the overrides, as `dvc exp run -S` would set them
    configs = report["configurations"]
    assert configs["ours, course CNN, fast recipe"]["train.optimizer.lr"] == 0.003
    assert configs["ours, course CNN, fast recipe"]["train.augment.crop_padding"] == 0
    assert configs["ours, course CNN, params.yaml"]["train.optimizer.lr"] == 0.001
    assert configs["ours, cifar_resnet train.batch_size=32"]["model.name"] == "cifar_resnet"
    assert "fast recipe: dvc exp run -S train.epochs=2 -S model.name=course_cnn -S train.batch_size=128" in proc.stdout
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
