"""Checkpoints as MLflow LoggedModels, the @champion alias and the model card.

Through the real stages first (`dvc repro`, 3 epochs, tiny data, a real SQLite store; `-m slow`:
a second run by `dvc exp run` and the champion between the two); then the rules against a store
directly: a store that fails while checkpoint models are logged, the journal's delivery of them,
the alias rule's cases, and the card's text.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conftest import kept_checkpoints, reproduced_project, run
from cifarpipe import model_card
from cifarpipe.tracking import checkpoints, registry
from cifarpipe.tracking.job import open_run
from cifarpipe.tracking.delivery import deliver
from cifarpipe.tracking.journal import Journal
from cifarpipe.tracking.run import EPOCH_METRICS

EPOCHS = 3
MODEL = "cifar10-classifier"  # params.yaml's tracking.registered_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_archive):
    """A finished run (`dvc repro`, 3 epochs) in a project copy; the slow test adds a second."""
    project = reproduced_project(tmp_path_factory.mktemp("logged_models"), tiny_archive, **{"train.epochs": EPOCHS})
    first = (project / "outputs/run_id.txt").read_text().strip()
    return project, MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), [first]


def val_history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy"))


def test_every_epoch_is_a_checkpoint_model_linked_at_its_step_with_its_metrics_and_datasets(trained):
    project, client, runs = trained
    history = pd.read_csv(project / "outputs/history.csv")  # the workspace's: the second run's
    for run_id in runs:
        r = client.get_run(run_id)
        digests = {i.tags[0].value: i.dataset.digest for i in r.inputs.dataset_inputs}
        models = checkpoints.find(client, r.info.experiment_id, run_id)
        assert sorted(models) == list(range(1, EPOCHS + 1))
        steps = sorted(o.step for o in r.outputs.model_outputs if o.model_id in {m.model_id for m in models.values()})
        assert steps == list(range(1, EPOCHS + 1))  # each linked once, at its epoch
        for epoch, m in models.items():
            assert (m.name, m.model_type, m.status.name, m.params) == (f"checkpoint-epoch-{epoch}", "checkpoint",
                                                                       "READY", {"epoch": str(epoch)})
            linked = {x.key: x for x in m.metrics}
            assert sorted(linked) == sorted(EPOCH_METRICS) and {x.step for x in m.metrics} == {epoch}
            assert linked["val_accuracy"].dataset_digest == digests["validation"]
            assert linked["val_loss"].dataset_digest == digests["validation"]
            assert linked["train_loss"].dataset_digest == digests["training"]
            assert linked["lr"].dataset_digest is None and linked["val_accuracy"].dataset_name == "cifar10"
            if run_id == runs[-1]:
                assert linked["val_accuracy"].value == pytest.approx(history.loc[epoch - 1, "val_accuracy"], abs=1e-12)
        for key in EPOCH_METRICS:  # the run's own curves: every epoch once
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, EPOCHS + 1))


def test_the_documented_search_finds_the_best_checkpoint_and_its_file_is_best_pt(trained, tmp_path):
    project, client, runs = trained
    import mlflow.artifacts

    for run_id in runs:
        r = client.get_run(run_id)
        exp_id = r.info.experiment_id
        # as docs/2-tracking-and-comparing-runs.md gives it
        best = client.search_logged_models(
            experiment_ids=[exp_id],
            filter_string=f"source_run_id = '{run_id}' AND model_type = 'checkpoint'",
            order_by=[{"field_name": "metrics.val_accuracy", "ascending": False},
                      {"field_name": "creation_timestamp", "ascending": True}],
            max_results=1)[0]
        history = val_history(client, run_id)
        best_epoch = max(history, key=lambda sv: sv[1])[0]  # the first epoch with the highest value
        assert int(best.params["epoch"]) == best_epoch
        assert kept_checkpoints(client, run_id) == sorted({best_epoch, EPOCHS})
        folder = mlflow.artifacts.download_artifacts(artifact_uri=best.artifact_location, dst_path=str(tmp_path / run_id),
                                                     tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
        downloaded = torch.load(Path(folder) / "checkpoint.pt", weights_only=True)
        on_disk = torch.load(project / "outputs/checkpoints" / r.data.tags["fingerprint"] / "best.pt", weights_only=True)
        assert downloaded["epoch"] == best_epoch == on_disk["epoch"]
        assert all(torch.equal(downloaded["model_state_dict"][k], v) for k, v in on_disk["model_state_dict"].items())
        # the files waiting for upload are gone once the job is done
        assert not (project / "outputs/checkpoints" / r.data.tags["fingerprint"] / checkpoints.SNAPSHOT_DIR).exists()
    overall = client.search_logged_models(
        experiment_ids=[exp_id], filter_string="model_type = 'checkpoint'",
        order_by=[{"field_name": "metrics.val_accuracy", "ascending": False}], max_results=1)[0]
    values = {m.key: m.value for m in overall.metrics}
    assert values["val_accuracy"] == max(v for run_id in runs for _, v in val_history(client, run_id))


def test_the_experiment_is_created_as_a_model_training_experiment(trained):
    _, client, runs = trained
    exp = client.get_experiment(client.get_run(runs[0]).info.experiment_id)
    assert exp.name == "cifar10" and exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_first_version_is_the_champion_with_its_validation_accuracy(trained):
    _, client, runs = trained
    [mv] = client.search_model_versions(f"name = '{MODEL}'")
    mv = client.get_model_version(MODEL, mv.version)
    r = client.get_run(runs[0])
    weights_epoch = int(r.data.tags["weights_epoch"])  # evaluate.weights' epoch: what was registered
    val = dict(val_history(client, runs[0]))[weights_epoch]
    assert val == r.data.metrics["model_val_accuracy"]
    assert mv.run_id == runs[0] and float(mv.tags["val_accuracy"]) == pytest.approx(val, abs=1e-4)
    assert client.get_registered_model(MODEL).aliases == {"champion": int(mv.version)}
    assert mv.tags["champion_rule"] == f"@champion -> version {mv.version} (validation accuracy " \
                                       f"{float(mv.tags['val_accuracy']):.4f}; no champion before)"


def test_the_model_card_is_the_version_description_and_an_artifact_of_the_run_and_its_model(trained, tmp_path):
    project, client, runs = trained
    run_id = runs[-1]  # the workspace's outputs are this run's
    [mv] = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run_id}'")
    description = client.get_model_version(MODEL, mv.version).description
    card = Path(client.download_artifacts(run_id, "model_card.md", str(tmp_path / "run"))).read_text()
    model_id = mv.source.removeprefix("models:/")
    model_files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    import mlflow.artifacts
    in_model = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{client.get_logged_model(model_id).artifact_location}/model_card.md",
        dst_path=str(tmp_path / "model"))).read_text()
    assert description == card == in_model and "model_card.md" in model_files and "MLmodel" in model_files

    metrics = json.loads((project / "outputs/metrics.json").read_text())
    params = client.get_run(run_id).data.params
    per_class = pd.read_csv(project / "outputs/per_class.csv")
    assert card.startswith(f"# Model card: {MODEL} version {mv.version}\n")
    assert f"Test accuracy **{metrics['accuracy']:.4f}**, loss {metrics['loss']:.4f}, on 100 images." in card
    for cls, support, correct, accuracy, precision in per_class.itertuples(index=False):
        assert f"| {cls} | {support} | {correct} | {accuracy:.3f} | {precision:.3f} |" in card
    assert f"MD5 `{params['data.md5']}`" in card and "method `course`, seed 2025, validation fraction 0.15" in card
    assert "| training | 425 |" in card and "| validation | 75 |" in card and "| test | 100 |" in card
    assert "| `train.optimizer.lr` | `0.001` |" in card and "| `train.epochs` | `3` |" in card
    history = val_history(client, run_id)
    best = max(history, key=lambda sv: sv[1])
    assert f"Best validation accuracy {best[1]:.4f}, at epoch {best[0]}" in card
    weights_epoch = int(client.get_run(run_id).data.tags["weights_epoch"])
    assert f"This model holds the weights of epoch {weights_epoch} (evaluate.weights `best`): validation " \
           f"accuracy {dict(history)[weights_epoch]:.4f}" in card
    assert f'models:/{MODEL}@champion' in card and "32x32 RGB images into the 10 CIFAR-10 classes" in card


# ---------------------------------------------------------------- against a store directly

class FlakyClient:
    """A real client whose metric logging fails while `down` is set (`models_down`: model creation too)."""

    def __init__(self, real: MlflowClient) -> None:
        self.real, self.down, self.models_down = real, False, False

    def log_batch(self, run_id, metrics=(), **kw):
        if self.down and metrics:
            raise ConnectionError("store unreachable")
        return self.real.log_batch(run_id, metrics=metrics, **kw)

    def create_logged_model(self, *args, **kw):
        if self.models_down:
            raise ConnectionError("store unreachable")
        return self.real.create_logged_model(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def row(epoch: int, val_accuracy: float) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.5, "val_loss": 2.0 / epoch,
            "val_accuracy": val_accuracy, "lr": 1e-3, "epoch_seconds": 1.0, "images_per_second": 100.0}


def epoch_end(logger, history: list[dict], last: Path) -> None:
    """What the train stage does at an epoch's end: last.pt written, then its model and metrics queued."""
    torch.save({"epoch": history[-1]["epoch"]}, last)
    logger.checkpoints.add_epoch(history, last)
    logger.queue_history(history[-1:])
    logger._wait_queue(30)


class Killed(BaseException):
    """A SIGKILL's stand-in: nothing after it runs."""


def test_a_checkpoint_file_whose_upload_was_cut_short_is_removed_once_its_epoch_is_not_kept(tmp_path, monkeypatch):
    """A process killed after the file reached the store, before the tag that says so (train's
    MLflow process dies with its stage at any moment): the file must not stay for good in the
    model of an epoch that is neither the best nor the last."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run("0").info.run_id
    files = {}
    for epoch in (1, 2):
        files[epoch] = tmp_path / f"epoch-{epoch}.pt"
        torch.save({"epoch": epoch}, files[epoch])
    upload = checkpoints._upload

    def upload_then_killed(*args) -> None:
        upload(*args)
        raise Killed

    monkeypatch.setattr(checkpoints, "_upload", upload_then_killed)
    with pytest.raises(Killed):
        checkpoints.keep_files(client, run_id, "0", {1: files[1]}, keep={1})
    assert kept_checkpoints(client, run_id) == [1]  # the file is in the store, its tag not "kept"
    monkeypatch.setattr(checkpoints, "_upload", upload)
    checkpoints.keep_files(client, run_id, "0", {2: files[2]}, keep={2})  # the resumed job: epoch 2 is best and last
    assert kept_checkpoints(client, run_id) == [2]
    assert checkpoints.find(client, "0", run_id)[1].tags[checkpoints.FILE_TAG] == checkpoints.REMOVED


def test_checkpoint_models_of_epochs_the_store_missed_land_once_it_answers(tmp_path):
    real = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    flaky = FlakyClient(real)
    logger = open_run(flaky, "test", None, journal=Journal(tmp_path / "pending.json"))
    job = tmp_path / "job"
    job.mkdir()
    logger.checkpoints = checkpoints.CheckpointLog(flaky, logger.run_id, {"validation": ["cifar10", "d-val"]},
                                                   job / checkpoints.SNAPSHOT_DIR)
    history = [row(1, 0.5)]
    epoch_end(logger, history, job / "last.pt")
    flaky.down = True  # epoch 2's metrics fail after its model was made: the model waits, PENDING
    history.append(row(2, 0.6))
    epoch_end(logger, history, job / "last.pt")
    exp_id = real.get_run(logger.run_id).info.experiment_id
    waiting = checkpoints.find(real, exp_id, logger.run_id)
    assert waiting[2].status.name == "PENDING" and not waiting[2].metrics
    assert [p.name for p in (job / checkpoints.SNAPSHOT_DIR).iterdir()] == ["epoch-2.pt"]  # kept for the retry
    flaky.down, flaky.models_down = False, False
    history.append(row(3, 0.4))
    epoch_end(logger, history, job / "last.pt")
    models = checkpoints.find(real, exp_id, logger.run_id)
    assert models[2].model_id == waiting[2].model_id  # the same model, finished: no second one for epoch 2
    assert {e: m.status.name for e, m in models.items()} == {1: "READY", 2: "READY", 3: "READY"}
    assert kept_checkpoints(real, logger.run_id) == [2, 3]  # the best (0.6) and the last keep the file
    assert models[1].tags["checkpoint_file"] == checkpoints.REMOVED
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in real.get_metric_history(logger.run_id, key)) == [1, 2, 3]
    assert [x.dataset_digest for x in models[2].metrics if x.key == "val_accuracy"] == ["d-val"]

    # Down for good at epoch 4: the journal gets its model and metrics, delivered later, once.
    flaky.down = flaky.models_down = True
    history.append(row(4, 0.7))
    epoch_end(logger, history, job / "last.pt")
    assert not logger.drain(attempts=1, pause_s=0.01)
    [item] = logger.journal.items
    assert (item["kind"], item["epochs"], len(item["metrics"])) == ("checkpoints", [4], len(EPOCH_METRICS))
    assert logger.checkpoints.discard() == [4]  # its file never reached the store
    assert deliver(real, logger.journal) == 0
    logger.journal.add(item)  # its answer lost: delivered again
    assert deliver(real, logger.journal) == 0
    models = checkpoints.find(real, exp_id, logger.run_id)
    assert sorted(models) == [1, 2, 3, 4] and models[4].status.name == "READY"
    assert len(real.search_logged_models([exp_id])) == 4
    assert sorted(m.step for m in real.get_metric_history(logger.run_id, "val_accuracy")) == [1, 2, 3, 4]
    assert sorted((x.key, x.step) for x in models[4].metrics) == sorted((k, 4) for k in EPOCH_METRICS)
    logger.finish()


def test_a_model_a_kill_left_unlinked_is_linked_to_its_step_once(tmp_path):
    """Killed between making an epoch's model and linking it to the run: the resumed job finishes
    that model (found by its epoch) and links it, once however often it is delivered."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x")
    run_id = client.create_run(exp).info.run_id
    left = client.create_logged_model(exp, name=checkpoints.model_name(1), source_run_id=run_id, params={"epoch": "1"},
                                      model_type=checkpoints.CHECKPOINT_TYPE)  # PENDING, no link
    for _ in range(2):
        models = checkpoints.log_epochs(client, run_id, exp, epochs=[1, 2])
    assert models[1].model_id == left.model_id
    links = sorted((o.step, o.model_id) for o in client.get_run(run_id).outputs.model_outputs)
    assert links == sorted([(1, left.model_id), (2, models[2].model_id)])
    assert {e: m.status.name for e, m in checkpoints.find(client, exp, run_id).items()} == {1: "READY", 2: "READY"}


def test_the_champion_moves_only_to_a_higher_validation_accuracy_once_per_version(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x")

    def version(val: float | None, tagged: bool = True) -> str:
        run_id = client.create_run(exp).info.run_id
        if val is not None:
            client.log_batch(run_id, metrics=[Metric("val_accuracy", val, int(time.time() * 1000), 1)])
        tags = {registry.VAL_ACCURACY_TAG: val} if tagged and val is not None else None
        return registry.register_model_version(client, "m", run_id, f"runs:/{run_id}/model", tags=tags)

    def champion() -> int:
        return client.get_registered_model("m").aliases["champion"]

    v1 = version(0.5)
    assert "no champion before" in registry.update_champion(client, "m", v1) and champion() == 1
    v2 = version(0.4)
    assert registry.update_champion(client, "m", v2) == "@champion stays on version 1 (validation accuracy " \
                                                       "0.5000 >= version 2's 0.4000)" and champion() == 1
    v3 = version(0.5)  # equal is no improvement
    assert "stays on version 1" in registry.update_champion(client, "m", v3) and champion() == 1
    v4 = version(0.6, tagged=False)  # no tag: its run's last val_accuracy counts
    assert registry.update_champion(client, "m", v4).startswith("@champion -> version 4") and champion() == 4
    client.set_registered_model_alias("m", "champion", v2)  # moved by hand: the next version must beat it
    v5 = version(0.45)
    assert registry.update_champion(client, "m", v5).startswith("@champion -> version 5") and champion() == 5
    client.set_registered_model_alias("m", "champion", v1)
    assert "-> version 5" in registry.update_champion(client, "m", v5) and champion() == 1  # once per version
    v6 = version(None)
    assert "has no validation accuracy" in registry.update_champion(client, "m", v6) and champion() == 1
    assert client.get_model_version("m", v2).tags["champion_rule"].startswith("@champion stays")


def card_facts(**changes) -> model_card.CardFacts:
    facts = dict(run_id="abc123", run_name="lr-3e-3",
                 params={"model.name": "course_cnn", "model.width": "64", "model.tta": "none", "train.epochs": "2",
                         "split.method": "hash", "split.seed": "7", "split.val_fraction": "0.1", "data.url": "u",
                         "data.md5": "m" * 32, "tracking.experiment": "cifar10", "recipe": "fast"},
                 tags={"data_md5": "m" * 32, "split_hash": "s" * 16, "mlflow.source.git.commit": "c" * 40,
                       "git_dirty_code": "true", "device": "cpu", "torch": "2.14.1"},
                 classes=["cat", "dog"], sizes={"training": 9, "validation": 1}, digests={"training": "d1"},
                 validation=[(1, 0.5, 1.2), (2, 0.75, 0.9)])
    return model_card.CardFacts(**{**facts, **changes})


def test_the_card_says_what_is_known_and_nothing_else():
    text = model_card.render(card_facts())
    assert text.startswith("# Model card: run lr-3e-3\n") and "runs:/<run id>/model" in text
    assert "Not evaluated yet" in text and "| class |" not in text
    assert "into the 2 CIFAR-10 classes: `cat`, `dog`." in text
    assert "| training | 9 | `d1` |" in text and "| test |" not in text
    assert "Best validation accuracy 0.7500, at epoch 2" in text
    assert "2 epochs trained. This model holds the weights of epoch 2: validation accuracy 0.7500" in text
    assert "| `recipe` | `fast` |" in text and "`tracking.experiment`" not in text  # the training's params only
    assert "with uncommitted code changes" in text and "method `hash`, seed 7" in text
    done = model_card.render(card_facts(
        registered="cifar10-classifier version 4", sizes={"training": 9, "validation": 1, "test": 2},
        test={"test_accuracy": 0.5, "test_loss": 0.7}, validation=[(1, 0.8, 1.0), (2, 0.75, 0.9)],
        tags={"weights": "best", "weights_epoch": "1", "stopped_early_at": "2", "mlflow.source.git.commit": "c" * 40},
        per_class=[{"class": "cat", "support": 1, "correct": 1, "accuracy": 1.0, "precision": 0.5},
                   {"class": "dog", "support": 1, "correct": 0, "accuracy": 0.0, "precision": 0.0}]))
    assert done.startswith("# Model card: cifar10-classifier version 4\n")
    assert 'mlflow.pyfunc.load_model("models:/cifar10-classifier@champion")' in done
    assert "Test accuracy **0.5000**, loss 0.7000, on 2 images." in done and "Not evaluated" not in done
    assert "| dog | 1 | 0 | 0.000 | 0.000 |" in done and "Weakest class: `dog` (0.000)." in done
    assert "2 epochs trained, stopped early at epoch 2. This model holds the weights of epoch 1 (evaluate.weights " \
           "`best`): validation accuracy 0.8000, loss 1.0000." in done


@pytest.mark.slow  # a second training (about a minute on 2 cores); the rule's cases run in the default set above
def test_a_second_run_takes_the_champion_only_with_a_higher_validation_accuracy(trained):
    project, client, runs = trained
    run(["dvc", "exp", "run", "-S", "train.optimizer.lr=0.003"], project)
    second = (project / "outputs/run_id.txt").read_text().strip()
    assert second not in runs
    versions = {mv.run_id: client.get_model_version(MODEL, mv.version)
                for mv in client.search_model_versions(f"name = '{MODEL}'")}
    first, new = versions[runs[0]], versions[second]
    assert (str(first.version), str(new.version)) == ("1", "2")
    assert float(new.tags["val_accuracy"]) == pytest.approx(client.get_run(second).data.metrics["model_val_accuracy"],
                                                           abs=1e-4)
    higher = float(new.tags["val_accuracy"]) > float(first.tags["val_accuracy"])
    assert client.get_registered_model(MODEL).aliases == {"champion": 2 if higher else 1}
    assert new.tags["champion_rule"].startswith("@champion -> version 2" if higher else "@champion stays on version 1")
    assert len(checkpoints.find(client, client.get_run(second).info.experiment_id, second)) == EPOCHS


def test_gc_keeps_the_checkpoint_model_with_the_file_among_equal_accuracies(tmp_path):
    """cifarpipe-gc keeps one checkpoint file per FINISHED run, the best model's: among equal
    validation accuracies the model that holds the file (the first epoch that reached it), whatever
    the search order; a model without a file (epoch 2's) is left alone."""
    from cifarpipe.tracking import cleanup

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x")
    run_id = client.create_run(exp).info.run_id
    ids = {}
    for epoch, val, tag in ((1, 0.6, checkpoints.KEPT), (2, 0.6, checkpoints.REMOVED), (3, 0.5, checkpoints.KEPT)):
        m = client.create_logged_model(exp, name=checkpoints.model_name(epoch), source_run_id=run_id,
                                       params={"epoch": str(epoch)}, model_type=checkpoints.CHECKPOINT_TYPE)
        client.log_batch(run_id, metrics=[Metric("val_accuracy", val, int(time.time() * 1000), epoch, model_id=m.model_id)])
        client.set_logged_model_tags(m.model_id, {checkpoints.FILE_TAG: tag})
        if tag == checkpoints.KEPT:
            (tmp_path / checkpoints.CHECKPOINT_FILE).write_bytes(b"x" * 100)
            client.log_model_artifact(m.model_id, str(tmp_path / checkpoints.CHECKPOINT_FILE))
        client.finalize_logged_model(m.model_id, "READY")
        ids[epoch] = m.model_id
    client.set_terminated(run_id)
    removed = {item.model_id for item in cleanup.removable(client) if item.model_id}
    assert removed == {ids[3]}
