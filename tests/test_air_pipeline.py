"""The air recipe (shrunk) through the real stages: `dvc repro`, MLflow, a SIGKILL mid-epoch and the
resume, the graphed-style step, and the logged model's test-time views. Slow: five trainings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, git_commit, make_project, run, serve_folder, stage_cmd
from cifarpipe.config import load_params, with_overrides
from test_resume import assert_same_as_uninterrupted, job_dir, runs_of

pytestmark = pytest.mark.slow

# recipes/air.yaml on 425 training images: 13 steps of 32 per epoch, 3 epochs (39 steps, Lookahead
# at 5, 10, ..., 35 and 39), the whitening bias trained in epoch 1 only.
SHRINK = ["model.width=8", "train.batch_size=32", "train.epochs=3", "train.optimizer.whiten_bias_epochs=1",
          "train.kernel_warmup_steps=2", "evaluate.batch_size=50"]


def use_air(project: Path, *extra: str) -> None:
    """params.yaml with the air recipe's values in force (shrunk), keeping the project's data section."""
    path = project / "params.yaml"
    own = yaml.safe_load(path.read_text())
    air = with_overrides(load_params(REPO / "params.yaml", recipe="air"), [*SHRINK, *extra]).model_dump(mode="json")
    air.update(recipe="course", data=own["data"], split=own["split"])
    path.write_text(yaml.safe_dump(air, sort_keys=False))
    git_commit(project, "air recipe, shrunk")


@pytest.fixture(scope="module")
def air(tmp_path_factory, tiny_archive):
    base = tmp_path_factory.mktemp("air")
    with serve_folder(base / "www") as server:
        seed = make_project(base / "seed", *tiny_archive, server)
        use_air(seed)
        run(["dvc", "repro", "split"], seed)
        git_commit(seed, "data stages done")
        done = base / "uninterrupted"
        shutil.copytree(seed, done, symlinks=True)
        out = run(["dvc", "repro"], done).stdout
        yield seed, done, out


def test_the_air_recipe_trains_through_the_stages_into_one_run_with_its_views_in_the_model(air):
    _, done, out = air
    assert "training airnet on cpu for 3 epochs" in out
    assert "whitening layer computed from the training images" in out and "kernel warm-up: 2 steps, undone" in out
    client, runs = runs_of(done)
    assert [r.info.status for r in runs] == ["FINISHED"]
    params = runs[0].data.params
    assert (params["model.tta"], params["train.scheduler.name"], params["train.lookahead.every"]) == \
        ("flip_translate", "linear", "5")
    lrs = [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, "lr"), key=lambda m: m.step)]
    assert lrs[-1] == pytest.approx(1.5 * 0.07, rel=1e-6)  # the last step's rate, per the linear schedule
    ckpt = torch.load(job_dir(done) / "last.pt", weights_only=True)
    assert ckpt["schedule_step"] == 39 and ckpt["complete"] and ckpt["lookahead_state_dict"]["slow"]
    weights = torch.load(done / "outputs/model.pt", weights_only=True)
    assert weights["model"]["tta"] == "flip_translate"
    # The logged MLflow model is evaluate's inference path, views included.
    mlflow.set_tracking_uri(f"sqlite:///{done / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{runs[0].info.run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    with np.load(done / "data/cifar10.npz") as z:
        images = z["test_images"]
    evaluated = pd.read_csv(done / "outputs/confusion.csv")["predicted"].to_numpy()
    assert (model.predict(images)["class"].to_numpy() == evaluated).all()
    assert model.unwrap_python_model().classifier.tta == "flip_translate"


def test_a_sigkill_in_the_middle_of_an_epoch_resumes_the_air_recipe_bit_for_bit(air, tmp_path):
    seed, done, _ = air
    project = tmp_path / "p"
    shutil.copytree(seed, project, symlinks=True)
    killed = run(["dvc", "repro"], project, env={"CIFARPIPE_FAULT": "step:2:7"}, check=False)
    assert killed.returncode != 0
    stopped = run(stage_cmd(project, "train"), project, env={"CIFARPIPE_FAULT": "step:3:4:INT"}, check=False)
    assert stopped.returncode == 130 and "resuming from outputs/checkpoints/" in stopped.stdout
    ckpt = torch.load(job_dir(project) / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["schedule_step"]) == (2, 4, 30)  # inside epoch 3, rates at step 30
    resumed = run(["dvc", "repro"], project).stdout
    assert "epoch 3, batch 4" in resumed and "whitening layer" not in resumed  # the filters came from the checkpoint
    assert_same_as_uninterrupted(project, done)


def test_the_graphed_style_step_trains_the_same_as_the_eager_one_through_the_stages(air, tmp_path):
    seed, done, _ = air
    project = tmp_path / "p"
    shutil.copytree(seed, project, symlinks=True)
    use_air(project, "train.cuda_graph=true")
    run(["dvc", "repro"], project)
    a = torch.load(project / "outputs/model.pt", weights_only=True)["state_dict"]
    b = torch.load(done / "outputs/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((project / "outputs/metrics.json").read_text()) == \
        json.loads((done / "outputs/metrics.json").read_text())
