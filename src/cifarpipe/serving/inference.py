"""Inference on what users have: uint8 images in, class names and probabilities out.

One path for every use of a trained model: the MLflow model (cifarpipe.serving.pyfunc wraps `Classifier`),
the predict command (cifarpipe.commands.predict), and anything that loads outputs/model.pt. The images are
normalised with the mean and std of the run's own training data (stored in the weights file),
by the same arithmetic as the training and evaluation batches, so a prediction here is the
evaluate stage's prediction for the same image.

Pure: no file or MLflow I/O; the callers read the weights file and the image files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cifarpipe.config import ModelParams
from cifarpipe.training.engine import eval_logits
from cifarpipe.training.models import build_model

SIDE = 32  # CIFAR-10 images are 32 x 32 pixels, RGB
PROB_PREFIX = "prob_"  # column of each class's probability: prob_airplane, prob_automobile, ...
# Images per forward pass: bounds memory whatever N a caller sends. cifar_resnet at width 64 holds
# 256 x 64 x 32 x 32 float32 = 67 MB per activation; course_cnn far less.
BATCH = 256


def check_images(images: Any) -> np.ndarray:
    """`images` as a uint8 array (N, 32, 32, 3): the CIFAR layout (height, width, RGB), 0..255.

    A single (32, 32, 3) image becomes N = 1. Integers in 0..255 of another dtype (JSON gives
    int64) are accepted; floats are not, since their scale (0..1 or 0..255) would be a guess: 0..1
    floats read as 0..255 are a black image, classified without a word."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (SIDE, SIDE, 3):
        raise ValueError(f"expected images of shape (N, {SIDE}, {SIDE}, 3) (height, width, RGB; the CIFAR layout), "
                         f"got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"expected integer pixel values 0..255 (uint8), got dtype {arr.dtype}: floats are refused, "
                         "since their scale (0..1 or 0..255) would be a guess; send integers, e.g. "
                         "(x * 255).round().astype('uint8') for 0..1 floats")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"pixel values must be 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def normalise(images_u8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, (x / 255 - mean) / std, computed exactly as loader.DeviceBatches
    computes it for training and evaluation (x * scale + shift in one addcmul), so the logits are
    the evaluate stage's, not merely close to them."""
    device = images_u8.device
    std_255 = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    scale = 1 / std_255
    shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255 / std_255
    return torch.addcmul(shift, images_u8.permute(0, 3, 1, 2).float(), scale)


def result_table(probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per image: class (name), class_index, probability (of that class), then
    prob_<name> for each of the classes, in the classes' order."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(classes))
    index = probabilities.argmax(1) if len(probabilities) else np.zeros(0, dtype=np.int64)
    table = pd.DataFrame({"class": np.array(classes, dtype=object)[index] if len(index) else np.array([], object),
                          "class_index": index.astype(np.int64),
                          "probability": probabilities[np.arange(len(index)), index]})
    for i, name in enumerate(classes):
        table[PROB_PREFIX + name] = probabilities[:, i]
    return table


@dataclass
class Classifier:
    """A trained network with its run's normalisation, class names and test-time views (model.tta)."""
    network: nn.Module
    mean: list[float]
    std: list[float]
    classes: list[str]
    tta: str = "none"  # the views the evaluate stage averages for this model (engine.eval_logits)

    @classmethod
    def from_weights(cls, weights: dict[str, Any], device: str | torch.device = "cpu") -> "Classifier":
        """From the weights file's dict (checkpoint.weights_file: model, state_dict, mean, std, classes)."""
        missing = [k for k in ("model", "state_dict", "mean", "std", "classes") if k not in weights]
        if missing:
            raise ValueError(f"not a weights file of this project: it lacks {', '.join(missing)}")
        model = ModelParams(**weights["model"])  # written before model.tta existed: "none"
        network = build_model(model, num_classes=len(weights["classes"]))
        network.load_state_dict(weights["state_dict"])
        return cls(network.to(device).eval(), list(weights["mean"]), list(weights["std"]), list(weights["classes"]),
                   model.tta)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def logits(self, images: Any) -> torch.Tensor:
        """fp32 logits (N, classes) on the CPU, computed on the network's device in batches of BATCH."""
        x = torch.from_numpy(np.ascontiguousarray(check_images(images)))
        self.network.eval()
        out = [eval_logits(self.network, normalise(x[i:i + BATCH].to(self.device), self.mean, self.std),
                           tta=self.tta).cpu() for i in range(0, len(x), BATCH)]
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def probabilities(self, images: Any) -> np.ndarray:
        return torch.softmax(self.logits(images), 1).numpy()

    def predict(self, images: Any) -> pd.DataFrame:
        """The result table (see result_table) of uint8 images (N, 32, 32, 3)."""
        return result_table(self.probabilities(images), self.classes)


# ---------------------------------------------------------------- image files
# The one rule that turns any picture into a CIFAR-sized image, for every user (the predict
# command's --help states it): EXIF orientation applied; 16-bit greyscale scaled to 8 bits (see
# to_8_bit); converted to RGB (greyscale and palette images expanded, an alpha channel dropped);
# the largest centred square kept (the longer side cropped equally at both ends, so the object
# keeps its proportions, as CIFAR's photos have them);
# that square resized to 32 x 32 with Pillow's bilinear filter, which is antialiased when it
# shrinks (Pillow widens the filter by the reduction factor). A 32 x 32 image passes unchanged,
# so a PNG written from a CIFAR image gives back exactly its pixels.
RESIZE_RULE = ("EXIF orientation applied; 16-bit greyscale scaled to 8 bits; converted to RGB (alpha dropped); "
               "the largest centred square kept; resized to 32x32 with Pillow's bilinear filter (antialiased when "
               "shrinking); 32x32 images unchanged")


def to_8_bit(image):
    """A 16-bit greyscale image (Pillow's modes I;16*, or I from an older Pillow) as 8-bit "L".
    Pillow's own convert("RGB") clips such values at 255: any pixel above 255 of 65535, that is
    almost every pixel, became white. The high byte is kept, as Pillow reduces 16-bit RGB PNGs."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} pixels outside 0..65535 ({values.min()}..{values.max()}): their "
                             "scale is unknown")
        return Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise ValueError("floating-point pixels: their scale is unknown")
    return image


def prepare_image(image) -> np.ndarray:
    """A PIL image -> uint8 (32, 32, 3) by the rule above."""
    from PIL import Image, ImageOps

    image = to_8_bit(ImageOps.exif_transpose(image)).convert("RGB")
    w, h = image.size
    if (w, h) != (SIDE, SIDE):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # Crop first: resize(box=...) lets the filter reach pixels outside the box (measured: a
        # red border bled 32/255 into the edge pixels of a blue square).
        image = image.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()
