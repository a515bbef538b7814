"""The import path of the MLflow model's class in models logged by earlier versions of this package.

Their code file (mlflow_model.py, inside each logged model) runs `from cifarpipe.pyfunc import
CifarClassifierModel`. In a process that has already imported this package (the predict command,
a notebook), that import resolves here, not in the model's own copy of the code.
"""
from cifarpipe.serving.pyfunc import CifarClassifierModel, WEIGHTS_ARTIFACT, signature  # noqa: F401
