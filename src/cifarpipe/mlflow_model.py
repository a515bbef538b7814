"""The code file of the logged MLflow model ("models from code", see cifarpipe.pyfunc): MLflow
copies this file into the model and runs it when the model is loaded. Import nothing from here."""
import mlflow.models

from cifarpipe.pyfunc import CifarClassifierModel

mlflow.models.set_model(CifarClassifierModel())
