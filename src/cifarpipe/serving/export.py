"""The inference path as one portable graph: uint8 images (N, 32, 32, 3) in, class probabilities
(N, classes) out, for runtimes that have neither this package nor MLflow.

The graph holds the run's normalisation, computed as inference.normalise computes it (x * scale
+ shift in one addcmul, with the same float32 constants), then the network on the model's
test-time views (model.tta, averaged as engine.eval_logits averages them), then a softmax: what
`Classifier.probabilities` returns for the same images. The batch dimension is dynamic. The class
names travel in the file (ONNX metadata `classes`, the .pt2 archive's extra file `classes.json`).

Formats: ONNX (torch.onnx.export's default exporter, which needs the `onnx` extra: onnx,
onnxscript; onnxruntime runs it) and torch.export's .pt2 (torch alone). Pure: bytes in, bytes out;
the command (cifarpipe.commands.export) reads and writes the files.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from cifarpipe.config import UserError
from cifarpipe.serving.inference import BATCH, SIDE, Classifier, check_images
from cifarpipe.training.engine import eval_logits

Format = Literal["onnx", "pt2"]
INPUT, OUTPUT = "images", "probabilities"  # the graph's input and output names
CLASSES_KEY = "classes"  # ONNX metadata key; in a .pt2: extra file classes.json
_EXAMPLE_BATCH = 4  # a batch of 1 would let the exporter specialise the batch dimension to 1


class ExportedClassifier(nn.Module):
    """uint8 NHWC images -> probabilities, the normalisation and the test-time views inside."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.network, self.tta = classifier.network.eval(), classifier.tta
        # Exactly inference.normalise's constants: float32, the same operations in the same order.
        std_255 = torch.tensor(classifier.std).view(1, 3, 1, 1) * 255
        self.register_buffer("scale", 1 / std_255)
        self.register_buffer("shift", -torch.tensor(classifier.mean).view(1, 3, 1, 1) * 255 / std_255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.permute(0, 3, 1, 2).float(), self.scale)
        return torch.softmax(eval_logits(self.network, x, tta=self.tta), dim=1)


def _module_and_example(classifier: Classifier) -> tuple[nn.Module, torch.Tensor, dict]:
    module = ExportedClassifier(classifier).to("cpu").eval()
    example = torch.zeros(_EXAMPLE_BATCH, SIDE, SIDE, 3, dtype=torch.uint8)
    dynamic = {INPUT: {0: torch.export.Dim("batch", min=1)}}
    return module, example, dynamic


def export_bytes(classifier: Classifier, fmt: Format) -> bytes:
    """The exported file's bytes."""
    module, example, dynamic = _module_and_example(classifier)
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            buf = io.BytesIO()
            torch.export.save(program, buf, extra_files={f"{CLASSES_KEY}.json": json.dumps(classifier.classes)})
            return buf.getvalue()
        return _onnx_bytes(module, example, dynamic, classifier.classes)


def _onnx_bytes(module: nn.Module, example: torch.Tensor, dynamic: dict, classes: list[str]) -> bytes:
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'cifarpipe[onnx]' (onnx, onnxscript, "
                        "onnxruntime); --format pt2 needs only torch") from None
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                dynamic_shapes=dynamic, external_data=False, verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = CLASSES_KEY, json.dumps(classes)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


Runner = Callable[[np.ndarray], np.ndarray]


def load_runner(data: bytes, fmt: Format) -> tuple[Runner, list[str]]:
    """probabilities(uint8 images) of an exported file's bytes, run by its own runtime (onnxruntime
    for ONNX, torch.export.load for .pt2), in batches of BATCH; and the class names it carries."""
    if fmt == "pt2":
        extra = {f"{CLASSES_KEY}.json": ""}
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
        module = program.module()

        @torch.no_grad()
        def run(x: np.ndarray) -> np.ndarray:
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

        return _batched(run), json.loads(extra[f"{CLASSES_KEY}.json"])
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("checking an ONNX file needs onnxruntime: pip install 'cifarpipe[onnx]'") from None
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return _batched(lambda x: session.run([OUTPUT], {INPUT: np.ascontiguousarray(x)})[0]), json.loads(meta[CLASSES_KEY])


def _batched(run: Runner) -> Runner:
    def batched(images: np.ndarray) -> np.ndarray:
        x = check_images(images)
        return np.concatenate([run(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]) if len(x) else np.zeros((0, 0))
    return batched
