"""The code file of the logged MLflow model ("models from code", see cifarpipe.serving.pyfunc): MLflow
copies this file into the model and runs it when the model is loaded. Import nothing from here."""
import mlflow.models

from cifarpipe.serving.pyfunc import CifarClassifierModel

mlflow.models.set_model(CifarClassifierModel())
