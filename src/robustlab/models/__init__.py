"""Classifier architectures. Inputs are images in [0, 1]; normalisation is a module inside the model."""
from robustlab.models import classifiers as _classifiers  # noqa: F401  (registers the models)
from robustlab.models.classifiers import Normalize, create_model, model_config

__all__ = ["Normalize", "create_model", "model_config"]
