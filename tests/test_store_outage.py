"""A real MLflow tracking server that stops answering mid-training: training goes on, nothing is lost."""
from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import BIN, run, set_params, stage_cmd
from cifarpipe.tracking import EPOCH_METRICS

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
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    assert torch.load(project / "outputs/checkpoints/last.pt", weights_only=True)["complete"]

    client = MlflowClient(mlflow_server)
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/last.pt",
                                                                              "checkpoints/best.pt"}
    assert not (project / "outputs/checkpoints/mlflow_unlogged.json").exists()
