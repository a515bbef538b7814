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
