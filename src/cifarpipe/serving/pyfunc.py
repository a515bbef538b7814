"""The MLflow model every training run logs: uint8 images in, class names and probabilities out.

Mechanism: MLflow's "models from code". The model is a PythonModel (below) whose code file,
cifarpipe/serving/mlflow_model.py, MLflow stores in the model and runs at load time; the package ships
with it (code_paths), and the weights file is the model's one artifact, read with
torch.load(weights_only=True). So loading the model unpickles nothing: no cloudpickle of a
Python object (what mlflow.pyfunc.log_model(python_model=<instance>) stores, which runs
arbitrary code when loaded, and breaks when the class moves), and no pickled nn.Module. The
pytorch flavour is not used: its input is a float tensor the caller must normalise, and its
pyfunc loads on CUDA whenever a GPU is present.

Device: the CPU unless the loader asks for another (model_config={"device": "cuda"}), on every
machine: a GPU machine loads and predicts like any other.
"""
# No `from __future__ import annotations`: MLflow reads predict's type hints as objects.
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from cifarpipe.serving.inference import Classifier, check_images

WEIGHTS_ARTIFACT = "weights"  # the name of the weights file among the model's artifacts


class CifarClassifierModel(mlflow.pyfunc.PythonModel):
    """predict(uint8 images (N, 32, 32, 3)) -> one row per image: class, class_index, probability,
    prob_<class> for each class (see inference.result_table)."""

    classifier: Classifier | None = None

    def load_context(self, context) -> None:
        from cifarpipe.training import checkpoint

        device = (context.model_config or {}).get("device") or "cpu"
        weights = checkpoint.load(context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu")  # weights_only
        self.classifier = Classifier.from_weights(weights, device)

    # np.ndarray: the signature declares no input schema (see signature), so this method checks the input itself.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        if self.classifier is None:
            raise RuntimeError("the model was not loaded (load_context was not called)")
        try:
            images = check_images(model_input)
        except ValueError as e:  # `mlflow models serve` answers 400 with this message, not a bare 500
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.inference_mode():
            return self.classifier.predict(images)


# What the model takes, in its MLmodel metadata (the signature declares no input schema: see signature).
INPUT = "uint8 images (N, 32, 32, 3): height, width, RGB, 0..255; JSON: integers (floats are refused)"


def signature(example: np.ndarray, classes: list[str]):
    """Output: the columns of inference.result_table, in order. No input schema, on purpose: MLflow
    casts JSON input to the schema's dtype before the model sees it (np.array(data, dtype=uint8) in
    `mlflow models predict` and `serve`), which truncates 0..1 floats to 0: every image classified as
    black, exit 0. Without one, JSON integers arrive as int64 and floats as float64, and
    inference.check_images takes the first and refuses the second with a clear message."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from cifarpipe.serving.inference import PROB_PREFIX, SIDE

    if example.dtype != np.uint8 or example.shape[1:] != (SIDE, SIDE, 3):
        raise ValueError(f"the input example must be uint8 images (N, {SIDE}, {SIDE}, 3), got {example.dtype} "
                         f"{example.shape}")
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "class"), ColSpec("long", "class_index"), ColSpec("double", "probability")]
                       + [ColSpec("double", PROB_PREFIX + name) for name in classes]))
