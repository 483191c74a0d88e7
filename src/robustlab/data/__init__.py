"""Datasets. Every loader returns an ImageData: images in [0, 1] NCHW float32 and int64 labels."""
from robustlab.data import files  # noqa: F401  (registers the file-based datasets)
from robustlab.data.embedded import ImageData, load_dataset
from robustlab.data.files import DataError, select_classes

__all__ = ["ImageData", "load_dataset", "DataError", "select_classes"]
