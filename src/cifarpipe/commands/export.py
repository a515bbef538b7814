"""Export a trained model as one graph (ONNX or torch.export .pt2): uint8 images in, probabilities out.

    cifarpipe-export --format onnx                                  # outputs/model.pt -> outputs/model.onnx
    cifarpipe-export --format onnx --check data/cifar10.npz         # ... and compare on the whole test set
    cifarpipe-export --format pt2 --model models:/cifar10-classifier/3 --out model.pt2
    cifarpipe-export --format onnx --run <run id> --check data/cifar10.npz

The graph holds the run's normalisation (cifarpipe.serving.export). --check runs the exported file
in its own runtime (onnxruntime, torch.export.load) on every test image of the arrays file and
compares it with the model it came from, run through the inference path: the MLflow model's
predict for --model/--run, the same inference code (Classifier) for a weights file. It reports
the largest difference of any probability and how many images get the same class; the exit
status is 1 when any image's class differs or a difference exceeds --tolerance.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cifarpipe.config import UserError
from cifarpipe.serving import export
from cifarpipe.serving.inference import PROB_PREFIX, Classifier

CHECK_FAILED_EXIT = 1
DEFAULT_TOLERANCE = 1e-4  # max |probability difference|; measured on CIFAR-10's 10,000 test images: 6.6e-7 (onnx), 0 (pt2)


def load_source(model: str, run: str | None) -> tuple[Classifier, Callable[[np.ndarray], np.ndarray], str]:
    """The classifier to export, the reference predict (uint8 images -> probabilities) it is checked
    against, and a description of the source."""
    from cifarpipe.training import checkpoint

    if run:
        model = f"runs:/{run}/model"
    if ":/" in model:  # an MLflow model: its own predict is the reference
        from cifarpipe.tracking.model import load_model

        pyfunc_model = load_model(model)
        classifier = pyfunc_model.unwrap_python_model().classifier
        columns = [PROB_PREFIX + c for c in classifier.classes]
        return (classifier, lambda x: pyfunc_model.predict(x)[columns].to_numpy(np.float64),
                f"the MLflow model {model}")
    path = Path(model)
    try:
        weights = checkpoint.load(path)
        classifier = Classifier.from_weights(weights)
    except FileNotFoundError:
        raise UserError(f"{path}: no such weights file; train one (`dvc repro`), or name an MLflow model with "
                        "--model or --run") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: {e}") from None
    return classifier, classifier.probabilities, f"the weights file {path} (through the inference path)"


def check(data: bytes, fmt: export.Format, reference: Callable[[np.ndarray], np.ndarray], classes: list[str],
          arrays: Path, tolerance: float) -> bool:
    """Compare the exported file with `reference` on every test image of `arrays`; print the figures."""
    from cifarpipe.data import archive

    images, labels, _ = archive.load_part(arrays, "test")
    images = np.array(images)  # out of the read-only memory map
    run, file_classes = export.load_runner(data, fmt)
    if file_classes != classes:
        print(f"check FAILED: the file's classes {file_classes} are not the model's {classes}")
        return False
    t0 = time.perf_counter()
    got = run(images)
    seconds = time.perf_counter() - t0
    want = reference(images)
    diff = float(np.abs(got.astype(np.float64) - want).max())
    same = int((got.argmax(1) == want.argmax(1)).sum())
    acc_got, acc_want = float((got.argmax(1) == labels).mean()), float((want.argmax(1) == labels).mean())
    print(f"check on {len(images)} test images of {arrays}: max |probability difference| {diff:.3g}; "
          f"same class for {same} of {len(images)}; test accuracy {acc_got:.4f} exported, {acc_want:.4f} "
          f"reference; {fmt} runtime {seconds:.1f} s")
    ok = same == len(images) and diff <= tolerance
    print("check passed" if ok else f"check FAILED (needs every class the same and a difference <= {tolerance:g})")
    return ok


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cifarpipe-export", description=__doc__.splitlines()[0],
                                 epilog="Exit status: 0 exported (and checked), 1 the check failed (the file is "
                                        "written), 2 no usable model or missing package. Store for --run and "
                                        "models:/ URIs: MLFLOW_TRACKING_URI, else ./mlflow.db.")
    ap.add_argument("--format", choices=("onnx", "pt2"), required=True,
                    help="onnx: needs the onnx extra (pip install 'cifarpipe[onnx]'); pt2: torch.export, torch only")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default="outputs/model.pt",
                       help="a weights file (default: outputs/model.pt) or an MLflow model URI "
                            "(runs:/<run id>/model, models:/<name>/<version>)")
    which.add_argument("--run", help="an MLflow run id: the model that run logged (= --model runs:/<id>/model)")
    ap.add_argument("--out", type=Path, help="the file to write (default: outputs/model.onnx or outputs/model.pt2)")
    ap.add_argument("--check", type=Path, metavar="ARRAYS",
                    help="the arrays file of the download stage (data/cifar10.npz): compare on its test images")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"largest |probability difference| the check accepts (default {DEFAULT_TOLERANCE:g})")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from cifarpipe import atomic

    args = parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file of the model's code
    out = args.out or Path(f"outputs/model.{args.format}")
    classifier, reference, described = load_source(args.model, args.run)
    t0 = time.perf_counter()
    data = export.export_bytes(classifier, args.format)
    atomic.write_bytes(out, data)
    print(f"exported {described} as {args.format}: {out} ({len(data) / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s); "
          f"input '{export.INPUT}' uint8 (batch, 32, 32, 3), output '{export.OUTPUT}' float32 (batch, "
          f"{len(classifier.classes)}), classes {', '.join(classifier.classes)}")
    if args.check and not check(data, args.format, reference, classifier.classes, args.check, args.tolerance):
        return CHECK_FAILED_EXIT
    return 0


def cli() -> None:
    """The console entry point: a UserError (no model, no store, no package) prints one line and exits 2."""
    from cifarpipe.pipeline.stage import run_stage

    run_stage(main)


if __name__ == "__main__":
    cli()
