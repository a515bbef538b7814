"""Test-set reports: per-class accuracy, the confusion matrix (table and picture), the metrics dict."""
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


def confusion_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    shares = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the actual class")
    fig.tight_layout()
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def top_mistakes(labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` misclassified images with the highest confidence in their wrong class,
    most confident first (ties: lower index first). `confidences[i]`: the predicted class's
    probability for image i (only the misclassified images' values are read)."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predictions))
    return wrong[np.argsort(-np.asarray(confidences)[wrong], kind="stable")][:n]


def mistakes_png(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray,
                 classes: list[str], path: Path, title: str, rows: int = 4, cols: int = 6) -> np.ndarray:
    """A rows x cols grid of the most confidently misclassified images (uint8 NHWC), each tile
    upscaled with its true class, predicted class and confidence. Returns the indices shown."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    shown = top_mistakes(labels, predictions, confidences, rows * cols)
    # 1.9 x 2.2 inches per tile at 100 dpi: the 32x32 image drawn ~5x, room for two lines of text.
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2 + 0.5), dpi=100, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(shown):
            i = shown[k]
            ax.imshow(images[i], interpolation="nearest")  # nearest: the real pixels, not a blur
            ax.set_title(f"true: {classes[labels[i]]}\npred: {classes[predictions[i]]} {confidences[i]:.1%}",
                         fontsize=9, color="firebrick", linespacing=1.3)
    if not len(shown):
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=14)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return shown
