"""Test-set reports: per-class accuracy, the confusion matrix (table and picture), the most confident mistakes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cifarpipe import atomic


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[actual, predicted]."""
    return np.bincount(labels.astype(np.int64) * num_classes + predictions, minlength=num_classes ** 2
                       ).reshape(num_classes, num_classes)


def per_class_table(cm: np.ndarray, classes: list[str]) -> pd.DataFrame:
    support = cm.sum(1)
    predicted = cm.sum(0)
    correct = np.diag(cm)
    return pd.DataFrame({
        "class": classes,
        "support": support,
        "correct": correct,
        "accuracy": np.divide(correct, support, out=np.zeros(len(classes)), where=support > 0),
        "precision": np.divide(correct, predicted, out=np.zeros(len(classes)), where=predicted > 0),
    })


def confusion_long(labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per test image (actual, predicted): the input `dvc plots` expects for its confusion template."""
    names = np.array(classes)
    return pd.DataFrame({"actual": names[labels.astype(np.int64)], "predicted": names[predictions]})


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic.write_text(path, df.to_csv(index=False))


# The pictures are drawn with Pillow: the evaluate stage spent 2.2 s of its 4.7 s (cProfile, 2-core
# CPU) importing matplotlib and drawing these two figures with it, and draws them in 0.1 s this way.
# matplotlib's "Blues" colour map, sampled at 9 evenly spaced points (0 = white, 1 = dark blue).
_BLUES = np.array([(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
                   (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], dtype=np.float64)
_RED = (178, 34, 34)  # "firebrick": the mistakes' captions


def _blues(share: float) -> tuple[int, int, int]:
    """The colour of a share in 0..1, linearly between the map's points."""
    x = min(max(share, 0.0), 1.0) * (len(_BLUES) - 1)
    i = min(int(x), len(_BLUES) - 2)
    return tuple(int(round(v)) for v in _BLUES[i] + (x - i) * (_BLUES[i + 1] - _BLUES[i]))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _save_png(image, path: Path) -> None:
    with atomic.atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


def _centred(draw, xy: tuple[float, float], text: str, font, fill) -> None:
    draw.text(xy, text, font=font, fill=fill, anchor="mm")


def confusion_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """The confusion matrix as a heat map of each actual class's shares, its counts in the cells,
    and a colour scale."""
    from PIL import Image, ImageDraw

    k, cell, left, top = len(classes), 52, 120, 48
    bottom, right = 110, 120
    shares = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    image = Image.new("RGB", (left + k * cell + right, top + k * cell + bottom), "white")
    draw = ImageDraw.Draw(image)
    small, label = _font(12), _font(14)
    _centred(draw, (image.width / 2, top / 2), title, _font(15), "black")
    for i in range(k):
        for j in range(k):
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=_blues(shares[i, j]))
            _centred(draw, (x0 + cell / 2, y0 + cell / 2), str(cm[i, j]), small,
                     "white" if shares[i, j] > 0.5 else "black")
        draw.text((left - 8, top + i * cell + cell / 2), classes[i], font=label, fill="black", anchor="rm")
        # column labels: written horizontally on a strip of their own, turned 90 degrees
        strip = Image.new("RGB", (bottom - 30, cell), "white")
        ImageDraw.Draw(strip).text((bottom - 32, cell / 2), classes[i], font=label, fill="black", anchor="rm")
        image.paste(strip.rotate(90, expand=True), (left + i * cell, top + k * cell + 6))
    draw.rectangle((left, top, left + k * cell, top + k * cell), outline="black")
    _centred(draw, (left + k * cell / 2, image.height - 12), "predicted", label, "black")
    side = Image.new("RGB", (k * cell, 22), "white")
    _centred(ImageDraw.Draw(side), (k * cell / 2, 11), "actual", label, "black")
    image.paste(side.rotate(90, expand=True), (8, top))
    _colour_scale(image, draw, (left + k * cell + 30, top), k * cell, small, label)
    _save_png(image, path)


def _colour_scale(image, draw, origin: tuple[int, int], height: int, small, label) -> None:
    """A vertical bar of the colour map, 1 at the top, with its ticks and caption."""
    from PIL import Image, ImageDraw

    x, y = origin
    for row in range(height):
        draw.line((x, y + row, x + 18, y + row), fill=_blues(1 - row / (height - 1)))
    draw.rectangle((x, y, x + 18, y + height), outline="black")
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = y + (1 - share) * height
        draw.line((x + 18, ty, x + 22, ty), fill="black")
        draw.text((x + 25, ty), f"{share:.2f}", font=small, fill="black", anchor="lm")
    caption = Image.new("RGB", (height, 22), "white")
    _centred(ImageDraw.Draw(caption), (height / 2, 11), "share of the actual class", label, "black")
    image.paste(caption.rotate(90, expand=True), (x + 62, y))


def top_mistakes(labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` misclassified images with the highest confidence in their wrong class,
    most confident first (ties: lower index first). `confidences[i]`: the predicted class's
    probability for image i (only the misclassified images' values are read)."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predictions))
    return wrong[np.argsort(-np.asarray(confidences)[wrong], kind="stable")][:n]


def mistakes_png(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray,
                 classes: list[str], path: Path, title: str, rows: int = 4, cols: int = 6) -> np.ndarray:
    """A rows x cols grid of the most confidently misclassified images (uint8 NHWC), each tile
    upscaled 5x (nearest: the real pixels, not a blur) with its true class, predicted class and
    confidence. Returns the indices shown."""
    from PIL import Image, ImageDraw

    shown = top_mistakes(labels, predictions, confidences, rows * cols)
    scale, tile_w, tile_h, top = 5, 190, 220, 50  # a 160 px image and two lines of caption per tile
    image = Image.new("RGB", (cols * tile_w, top + rows * tile_h), "white")
    draw = ImageDraw.Draw(image)
    _centred(draw, (image.width / 2, top / 2), title, _font(16), "black")
    caption = _font(14)
    for k, i in enumerate(shown):
        x0, y0 = (k % cols) * tile_w, top + (k // cols) * tile_h
        picture = Image.fromarray(np.ascontiguousarray(images[i])).resize((32 * scale, 32 * scale), Image.NEAREST)
        image.paste(picture, (x0 + (tile_w - 32 * scale) // 2, y0 + 48))
        _centred(draw, (x0 + tile_w / 2, y0 + 14), f"true: {classes[labels[i]]}", caption, _RED)
        _centred(draw, (x0 + tile_w / 2, y0 + 34), f"pred: {classes[predictions[i]]} {confidences[i]:.1%}", caption, _RED)
    if not len(shown):
        _centred(draw, (image.width / 2, image.height / 2), "no misclassified images", _font(20), "black")
    _save_png(image, path)
    return shown
