"""The logged MLflow model as the inference path (uint8 images in, classes out) and the predict command.

One tiny project is trained once for the module (real `dvc repro`); the tests compare the MLflow
model, `mlflow models predict`, `mlflow models serve` and the predict command with the network
rebuilt from outputs/model.pt and with the evaluate stage's predictions (outputs/confusion.csv).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import BIN, REPO, evaluation_images, reproduced_project, run, textbook_logits, use_store_of
from cifarpipe.commands import predict
from cifarpipe.serving import inference
from cifarpipe.config import UserError

MODEL = "cifar10-classifier"  # params.yaml's tracking.registered_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_archive):
    """A tiny project after `dvc repro`: its run id, test images and labels, and evaluate's predicted classes."""
    project = reproduced_project(tmp_path_factory.mktemp("predict"), tiny_archive)
    images, labels = evaluation_images(project)
    evaluated = pd.read_csv(project / "outputs/confusion.csv")["predicted"].to_numpy()  # one row per test image
    run_id = (project / "outputs/run_id.txt").read_text().strip()
    return project, run_id, images, labels, evaluated


@pytest.fixture
def store(trained, monkeypatch):
    return use_store_of(trained[0], monkeypatch)


def test_the_mlflow_model_takes_uint8_images_and_gives_the_networks_classes_and_probabilities(trained, store):
    project, run_id, images, labels, evaluated = trained
    logits, classes = textbook_logits(project, images)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    out = model.predict(images)  # uint8 (100, 32, 32, 3), as the archive holds them

    assert list(out.columns) == ["class", "class_index", "probability"] + [f"prob_{c}" for c in classes]
    probs = out[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.abs(probs - torch.softmax(logits, 1).numpy()).max() < 1e-5
    assert (out["class_index"].to_numpy() == logits.argmax(1).numpy()).all()
    assert (out["class"].to_numpy() == np.array(classes)[logits.argmax(1).numpy()]).all()
    assert (out["class"].to_numpy() == evaluated).all()  # the evaluate stage's predictions
    assert np.allclose(out["probability"], probs.max(1)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # The logits themselves: the model's network on the library's normalisation.
    classifier = model.unwrap_python_model().classifier
    assert torch.allclose(classifier.logits(images), logits, rtol=0, atol=1e-5)

    # What MLflow shows a user: named columns out; real images as example; the input described in
    # the metadata, with no input schema (MLflow would cast JSON floats to it: see pyfunc.signature).
    signature = model.metadata.signature
    assert signature.inputs is None and "uint8 images (N, 32, 32, 3)" in model.metadata.metadata["input"]
    assert signature.outputs.input_names() == list(out.columns)
    example = model.metadata.load_input_example(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model"))
    split = json.loads((project / "data/split.json").read_text())
    with np.load(project / "data/cifar10.npz") as z:
        first_val = z["train_images"][np.asarray(split["val"][:4])]
    # JSON integers, read back as int64 without an input schema: what a served request holds too
    assert np.issubdtype(example.dtype, np.integer) and (example == first_val).all()
    assert (model.predict(example)["class"] == model.predict(first_val)["class"]).all()
    # Not a pickled object: MLflow's code-model loader and the weights file as an artifact.
    conf = model.metadata.flavors["python_function"]
    assert conf["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in conf
    with pytest.raises(Exception, match="uint8|dtype"):
        model.predict(images.astype(np.float32) / 255)  # floats: the model refuses them


def test_mlflow_models_predict_on_uint8_images_gives_evaluates_classes(trained, tmp_path):
    project, run_id, images, labels, evaluated = trained
    (tmp_path / "in.json").write_text(json.dumps({"inputs": images[:10].tolist()}))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    run(["mlflow", "models", "predict", "-m", f"runs:/{run_id}/model", "-i", str(tmp_path / "in.json"), "-t", "json",
         "-o", str(tmp_path / "out.json"), "--env-manager", "local"], tmp_path, env=env)
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [p["class"] for p in predictions] == evaluated[:10].tolist()


def test_mlflow_models_predict_refuses_float_pixels_instead_of_classifying_black_images(trained, tmp_path):
    """0..1 floats in JSON: MLflow once cast them to the signature's uint8 (all 0) before the model
    saw them, and answered with exit 0 what an all-black image is."""
    project, run_id, images, labels, evaluated = trained
    (tmp_path / "in.json").write_text(json.dumps({"inputs": (images[:3] / 255).tolist()}))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    proc = run(["mlflow", "models", "predict", "-m", f"runs:/{run_id}/model", "-i", str(tmp_path / "in.json"), "-t",
                "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local"], tmp_path, env=env, check=False)
    assert proc.returncode != 0
    assert "got dtype float64: floats are refused" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_on_loopback_with_evaluates_classes(trained, tmp_path):
    project, run_id, images, labels, evaluated = trained
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a bound on a hang, not a timing check
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images[:10].tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        floats = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                        data=json.dumps({"inputs": (images[:2] / 255).tolist()}).encode(),
                                        headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(floats, timeout=120)
        assert refused.value.code == 400
        assert "floats are refused" in json.loads(refused.value.read())["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the group this test started
        server.wait(60)
        log.close()
    assert [p["class"] for p in predictions] == evaluated[:10].tolist()
    assert all(abs(sum(v for k, v in p.items() if k.startswith("prob_")) - 1) < 1e-5 for p in predictions)


# ---------------------------------------------------------------- the predict command
def test_the_resize_rule_keeps_the_centred_square_and_leaves_32x32_images_unchanged():
    rng = np.random.default_rng(0)
    cifar = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert (inference.prepare_image(Image.fromarray(cifar)) == cifar).all()  # byte for byte
    # 64 high, 128 wide: red strips left and right, a blue square in the middle. Only blue survives.
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = wide[:, 96:] = (255, 0, 0)
    wide[:, 32:96] = (0, 0, 255)
    assert (inference.prepare_image(Image.fromarray(wide)) == (0, 0, 255)).all()
    tall = wide.transpose(1, 0, 2).copy()
    assert (inference.prepare_image(Image.fromarray(tall)) == (0, 0, 255)).all()
    # Greyscale, palette and RGBA images become RGB; the alpha channel is dropped.
    assert inference.prepare_image(Image.fromarray(cifar).convert("L")).shape == (32, 32, 3)
    assert inference.prepare_image(Image.fromarray(cifar).convert("P")).shape == (32, 32, 3)
    rgba = Image.fromarray(np.dstack([cifar, np.zeros((32, 32), np.uint8)]), "RGBA")
    assert (inference.prepare_image(rgba) == cifar).all()
    # Bilinear and antialiased: every 4th column white, shrunk 4x, is the mean grey (63.75) inside,
    # where sampling without antialiasing gives 0 (it reads between the white columns).
    stripes = np.zeros((128, 128), np.uint8)
    stripes[:, ::4] = 255
    assert np.abs(inference.prepare_image(Image.fromarray(stripes))[1:-1, 1:-1].astype(int) - 64).max() <= 1

def test_predict_classifies_files_reports_bad_ones_and_writes_csv(trained, tmp_path):
    project, run_id, images, labels, evaluated = trained
    files = []
    for i in range(4):
        Image.fromarray(images[i]).save(tmp_path / f"test{i}.png")
        files.append(f"test{i}.png")
    # A photo-sized JPEG: 80 x 120, resized by the stated rule (centred square, bilinear to 32x32).
    photo = np.kron(images[4], np.ones((4, 4, 1), np.uint8))  # 128 x 128
    photo = np.concatenate([np.full((128, 20, 3), 255, np.uint8), photo, np.zeros((128, 20, 3), np.uint8)], 1)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "test0.png").read_bytes()[:60])  # cut off mid-file
    (tmp_path / "notes.txt").write_text("not an image")
    args = files[:2] + ["corrupt.png", "photo.jpg", "notes.txt", "missing.png"] + files[2:]

    proc = run([sys.executable, "-m", "cifarpipe.commands.predict", *args, "--model", str(project / "outputs/model.pt"),
                "--csv", "out.csv"], tmp_path, check=False)
    assert proc.returncode == predict.SOME_FAILED_EXIT and "Traceback" not in proc.stderr, proc.stderr
    for name, reason in (("corrupt.png", "unreadable image"), ("notes.txt", "not a PNG or JPEG"),
                         ("missing.png", "no such file")):
        assert f"error: {name}: {reason}" in proc.stderr
    table = pd.read_csv(tmp_path / "out.csv")
    table["error"] = table["error"].fillna("")
    good = table[table["error"] == ""]
    assert good["file"].tolist() == files[:2] + ["photo.jpg"] + files[2:]
    assert sorted(table.loc[table["error"] != "", "file"]) == ["corrupt.png", "missing.png", "notes.txt"]
    pngs = good.set_index("file").loc[files]
    assert pngs["class"].tolist() == evaluated[:4].tolist()
    for f, cls, p in zip(files, pngs["class"], pngs["probability"]):
        assert any(line.split() == [f, cls, f"{p:.4f}"] for line in proc.stdout.splitlines())
    # The photo: independently cropped and resized with Pillow, then the network.
    with Image.open(tmp_path / "photo.jpg") as im:
        square = np.asarray(im.convert("RGB").crop((20, 0, 148, 128)).resize((32, 32), Image.Resampling.BILINEAR))
    logits, classes = textbook_logits(project, square[None])
    row = good.set_index("file").loc["photo.jpg"]
    assert np.abs(row[[f"prob_{c}" for c in classes]].to_numpy(float) - torch.softmax(logits, 1).numpy()[0]).max() < 1e-5


def test_a_16_bit_greyscale_png_is_classified_as_its_8_bit_picture_not_as_white(trained, tmp_path):
    """Pillow opens a 16-bit greyscale PNG as I;16 and its convert("RGB") clips every value above
    255 of 65535: the picture became solid white and was classified, exit 0."""
    project, run_id, images, labels, evaluated = trained
    grey = images[0].mean(2).round().astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 0..255 -> 0..65535
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "white.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I;16")  # the case at hand, as Pillow opens it
    run([sys.executable, "-m", "cifarpipe.commands.predict", "grey16.png", "grey8.png", "white.png",
            "--model", str(project / "outputs/model.pt"), "--csv", "out.csv"], tmp_path)
    rows = pd.read_csv(tmp_path / "out.csv").set_index("file")
    probs = rows[[c for c in rows.columns if c.startswith("prob_")]]
    assert np.abs(probs.loc["grey16.png"].to_numpy(float) - probs.loc["grey8.png"].to_numpy(float)).max() < 1e-6
    assert np.abs(probs.loc["grey16.png"].to_numpy(float) - probs.loc["white.png"].to_numpy(float)).max() > 1e-3


def test_a_folders_other_images_are_reported_and_its_other_files_listed(trained, tmp_path):
    """A folder holding one PNG once classified it alone, exit 0: its .webp and .gif pictures were
    skipped without a word."""
    project, run_id, images, labels, evaluated = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    Image.fromarray(images[1]).save(folder / "b.webp")
    Image.fromarray(images[2]).save(folder / "c.gif")
    (folder / "notes.txt").write_text("not an image")
    proc = run([sys.executable, "-m", "cifarpipe.commands.predict", "photos", "--model",
                str(project / "outputs/model.pt"), "--csv", "out.csv"], tmp_path, check=False)
    assert proc.returncode == predict.SOME_FAILED_EXIT, proc.stdout + proc.stderr
    assert "1 image(s) classified" in proc.stdout
    for name in ("b.webp", "c.gif"):
        suffix = name.split(".")[1]
        assert f"error: photos/{name}: a .{suffix} image: only PNG and JPEG files are classified" in proc.stderr
    assert "note: 1 file(s) in the folder(s) are not images and were skipped: photos/notes.txt" in proc.stderr
    assert sorted(pd.read_csv(tmp_path / "out.csv")["file"]) == ["photos/a.png", "photos/b.webp", "photos/c.gif"]


def test_a_huge_jpeg_is_decoded_at_reduced_scale_without_pillows_raw_warning(tmp_path, monkeypatch, capsys):
    """A 10000 x 10000 JPEG took 8.6 s and 1.8 GB and printed Pillow's DecompressionBombWarning; the
    same, scaled down: Pillow's limit lowered below a 1200 x 1200 JPEG."""
    y, x = np.mgrid[0:1200, 0:1200]
    picture = np.stack([x * 255 // 1199, y * 255 // 1199, (x + y) * 255 // 2398], 2).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "big.jpg", quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 1.44 Mpx: over it, under twice it
    decoded_sizes = []
    prepare = inference.prepare_image
    monkeypatch.setattr(inference, "prepare_image", lambda im: decoded_sizes.append(im.size) or prepare(im))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        got = predict.read_image(tmp_path / "big.jpg")
    assert decoded_sizes == [(300, 300)]  # DCT scaling 1/4: the smallest scale still >= 256 pixels a side
    full = inference.prepare_image(Image.fromarray(picture))
    assert np.abs(got.astype(int) - full.astype(int)).max() <= 6  # the same picture at 32 x 32
    assert capsys.readouterr().err == ""


def test_an_image_with_transparency_is_classified_with_a_note_that_its_alpha_is_dropped(tmp_path, capsys):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:8, :, 3] = 0  # the top quarter transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut-out.png")
    Image.fromarray(np.full((32, 32, 4), 255, np.uint8), "RGBA").save(tmp_path / "opaque.png")
    assert predict.read_image(tmp_path / "cut-out.png").shape == (32, 32, 3)
    assert "cut-out.png: 25.0% of its pixels are (partly) transparent; the alpha channel is dropped" in \
        capsys.readouterr().err
    predict.read_image(tmp_path / "opaque.png")
    assert capsys.readouterr().err == ""


def test_predict_with_a_run_id_or_a_registered_model_gives_the_weights_files_classes(trained, store, tmp_path, capsys):
    """The run's model, its registered version by number and by the @champion alias (the one version
    is the champion), and the workspace's weights file: the same classes as evaluate."""
    project, run_id, images, labels, evaluated = trained
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(images[i]).save(folder / f"img{i}.png")
    [version] = mlflow.MlflowClient().search_model_versions(f"name = '{MODEL}'")
    for source in (["--run", run_id], ["--model", f"models:/{MODEL}/{version.version}"],
                   ["--model", f"models:/{MODEL}@champion"], []):
        assert predict.main([str(folder), *source, "--csv", str(tmp_path / "out.csv")]) == 0
        out = pd.read_csv(tmp_path / "out.csv")
        assert out["file"].tolist() == [str(folder / f"img{i}.png") for i in range(6)]
        assert out["class"].tolist() == evaluated[:6].tolist(), source
    printed = capsys.readouterr()
    assert f"MLflow model runs:/{run_id}/model" in printed.out and f"models:/{MODEL}/" in printed.out
    assert f"MLflow model models:/{MODEL}@champion" in printed.out
    assert "weights file outputs/model.pt" in printed.out


def test_predict_refuses_clearly_without_a_usable_model(trained, store, tmp_path):
    Image.fromarray(trained[2][0]).save(tmp_path / "a.png")
    cases = [(["--model", str(tmp_path / "none.pt")], "no such weights file"),
             (["--model", str(tmp_path / "a.png")], "not a readable checkpoint"),
             (["--run", "0" * 32], "could not load the MLflow model runs:/0+/model"),
             (["--model", f"models:/{MODEL}/99"], f"could not load the MLflow model models:/{MODEL}/99")]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            predict.main([str(tmp_path / "a.png"), *args])


def test_the_console_script_is_the_commands_entry():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["cifarpipe-predict"].partition(":")
    assert (module, attr) == ("cifarpipe.commands.predict", "cli")
    assert callable(getattr(predict, attr))


def test_a_model_logged_before_the_package_layout_changed_still_loads_and_predicts(tmp_path):
    """tests/assets holds an MLflow model logged at commit 0c3a137, when its class lived in
    cifarpipe.pyfunc (now cifarpipe.serving.pyfunc): an untrained course_cnn with six images and
    the predictions it gave then. Its code file imports `cifarpipe.pyfunc`; in a process that
    imported this version of the package first, that import resolves here."""
    import tarfile

    with tarfile.open(Path(__file__).parent / "assets" / "model_logged_0c3a137.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    folder = tmp_path / "model_logged_0c3a137"
    images = np.load(folder / "check_images.npy")
    expected = pd.read_csv(folder / "check_predictions.csv")
    probs = [c for c in expected.columns if c.startswith(inference.PROB_PREFIX)]

    got = mlflow.pyfunc.load_model(str(folder)).predict(images)  # this process has imported cifarpipe
    assert list(got["class"]) == list(expected["class"])
    assert np.abs(got[probs].to_numpy() - expected[probs].to_numpy()).max() < 1e-6

    # The predict command (a process of its own, which imports the package before the model).
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
    proc = run([sys.executable, "-m", "cifarpipe.commands.predict", *(str(tmp_path / f"img{i}.png") for i in
                range(len(images))), "--model", folder.as_uri(), "--csv", str(tmp_path / "out.csv")], tmp_path)
    assert "6 image(s) classified" in proc.stdout, proc.stdout + proc.stderr
    assert list(pd.read_csv(tmp_path / "out.csv")["class"]) == list(expected["class"])
