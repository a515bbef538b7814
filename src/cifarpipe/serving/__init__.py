"""Serving: the inference path (uint8 images in, classes out) and the MLflow model that wraps it."""
