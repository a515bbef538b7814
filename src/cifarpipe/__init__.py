"""CIFAR-10 training pipeline: the library behind the DVC stages in stages/.

Layers, imports pointing one way (a layer uses only those before it):
  config, atomic, faults -> data -> training (no MLflow) -> serving -> tracking -> pipeline, commands

The public API, importable from here (each loaded on first use, so `import cifarpipe` is cheap):
  load_params, Params                       the validated params.yaml (cifarpipe.config)
  load_arrays, make_split, DeviceBatches    data (cifarpipe.data)
  build_model, build_training, fit,         training (cifarpipe.training)
  train_one_epoch, evaluate
  Classifier                                uint8 images -> classes (cifarpipe.serving.inference)
"""
from importlib import import_module

_API = {
    "load_params": "cifarpipe.config", "Params": "cifarpipe.config",
    "load_arrays": "cifarpipe.data.archive", "make_split": "cifarpipe.data.split",
    "DeviceBatches": "cifarpipe.data.batches",
    "build_model": "cifarpipe.training.models", "build_training": "cifarpipe.training.engine",
    "fit": "cifarpipe.training.engine", "train_one_epoch": "cifarpipe.training.engine",
    "evaluate": "cifarpipe.training.engine",
    "Classifier": "cifarpipe.serving.inference",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'cifarpipe' has no attribute {name!r}")
