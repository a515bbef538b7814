"""Classify image files with a trained model: a table of file, class and probability.

    python -m cifarpipe.commands.predict cat.png dog.jpg                 # the workspace's model: outputs/model.pt
    python -m cifarpipe.commands.predict --run <run id> photos/          # the model an MLflow run logged
    python -m cifarpipe.commands.predict --model models:/cifar10-classifier@champion *.png --csv predictions.csv

The images go through the model's own inference path (cifarpipe.serving.inference, which the MLflow model
wraps): normalised with the run's training mean and std. A file that can't be read is reported
with its reason and the others are still classified; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cifarpipe.serving import inference

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a folder argument expands to (any case)
# Pictures of other formats that a folder may hold: reported as not classified (exit 1), never
# skipped in silence. A folder's other files (notes, .DS_Store) are listed as skipped.
OTHER_IMAGE_SUFFIXES = (".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jfif", ".jpe",
                        ".apng", ".ico", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".qoi", ".psd")
SOME_FAILED_EXIT = 1  # some files could not be classified (the rest were)


@dataclass
class Failure:
    file: str
    reason: str


def expand(paths: Sequence[Path]) -> tuple[list[Path], list[Failure], list[Path]]:
    """Files as given; a folder becomes its PNG and JPEG files (sorted, not recursive). Returns the
    files, the failures (a folder's images of other formats, e.g. .webp or .gif: the user expects
    them classified, so each one is reported) and the folders' other files, skipped (to be listed)."""
    files, failures, skipped = [], [], []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        entries = sorted(p for p in path.iterdir() if p.is_file())
        found = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        files += found
        for p in entries:
            if p.suffix.lower() in OTHER_IMAGE_SUFFIXES:
                failures.append(Failure(str(p), f"a {p.suffix} image: only PNG and JPEG files are classified"))
            elif p not in found:
                skipped.append(p)
        if not found:
            failures.append(Failure(str(path), f"a folder with no {'/'.join(IMAGE_SUFFIXES)} files"))
    return files, failures, skipped


# JPEGs are decoded at a reduced scale (JPEG's own DCT scaling, 1/2 to 1/8) down to no less than
# this many pixels on each side: 8x the 32x32 output, so the antialiased resize still averages many
# pixels into each output pixel. A 10000 x 10000 JPEG then decodes as 1250 x 1250 (4.7 MB of RGB
# instead of 300 MB) and trips no decompression-bomb warning.
JPEG_DRAFT_SIDE = 256


def read_image(path: Path) -> np.ndarray:
    """A PNG or JPEG file -> uint8 (32, 32, 3) by inference.prepare_image's rule. Raises ValueError
    with a reason a user can act on."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(path, formats=["PNG", "JPEG"])
        with image:
            if image.format == "JPEG":
                image.draft(image.mode, (JPEG_DRAFT_SIDE, JPEG_DRAFT_SIDE))
            elif caught:  # a PNG over Pillow's limit (twice the limit is refused as a bomb, below)
                print(f"note: {path}: {image.width} x {image.height} pixels, over Pillow's decompression-bomb "
                      f"limit of {Image.MAX_IMAGE_PIXELS}; decoded in full", file=sys.stderr)
            image.load()  # decode now: a truncated or corrupt file fails here, not later
            _say_if_transparent(path, image)
            return inference.prepare_image(image)
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except UnidentifiedImageError:
        raise ValueError("not a PNG or JPEG image (or a corrupt one)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for damaged data
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None


def _say_if_transparent(path: Path, image) -> None:
    """The rule drops the alpha channel: transparent pixels are classified with whatever colour they
    hide (often black). Said per file, since it changes what the model sees."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    share = float((alpha < 255).mean()) if alpha.size else 0.0
    if share:
        print(f"note: {path}: {share:.1%} of its pixels are (partly) transparent; the alpha channel is dropped, so "
              "they are classified with the colour they hide", file=sys.stderr)


def load_predictor(model: str, run: str | None) -> tuple[Callable[[np.ndarray], pd.DataFrame], str]:
    """predict(uint8 images) -> inference.result_table, and a description of the model used."""
    from cifarpipe.config import UserError
    from cifarpipe.training import checkpoint

    if run:
        model = f"runs:/{run}/model"
    if ":/" in model:  # an MLflow URI: runs:/<id>/model, models:/<name>@<alias>, models:/<name>/<version>, file:/...
        from cifarpipe.tracking.model import load_model  # imports MLflow (seconds): only when a model comes from it

        pyfunc_model = load_model(model)
        return (lambda images: pd.DataFrame(pyfunc_model.predict(images))), f"MLflow model {model}"
    path = Path(model)
    try:
        weights = checkpoint.load(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such weights file; train one (`dvc repro`), or name a model with --model "
                        "or --run") from None
    try:
        classifier = inference.Classifier.from_weights(weights)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: {e}") from None
    return classifier.predict, f"weights file {path}"


def classify(files: Sequence[Path], predict: Callable[[np.ndarray], pd.DataFrame]
             ) -> tuple[pd.DataFrame, list[Failure]]:
    """The result table of the readable files (a `file` column first), and the files that failed."""
    images, good, failures = [], [], []
    for path in files:
        try:
            images.append(read_image(path))
            good.append(str(path))
        except ValueError as e:
            failures.append(Failure(str(path), str(e)))
    table = predict(np.stack(images)) if images else None
    if table is None:
        return pd.DataFrame({"file": []}), failures
    table = table.reset_index(drop=True)
    table.insert(0, "file", good)
    return table, failures


def csv_table(table: pd.DataFrame, failures: Sequence[Failure]) -> pd.DataFrame:
    """Every file, classified or not: the result columns, then `error` (empty when classified)."""
    failed = pd.DataFrame({"file": [f.file for f in failures], "error": [f.reason for f in failures]})
    out = pd.concat([table.assign(error=""), failed], ignore_index=True)
    if "class_index" in out:
        out["class_index"] = out["class_index"].astype("Int64")  # integers, empty for failed files (not 3.0)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m cifarpipe.commands.predict", description=__doc__.splitlines()[0],
        epilog=f"Images of any size are made 32x32 the same way for every user: {inference.RESIZE_RULE}. "
               "Exit status: 0 all files classified, 1 some could not be read (the rest are classified), "
               "2 no usable model. Store for --run and models:/ URIs: MLFLOW_TRACKING_URI, else ./mlflow.db.")
    ap.add_argument("files", nargs="+", type=Path, help="PNG or JPEG files, or folders of them")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default="outputs/model.pt",
                       help="a weights file (default: outputs/model.pt, the workspace's) or an MLflow model URI "
                            "(runs:/<run id>/model; models:/<name>@champion, the registry's best version; "
                            "models:/<name>/<version>; models:/<name>/latest)")
    which.add_argument("--run", help="an MLflow run id: the model that run logged (= --model runs:/<id>/model)")
    ap.add_argument("--csv", type=Path, help="also write every file's row as CSV: file, class, probability, the "
                                             "ten class probabilities, error")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from cifarpipe import atomic

    args = parser().parse_args(argv)
    predict, described = load_predictor(args.model, args.run)
    files, failures, skipped = expand(args.files)
    table, failed = classify(files, predict)
    failures += failed
    print(f"{len(table)} image(s) classified with the {described}")
    if skipped:
        print(f"note: {len(skipped)} file(s) in the folder(s) are not images and were skipped: "
              + ", ".join(str(p) for p in skipped), file=sys.stderr)
    if len(table):
        shown = table[["file", "class", "probability"]].copy()
        shown["probability"] = [f"{p:.4f}" for p in shown["probability"]]
        print(shown.to_string(index=False))
    for f in failures:
        print(f"error: {f.file}: {f.reason}", file=sys.stderr)
    if args.csv:
        atomic.write_text(args.csv, csv_table(table, failures).to_csv(index=False))
        print(f"table -> {args.csv}")
    if failures:
        print(f"{len(failures)} file(s) not classified", file=sys.stderr)
        return SOME_FAILED_EXIT
    return 0


def cli() -> None:
    """The console entry point: a UserError (no model, no store) prints one line and exits 2."""
    from cifarpipe.pipeline.stage import run_stage

    run_stage(main)


if __name__ == "__main__":
    cli()
