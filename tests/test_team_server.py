"""A team's shared tracking server: a real `mlflow server --serve-artifacts --app-name basic-auth` on
loopback. A request without credentials is refused; the whole pipeline run with a user's credentials
(MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) logs params, curves, checkpoints and the
model through the server only (artifacts as mlflow-artifacts:/, no shared filesystem)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, checkpoint_models, kept_checkpoints, pyfunc_models, run, stage_cmd
from cifarpipe.tracking.run import EPOCH_METRICS
from test_store_outage import free_port

ADMIN = ("admin", "admin-Secret-1")
USER = ("alice", "alice-Secret-1")


@contextlib.contextmanager
def team_server(folder: Path, backend_uri: str, auth_db_uri: str | None = None):
    """`mlflow server` as the README's "For a team" starts it, on loopback: basic-auth, artifacts
    served from `folder/artifacts`, the admin account from MLflow's environment variables."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {auth_db_uri or 'sqlite:///' + str(folder / 'basic_auth.db')}\n"
        f"admin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # each request's password check is a PBKDF2 hash: cached for 60 s per (user, password)
        "auth_cache_ttl_seconds = 60\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
           # the auth app refuses to start without a fixed key for its CSRF tokens (MLflow 3.17)
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
           # no GenAI job runners (huey consumers): 2 processes instead of ~8, same REST API
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", backend_uri, "--serve-artifacts",
                             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def create_user(url: str, user: tuple[str, str]) -> None:
    """What the team's admin does once per user: MLflow's own auth client, with the admin's credentials."""
    from mlflow.server import get_app_client

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        get_app_client("basic-auth", tracking_uri=url).create_user(*user)


def status_without_credentials(url: str) -> int:
    try:
        urllib.request.urlopen(url + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow  # a full pipeline through a server: test_store_outage's real server covers HTTP in the default run
def test_the_pipeline_logs_everything_through_an_authenticated_team_server(project, tmp_path):
    with team_server(tmp_path / "server", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}") as url:
        check_team_server(project, tmp_path / "server", url)


@pytest.fixture
def postgres_databases():
    """Two new, empty PostgreSQL databases (tracking, users) on the server that CIFARPIPE_TEST_POSTGRES
    names (postgresql://USER:PASSWORD@HOST:PORT/postgres, a role allowed to create databases); dropped
    afterwards. Without it the PostgreSQL test is skipped: see the README's "For a team" to start one."""
    admin = os.environ.get("CIFARPIPE_TEST_POSTGRES")
    if not admin:
        pytest.skip("CIFARPIPE_TEST_POSTGRES is not set (a PostgreSQL server to test against)")
    psycopg = pytest.importorskip("psycopg")  # SQLAlchemy 2.1's driver for postgresql:// URIs
    import uuid

    names = [f"cifarpipe_{uuid.uuid4().hex[:8]}", ""]
    names[1] = names[0] + "_auth"
    conn = psycopg.connect(admin, autocommit=True)
    base = admin.rsplit("/", 1)[0]
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f"CREATE DATABASE {name}")
        yield [f"{base}/{name}" for name in names]
    finally:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def test_the_same_against_a_postgresql_backend(postgres_databases, project, tmp_path):
    tracking_db, auth_db = postgres_databases
    with team_server(tmp_path / "server", tracking_db, auth_db) as url:
        check_team_server(project, tmp_path / "server", url)


def check_team_server(project: Path, server_dir: Path, url: str) -> None:
    assert status_without_credentials(url) == 401  # the door is shut to anonymous requests
    create_user(url, USER)

    # No credentials: training stops with the store named (asked while the data loads, its error comes first).
    anonymous = run(stage_cmd(project, "train"), project, env={"MLFLOW_TRACKING_URI": url}, check=False)
    assert anonymous.returncode == 2 and "Traceback" not in anonymous.stderr, anonymous.stderr
    assert url in anonymous.stderr and "Nothing was trained" in anonymous.stderr

    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": USER[1]}
    run(["dvc", "repro"], project, env=env)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("cifar10")
        [r] = client.search_runs([exp.experiment_id])
        run_id = r.info.run_id
        assert run_id == (project / "outputs/run_id.txt").read_text().strip()
        assert r.info.status == "FINISHED"
        assert r.data.params["train.epochs"] == "2" and r.data.params["model.name"] == "course_cnn"
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
        assert len(client.get_metric_history(run_id, "test_accuracy")) == 1
        # Served artifacts: the client sends them to the server, which alone writes its folder.
        assert r.info.artifact_uri.startswith("mlflow-artifacts:/"), r.info.artifact_uri
        assert sorted(checkpoint_models(client, run_id)) == [1, 2] and 2 in kept_checkpoints(client, run_id)
        kept = kept_checkpoints(client, run_id)
        [model] = pyfunc_models(client, exp.experiment_id)
        assert (model.source_run_id, model.status.name) == (run_id, "READY")
        assert model.artifact_location.startswith("mlflow-artifacts:/")
        [version] = client.search_model_versions("name = 'cifar10-classifier'")
        assert version.run_id == run_id and version.tags.get("test_accuracy")
        import mlflow.pyfunc

        mp.setenv("MLFLOW_TRACKING_URI", url)
        assert mlflow.pyfunc.load_model(model.model_uri) is not None  # downloadable by a teammate
    files = [p.name for p in (server_dir / "artifacts").rglob("*") if p.is_file()]
    assert {"checkpoint.pt", "history.csv", "MLmodel", "model_card.md"} <= set(files)
    assert files.count("checkpoint.pt") == len(kept)  # a file removed through the server is gone from its folder
    assert not (project / "mlruns").exists() and not (project / "mlartifacts").exists()
    assert not (project / "mlflow.db").exists()
    assert status_without_credentials(url) == 401
