"""Shared fixtures: tiny official-format archives, a loopback HTTP server, a shrunk project copy."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cifarpipe.config import ModelParams
from cifarpipe.training.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from cifar_archive import build_archive  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's bin/: `python`, `dvc`, `mlflow` of this install


@dataclass
class Server:
    root: Path
    url: str
    requests: list[str] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # status codes to answer before serving normally


class _Handler(http.server.SimpleHTTPRequestHandler):
    server_state: Server

    def do_GET(self) -> None:
        self.server_state.requests.append(self.path)
        if self.server_state.fail_next:
            self.send_error(self.server_state.fail_next.pop(0))
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[Server]:
    """A loopback HTTP server over `root`; records request paths."""
    root.mkdir(parents=True, exist_ok=True)
    state = Server(root, "")
    handler = type("Handler", (_Handler,), {"server_state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[Server]:
    with serve_folder(tmp_path / "www") as server:
        yield server


def stage_cmd(project: Path, stage: str) -> list[str]:
    """A stage's command exactly as dvc.yaml (the one place for paths) spells it."""
    return shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"])


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> tuple[Path, str]:
    """500 train / 100 test images in the official layout, and the archive's MD5."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    return path, build_archive(path)


def user_env(env: dict | None = None) -> dict[str, str]:
    """The environment a user's command gets: this environment's tools first on PATH, no MLflow
    store or run of the caller's, then `env`."""
    # A git identity for the commits `dvc exp run` makes, on machines that have none configured.
    identity = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.com"}
    full_env = {**identity, **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1"}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.pop("MLFLOW_RUN_ID", None)
    return {**full_env, **(env or {})}


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 600
        ) -> subprocess.CompletedProcess:
    """Run a command the way a user would, with this environment's tools first on PATH."""
    proc = subprocess.run(cmd, cwd=cwd, env=user_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def process_state(pid: int) -> str | None:
    """A process's state letter in /proc (R, S, T: stopped, Z: zombie), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")  # a zombie (exited, not yet reaped) is gone too


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not alive(pid)


def set_params(project: Path, **dotted) -> None:
    """Shrink or change the real params.yaml: set_params(p, **{"train.epochs": 2})."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def git_commit(project: Path, message: str = "test state") -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=test", "commit", "-qm", message], project)


def make_project(dest: Path, archive: Path, md5: str, server: Server) -> Path:
    """A git repo holding a copy of this project (its tracked files), with the real params.yaml
    shrunk: the tiny archive served over loopback HTTP, course_cnn, 2 epochs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith("tests/") or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    shutil.copy(archive, server.root / archive.name)
    set_params(dest, **{"data.url": f"{server.url}/{archive.name}", "data.md5": md5, "data.retries": 0,
                        "model.name": "course_cnn", "train.epochs": 2, "train.batch_size": 32,
                        "train.log_every": 0, "evaluate.batch_size": 50})
    run(["git", "init", "-q"], dest)
    git_commit(dest, "project copy")
    return dest


def reproduced_project(root: Path, archive: tuple[Path, str], **params) -> Path:
    """A project copy under `root` after `dvc repro`, the tiny archive served while it downloads;
    `params`: dotted values set (set_params) and committed first."""
    with serve_folder(root / "www") as server:
        project = make_project(root / "project", *archive, server)
        if params:
            set_params(project, **params)
            git_commit(project, "test params")
        run(["dvc", "repro"], project)
    return project


def evaluation_images(project: Path) -> tuple[np.ndarray, np.ndarray]:
    """The project's test images (uint8 NHWC) and labels, from the download stage's arrays."""
    with np.load(project / "data/cifar10.npz") as z:
        return z["test_images"], z["test_labels"]


def textbook_logits(project: Path, images: np.ndarray) -> tuple[torch.Tensor, list[str]]:
    """The network from outputs/model.pt on (x / 255 - mean) / std, the textbook normalisation
    written here independently of the library's; and the class names."""
    weights = torch.load(project / "outputs/model.pt", weights_only=True)
    model = build_model(ModelParams(**weights["model"]))
    model.load_state_dict(weights["state_dict"])
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(weights["mean"]).view(1, 3, 1, 1)) / torch.tensor(weights["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()(x), weights["classes"]


def use_store_of(project: Path, monkeypatch) -> Path:
    """Work in `project` with its MLflow store, as a user of it would (cwd and MLFLOW_TRACKING_URI)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.chdir(project)
    return project


@pytest.fixture
def project(tmp_path: Path, tiny_archive, http_server: Server) -> Path:
    return make_project(tmp_path / "project", *tiny_archive, http_server)


def checkpoint_models(client, run_id: str) -> dict[int, tuple[str, list[str]]]:
    """The run's checkpoint LoggedModels (tracking.checkpoints): epoch -> (status, its files)."""
    exp_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}' AND "
                                                                  "model_type = 'checkpoint'")
    out = {int(m.params["epoch"]): (m.status.name, sorted(a.path for a in client.list_logged_model_artifacts(m.model_id)))
           for m in models}
    assert len(out) == len(models), "one checkpoint model per epoch"
    return out


def kept_checkpoints(client, run_id: str) -> list[int]:
    """The epochs whose checkpoint models hold the file (the best's and the last's)."""
    return sorted(e for e, (_, files) in checkpoint_models(client, run_id).items() if files == ["checkpoint.pt"])


def pyfunc_models(client, experiment_id: str) -> list:
    """The experiment's LoggedModels other than the epochs' checkpoints: the runs' MLflow models.
    (Filtered here: a search's `model_type != 'checkpoint'` also drops models without a type.)"""
    return [m for m in client.search_logged_models([experiment_id]) if m.model_type != "checkpoint"]
