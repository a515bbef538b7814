"""benchmarks/cuda_pipeline.py, the GPU issues' script, shrunk onto the CPU: device time is scarce
(15 minutes a session, when a GPU is lent at all), so a broken script must fail here, not there."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, run


def load_script():
    spec = importlib.util.spec_from_file_location("cuda_pipeline", REPO / "benchmarks" / "cuda_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_store_comes_back_in_parts_with_what_did_not_fit_listed(tmp_path):
    """The device returns at most 8 files of 16 MiB: the database always, small artifacts first,
    the runs in the order given; what is left out is named with its size and SHA-256."""
    pack_store = load_script().pack_store
    store = tmp_path / "store"
    (store / "artifacts" / "run-a" / "artifacts").mkdir(parents=True)
    (store / "artifacts" / "run-b" / "artifacts").mkdir(parents=True)
    (store / "mlflow.db").write_bytes(b"d" * 3000)
    (store / "artifacts" / "run-a" / "artifacts" / "history.csv").write_bytes(b"h" * 100)
    (store / "artifacts" / "run-b" / "artifacts" / "history.csv").write_bytes(b"h" * 100)
    big = b"w" * (2 << 20)  # 2 MiB: not "small"
    (store / "artifacts" / "run-a" / "artifacts" / "last.pt").write_bytes(big)
    (store / "artifacts" / "run-b" / "artifacts" / "last.pt").write_bytes(big)
    runs = {"second": {"run_id": "run-b"}, "first": {"run_id": "run-a"}}  # run-b's files go first
    out = tmp_path / "out"
    out.mkdir()
    packed = pack_store(store, runs, out, limit_mb=3, part_mb=1)
    assert packed["parts"] == ["store.tar.00", "store.tar.01", "store.tar.02"]
    assert [(x["path"], x["bytes"], x["sha256"]) for x in packed["left_out"]] == [
        ("artifacts/run-a/artifacts/last.pt", len(big), hashlib.sha256(big).hexdigest())]
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join((out / p).read_bytes() for p in packed["parts"]))
    with tarfile.open(joined) as t:
        names = sorted(t.getnames())
    assert names == ["store/artifacts/run-a/artifacts/history.csv", "store/artifacts/run-b/artifacts/history.csv",
                     "store/artifacts/run-b/artifacts/last.pt", "store/mlflow.db"]


@pytest.mark.slow
def test_the_pipeline_script_runs_its_configurations_on_the_cpu(tmp_path, tiny_archive):
    """The deterministic kill-and-resume pair and the report the README quotes, on tiny data."""
    archive, md5 = tiny_archive
    out = tmp_path / "report.json"
    run([sys.executable, str(REPO / "benchmarks" / "cuda_pipeline.py"), "--archive", str(archive), "--md5", md5,
         "--work", str(tmp_path / "w"), "--store", str(tmp_path / "store"), "--out", str(out),
         "--recipe", "model.name=cifar_resnet model.width=8 train.batch_size=32 train.epochs=3",
         "--only", "resnet-det", "resnet-det-killed", "resnet-det-ddp1-killed", "--pack-into", str(tmp_path / "pack")],
        tmp_path)
    report = json.loads(out.read_text())
    # Killed and resumed, in one process and under torchrun (DDP with one process, gloo here):
    # both bitwise equal to the uninterrupted one-process training.
    for name in ("resnet-det-killed", "resnet-det-ddp1-killed"):
        killed = report["configurations"][name]
        assert killed["killed_by_sigkill"] and killed["same_run_id_after_resume"], name
        assert killed["resume_vs_uninterrupted"]["weights_bitwise_equal"], name
        assert killed["resume_vs_uninterrupted"]["history_equal"], name
    for name, r in report["store_check"].items():
        assert r["status"] == "FINISHED" and r["every_epoch_once"], name
        assert r["checkpoint_artifacts"] == ["checkpoints/best.pt", "checkpoints/last.pt"] and r["logged_models"]
    parts = [tmp_path / "pack" / p for p in report["store_pack"]["parts"]]
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar -x -C {back}", shell=True, check=True)
    assert (back / "store" / "mlflow.db").exists()
