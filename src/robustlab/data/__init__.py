"""Datasets. Every loader returns a `TensorDataset`-like pair of (images in [0, 1] NCHW float32, int64 labels)."""
from robustlab.data.embedded import ImageData, load_dataset

__all__ = ["ImageData", "load_dataset"]
