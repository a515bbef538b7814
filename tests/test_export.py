"""cifarpipe-export: the inference path as one ONNX or .pt2 graph (uint8 images in, probabilities
out, the normalisation inside), checked against the MLflow model and against a textbook
normalisation written here, on a tiny project trained once for the module (real `dvc repro`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from conftest import evaluation_images, reproduced_project, textbook_logits, use_store_of
from cifarpipe.commands import export as export_command
from cifarpipe.config import UserError
from cifarpipe.serving import export
from cifarpipe.serving.inference import Classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_archive):
    project = reproduced_project(tmp_path_factory.mktemp("export"), tiny_archive)
    images, labels = evaluation_images(project)
    return project, (project / "outputs/run_id.txt").read_text().strip(), images, labels


@pytest.fixture
def in_project(trained, monkeypatch):
    return use_store_of(trained[0], monkeypatch)


def textbook_probabilities(project: Path, images: np.ndarray) -> np.ndarray:
    return torch.softmax(textbook_logits(project, images)[0], 1).numpy()


def test_onnx_of_the_weights_file_runs_in_onnxruntime_with_any_batch_and_gives_the_models_probabilities(
        trained, in_project, capsys):
    project, _, images, labels = trained
    assert export_command.main(["--format", "onnx", "--check", "data/cifar10.npz"]) == 0
    out = capsys.readouterr().out
    assert f"same class for {len(labels)} of {len(labels)}" in out and "check passed" in out, out

    path = project / "outputs/model.onnx"
    proto = onnx.load(path)
    [inp], [outp] = proto.graph.input, proto.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [32, 32, 3]
    assert inp.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    classes = json.loads({p.key: p.value for p in proto.metadata_props}["classes"])
    assert classes == torch.load(project / "outputs/model.pt", weights_only=True)["classes"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = textbook_probabilities(project, images)
    for n in (1, 7, len(images)):
        [probs] = session.run([outp.name], {"images": np.ascontiguousarray(images[:n])})
        assert probs.shape == (n, len(classes)) and probs.dtype == np.float32
        assert np.abs(probs - reference[:n]).max() < 1e-5
        assert (probs.argmax(1) == reference[:n].argmax(1)).all()


def test_pt2_of_the_mlflow_model_matches_its_predict_and_refuses_float_input(trained, in_project, capsys):
    import mlflow

    project, run_id, images, _ = trained
    out_file = project / "exported" / "model.pt2"
    assert export_command.main(["--format", "pt2", "--run", run_id, "--out", str(out_file),
                                "--check", "data/cifar10.npz"]) == 0
    assert "check passed" in capsys.readouterr().out
    extra = {"classes.json": ""}
    module = torch.export.load(str(out_file), extra_files=extra).module()
    classes = json.loads(extra["classes.json"])
    predicted = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(images)
    with torch.no_grad():
        probs = module(torch.from_numpy(np.array(images))).numpy()
    assert np.abs(probs - predicted[[f"prob_{c}" for c in classes]].to_numpy()).max() < 1e-6
    assert list(np.array(classes)[probs.argmax(1)]) == list(predicted["class"])
    with pytest.raises(Exception, match="(?i)dtype"):
        module(torch.zeros(2, 32, 32, 3))


def test_the_check_fails_for_a_graph_that_normalises_differently(trained, in_project, capsys):
    project, _, _, _ = trained
    good = Classifier.from_weights(torch.load(project / "outputs/model.pt", weights_only=True))
    shifted = Classifier(good.network, [m + 0.2 for m in good.mean], good.std, good.classes)
    data = export.export_bytes(shifted, "pt2")
    assert not export_command.check(data, "pt2", good.probabilities, good.classes, Path("data/cifar10.npz"), 1e-4)
    assert "check FAILED" in capsys.readouterr().out


def test_onnx_without_its_packages_names_the_extra(trained, monkeypatch):
    project = trained[0]
    classifier = Classifier.from_weights(torch.load(project / "outputs/model.pt", weights_only=True))
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails as if it were not installed
    with pytest.raises(UserError, match=r"cifarpipe\[onnx\]"):
        export.export_bytes(classifier, "onnx")


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_model_with_test_time_views_is_exported_with_them(trained, in_project, fmt):
    """model.tta flip_translate: the graph averages the 6 views as the MLflow model's Classifier does."""
    project, _, images, _ = trained
    plain = Classifier.from_weights(torch.load(project / "outputs/model.pt", weights_only=True))
    views = Classifier(plain.network, plain.mean, plain.std, plain.classes, tta="flip_translate")
    run_file, _ = export.load_runner(export.export_bytes(views, fmt), fmt)
    got, want = run_file(images), views.probabilities(images)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - plain.probabilities(images)).max() > 1e-3  # the views change the probabilities
