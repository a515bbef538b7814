"""A real MLflow tracking server that stops answering (mid-training, while resuming, at the end of
training, during evaluate): nothing is split, nothing is lost, DVC keeps every finished output."""
from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import BIN, checkpoint_models, kept_checkpoints, pyfunc_models, run, set_params, stage_cmd
from cifarpipe.tracking.journal import JOURNAL_NAME as PENDING_NAME
from cifarpipe.tracking.run import EPOCH_METRICS


def last_pt(project: Path) -> Path:
    """The one training job's last checkpoint: outputs/checkpoints/<fingerprint>/last.pt."""
    [path] = (project / "outputs/checkpoints").glob("*/last.pt")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutageProxy(http.server.ThreadingHTTPServer):
    """Forwards to the MLflow server, but answers 503 to the first `outages` metric batches that
    carry epoch 2: the store is down from epoch 2 until training ends."""

    def __init__(self, upstream: str, outages: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.outages, self.refused = upstream, outages, 0


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: OutageProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/runs/log-batch") and self.server.refused < self.server.outages:
            if any(m.get("step") in (2, "2") for m in json.loads(body or b"{}").get("metrics", [])):
                self.server.refused += 1
                self.send_error(503, "store down")
                return
        req = urllib.request.Request(self.server.upstream + self.path, data=body or None, method=self.command,
                                     headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, headers, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, headers, payload = e.code, e.headers, e.read()
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # no GenAI job runners (huey consumers): 2 processes instead of ~8, same REST API
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_training_survives_a_store_outage_and_every_epoch_lands(project, mlflow_server):
    set_params(project, **{"train.epochs": 3})
    run(["dvc", "repro", "split"], project)
    proxy = OutageProxy(mlflow_server, outages=2)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proc = run(stage_cmd(project, "train"), project, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.server_address[1]}",
                                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    proxy.shutdown()
    assert proxy.refused == 2  # epoch 2's batch and epoch 3's (which carried epoch 2 again) were refused
    assert "training goes on" in proc.stderr
    assert "epoch   3/3" in proc.stdout
    assert torch.load(last_pt(project), weights_only=True)["complete"]

    client = MlflowClient(mlflow_server)
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    assert sorted(checkpoint_models(client, run_id)) == [1, 2, 3]  # epoch 2's model too, made once the store answered
    assert 3 in kept_checkpoints(client, run_id)
    assert not (project / "outputs" / PENDING_NAME).exists()


class RuleProxy(http.server.ThreadingHTTPServer):
    """Forwards to the MLflow server, but answers 503 to every request `refuse(method, path, body)` picks."""

    outages = refused = 0  # _ProxyHandler's metric-batch outage: off here

    def __init__(self, upstream: str, refuse) -> None:
        super().__init__(("127.0.0.1", 0), _RuleHandler)
        self.upstream, self.refuse, self.refused_calls = upstream, refuse, []

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    @property
    def env(self) -> dict[str, str]:
        # No retries: a 503 is final at once (MLflow's default would retry it for minutes).
        return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.server_address[1]}",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


class _RuleHandler(_ProxyHandler):
    server: RuleProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.refuse(self.command, self.path, body):
            self.server.refused_calls.append(f"{self.command} {self.path}")
            self.send_error(503, "store down")
            return
        self.rfile = io.BytesIO(body)  # _ProxyHandler reads the body again
        super()._forward()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


def all_runs(client: MlflowClient):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow  # test_resume's unreachable-store test covers the stop before training in the default run
def test_an_outage_while_resuming_stops_before_training_and_never_splits_the_run(project, mlflow_server):
    set_params(project, **{"train.epochs": 2})
    run(["dvc", "repro", "split"], project)
    client = MlflowClient(mlflow_server)
    down = {"on": False}
    with RuleProxy(mlflow_server, lambda method, path, body: down["on"] and "/runs/get" in path) as proxy:
        killed = run(stage_cmd(project, "train"), project, env={**proxy.env, "CIFARPIPE_FAULT": "step:2:3"},
                     check=False)
        assert killed.returncode == -9
        [first] = all_runs(client)
        ckpt_before = last_pt(project).read_bytes()

        down["on"] = True  # the store answers, but not about runs: a 5xx, as from a server restarting
        proc = run(stage_cmd(project, "train"), project, env=proxy.env, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert "did not answer" in proc.stderr and proxy.env["MLFLOW_TRACKING_URI"] in proc.stderr
        assert "Nothing was trained and no run was changed" in proc.stderr
        assert "epoch   2/2" not in proc.stdout
        assert [r.info.run_id for r in all_runs(client)] == [first.info.run_id]  # no new run
        assert client.get_run(first.info.run_id).info.status == "RUNNING"  # not marked KILLED
        assert "abandoned" not in client.get_run(first.info.run_id).data.tags
        assert last_pt(project).read_bytes() == ckpt_before

        down["on"] = False  # back: the same run continues and finishes
        run(stage_cmd(project, "train"), project, env=proxy.env)
    [r] = all_runs(client)
    assert r.info.run_id == first.info.run_id and r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1, 2]


def _end_of_run_calls(method: str, path: str, body: bytes) -> bool:
    """The store refuses what the end of training and evaluate send: artifact uploads (all but the
    requirements file logged at the start) and terminal statuses (updates with an end time)."""
    return (method == "PUT" and "/mlflow-artifacts/artifacts/" in path and "/environment/" not in path
            ) or ("/runs/update" in path and b"end_time" in body)


def test_an_outage_at_the_end_of_training_and_in_evaluate_loses_nothing(project, mlflow_server):
    client = MlflowClient(mlflow_server)
    pending = project / "outputs" / PENDING_NAME
    with RuleProxy(mlflow_server, _end_of_run_calls) as proxy:
        failed = run(["dvc", "repro"], project, env=proxy.env, check=False)
    assert failed.returncode != 0
    out = failed.stdout + failed.stderr
    assert "Traceback" not in out
    # train succeeded: its outputs are complete and DVC recorded them
    assert "training finished and its outputs are written" in failed.stderr
    lock = (project / "dvc.lock").read_text()
    assert "  train:" in lock and "  evaluate:" not in lock
    assert torch.load(last_pt(project), weights_only=True)["complete"]
    assert (project / "outputs/model.pt").exists() and (project / "outputs/history.csv").exists()
    # evaluate wrote its outputs, then failed with one clear line (exit 3) so DVC reruns it
    metrics = json.loads((project / "outputs/metrics.json").read_text())
    assert (project / "outputs/confusion.png").exists() and (project / "outputs/per_class.csv").exists()
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: MLflow store")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "pending in" in errors[0] and "dvc repro" in errors[0]
    items = json.loads(pending.read_text())["items"]
    kinds = [(it["kind"], Path(it.get("path") or it.get("weights") or ".").name) for it in items]
    assert kinds == [("checkpoints", ""), ("artifact", "history.csv"), ("metrics", ""), ("tags", ""),
                     ("model", "model.pt"), ("status", ""), ("evaluation", "")], kinds
    # the epochs' metrics and checkpoint models landed while training; the files for the best and
    # last epochs' models wait, pinned like any artifact
    files = items[0]["files"]
    assert not items[0]["metrics"] and "last.pt" in {Path(f["path"]).name for f in files} and items[0]["keep"]
    [r] = all_runs(client)
    run_id = r.info.run_id
    assert r.info.status == "RUNNING" and "test_accuracy" not in r.data.metrics

    # The store is back: the next `dvc repro` reruns evaluate only, which delivers everything once.
    again = run(["dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert "Running stage 'evaluate'" in again.stdout and "Running stage 'train'" not in again.stdout
    assert not pending.exists()
    [r] = all_runs(client)
    assert r.info.run_id == run_id and r.info.status == "FINISHED"
    assert (r.data.tags["weights"], r.data.tags["weights_epoch"]) == ("best", str(metrics["weights_epoch"]))
    assert [m.value for m in client.get_metric_history(run_id, "test_accuracy")] == [metrics["accuracy"]]
    assert len(client.get_metric_history(run_id, "test_loss")) == 1
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    arts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"history.csv", "evaluation/metrics.json", "evaluation/per_class.csv", "evaluation/confusion.png"} <= arts
    assert sorted(checkpoint_models(client, run_id)) == [1, 2] and 2 in kept_checkpoints(client, run_id)
    models = pyfunc_models(client, r.info.experiment_id)
    assert [(m.name, m.source_run_id, m.status.name) for m in models] == [("model", run_id, "READY")]
    assert run(["dvc", "status"], project).stdout.strip().endswith("up to date.")


@pytest.mark.slow  # the default run stays near 10 minutes; `pytest -m slow` runs it
@pytest.mark.parametrize("fault, refused", [
    ("step:2:3", "/metrics/get-history"),  # resuming: reading what the run already has
    ("step:1:3", "/runs/get"),  # killed before the first checkpoint: looking at the orphan run
])
def test_a_store_error_while_setting_up_the_run_is_a_clear_error_and_the_run_continues(project, mlflow_server,
                                                                                       fault, refused):
    set_params(project, **{"train.epochs": 2})
    run(["dvc", "repro", "split"], project)
    client = MlflowClient(mlflow_server)
    down = {"on": False}
    with RuleProxy(mlflow_server, lambda method, path, body: down["on"] and refused in path) as proxy:
        run(stage_cmd(project, "train"), project, env={**proxy.env, "CIFARPIPE_FAULT": fault}, check=False)
        [first] = all_runs(client)
        down["on"] = True
        proc = run(stage_cmd(project, "train"), project, env=proxy.env, check=False)
        assert proxy.refused_calls
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proxy.env["MLFLOW_TRACKING_URI"] in proc.stderr and "epoch   2/2" not in proc.stdout
        assert [(r.info.run_id, r.info.status) for r in all_runs(client)] == [(first.info.run_id, "RUNNING")]
        down["on"] = False
        run(stage_cmd(project, "train"), project, env=proxy.env)
    [r] = all_runs(client)
    assert r.info.run_id == first.info.run_id and r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1, 2]
