"""Detection datasets: `mnist-det` (embedded, synthetic), `voc` and `coco` (users' own copies).

A `DetData` holds a train and a test `DetSource`. A source returns batches as pixel-scale float images
(B, 3, S, S) in [0, 255] and padded targets (B, M, 6) (see `targets.py`), so the Trainer and the evaluators
handle detection batches like classification ones. MNIST-Det lives in memory as tensors; VOC and COCO read
their image files per item (in DataLoader workers when training, see `robustlab.data.loading`) and apply the SSD
augmentation pipeline to training items, each with its own seed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from robustlab.detection.folders import VOC_CLASSES, Record, read_coco, read_voc
from robustlab.detection.mnistdet import MnistDetConfig
from robustlab.detection.targets import pad_targets
from robustlab.errors import DataError
from robustlab.registry import DATASETS


class DetSource(ABC):
    """One split, map-style: `item(i, seed)` -> one image and its objects (augmented when a seed is given),
    `collate(items)` -> (images (B, 3, S, S) float in [0, 255], padded targets (B, M, 6)). `batch(idx, seeds)` does
    both in this process; `streams` says whether training reads it through DataLoader workers (files) or indexes
    it in memory."""

    image_size: int
    streams = False

    @abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abstractmethod
    def item(self, i: int, seed: int | None = None) -> tuple[Tensor, ...]:
        """Image i and its objects; with a seed, augmented by a CPU generator seeded with it."""

    @abstractmethod
    def collate(self, items: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, Tensor]:
        """Images and padded targets of a list of items."""

    def batch(self, idx: Tensor, seeds: Sequence[int | None] | None = None) -> tuple[Tensor, Tensor]:
        """Images and padded targets of the indexed images (sample k augmented with seeds[k] when given)."""
        ids = idx.tolist()
        return self.collate([self.item(i, None if seeds is None else seeds[k]) for k, i in enumerate(ids)])

    def original_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image i before resizing (for COCO-format results in original pixels)."""
        return (self.image_size, self.image_size)


class TensorSource(DetSource):
    """Images already at the model's size, held in memory as uint8 (N, 3, S, S) (no augmentation)."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise DataError(f"detection images must be (N, 3, S, S), got {tuple(images.shape)}")
        if targets.shape[0] != images.shape[0]:
            raise DataError(f"{images.shape[0]} images but {targets.shape[0]} target rows")
        self.images, self.targets = images, targets
        self.image_size = int(images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def item(self, i: int, seed: int | None = None) -> tuple[Tensor, ...]:
        return self.images[i], self.targets[i]

    def collate(self, items: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, Tensor]:
        images, targets = zip(*items)
        return torch.stack(images).float(), torch.stack(targets)

    def batch(self, idx: Tensor, seeds: Sequence[int | None] | None = None) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.images.device)
        return self.images[idx].float(), self.targets[idx]

    def to(self, device: torch.device) -> "TensorSource":
        """This source with its tensors on `device` (data_on_device: the whole split lives on the GPU)."""
        return TensorSource(self.images.to(device), self.targets.to(device))


class SubsetSource(DetSource):
    """The images `indices` of another source (a validation split carved from a training source)."""

    def __init__(self, source: DetSource, indices: Tensor) -> None:
        self.source, self.indices = source, indices.long()
        self.image_size = source.image_size
        self.streams = source.streams

    def __len__(self) -> int:
        return int(self.indices.numel())

    def item(self, i: int, seed: int | None = None) -> tuple[Tensor, ...]:
        return self.source.item(int(self.indices[i]), seed)

    def collate(self, items: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, Tensor]:
        return self.source.collate(items)

    def batch(self, idx: Tensor, seeds: Sequence[int | None] | None = None) -> tuple[Tensor, Tensor]:
        return self.source.batch(self.indices[idx.cpu()], seeds)

    def original_size(self, i: int) -> tuple[int, int]:
        return self.source.original_size(int(self.indices[i]))

    def to(self, device: torch.device) -> "SubsetSource":
        if not isinstance(self.source, TensorSource):
            raise DataError("only in-memory detection data can live on the device (data_on_device)")
        return SubsetSource(self.source.to(device), self.indices)


class FileSource(DetSource):
    """Image files with annotations, decoded per item (in DataLoader workers when training): training items go
    through the SSD augmentation with a CPU generator seeded by the item's own seed, test items are resized."""

    streams = True

    def __init__(self, records: Sequence[Record], image_size: int, mean_rgb: Sequence[float], flip: bool = True) -> None:
        self.records = list(records)
        self.image_size = int(image_size)
        self.mean_rgb = tuple(float(m) for m in mean_rgb)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.records)

    def original_size(self, i: int) -> tuple[int, int]:
        r = self.records[i]
        return (r.width, r.height)

    def item(self, i: int, seed: int | None = None) -> tuple[Tensor, ...]:
        from robustlab.detection.transforms import read_image, resize, ssd_augment

        r = self.records[i]
        img = read_image(r.path)
        b = torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4)
        lab = torch.as_tensor(r.labels, dtype=torch.int64)
        d = torch.as_tensor(r.difficult, dtype=torch.bool)
        if seed is not None:
            img, b, lab, d = ssd_augment(img, b, lab, d, self.mean_rgb, torch.Generator().manual_seed(seed),
                                         flip=self.flip)
        img, b = resize(img, b, self.image_size)
        return img, b, lab, d

    def collate(self, items: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, Tensor]:
        images, boxes, labels, diffs = zip(*items)
        return torch.stack(images), pad_targets(boxes, labels, diffs)


@dataclass
class DetData:
    name: str
    train: DetSource
    test: DetSource
    num_classes: int
    class_names: list[str]
    mean: list[float]  # per-channel RGB mean, pixel scale (subtracted inside the model)
    info: dict[str, Any] = field(default_factory=dict)
    task = "detection"

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def input_size(self) -> int:
        return self.train.image_size

    def model_kwargs(self) -> dict[str, Any]:
        return {"in_channels": 3, "num_classes": self.num_classes, "input_size": self.input_size,
                "mean": [round(m, 4) for m in self.mean], "class_names": self.class_names}

    def hold_out(self, n_val: int, seed: int = 0) -> tuple["DetData", DetSource]:
        """(this data with n_val training images removed, the validation source of those images, read without
        augmentation), seeded by `seed` alone."""
        from robustlab.data.embedded import split_indices

        train_idx, val_idx = split_indices(len(self.train), n_val, seed)
        rest = DetData(self.name, SubsetSource(self.train, train_idx), self.test, self.num_classes, self.class_names,
                       self.mean, dict(self.info))
        return rest, SubsetSource(self.train, val_idx)


def tensor_source(split: dict[str, np.ndarray], size: int) -> TensorSource:
    images = torch.from_numpy(split["images"]).permute(0, 3, 1, 2).contiguous()
    off = split["offsets"]
    boxes = [torch.from_numpy(split["boxes"][off[i]:off[i + 1]]) / size for i in range(len(off) - 1)]
    labels = [torch.from_numpy(split["labels"][off[i]:off[i + 1]]) for i in range(len(off) - 1)]
    return TensorSource(images, pad_targets(boxes, labels))


@DATASETS.register("mnist-det")
def mnist_det(preset: str = "voc", n_train: int = 2000, n_test: int = 500, image_size: int = 96, alpha: float = 1.0,
              seed: int = 0, regenerate: bool = False, **overrides: Any) -> DetData:
    """MNIST-Det: multi-object, multi-class detection scenes from real MNIST digits (presets voc, coco)."""
    from robustlab.detection.mnistdet import load_or_generate, make_config

    cfg = make_config(preset, n_train=n_train, n_test=n_test, image_size=image_size, alpha=alpha, seed=seed, **overrides)
    d = load_or_generate(cfg, regenerate=regenerate)
    from dataclasses import asdict

    return DetData(f"mnist-det-{preset}", tensor_source(d["train"], image_size), tensor_source(d["test"], image_size),
                   10, [str(i) for i in range(10)], [float(m) for m in d["mean"]["rgb"]], {"generator": asdict(cfg)})


mnist_det.forwards_options_to = (MnistDetConfig,)  # type: ignore[attr-defined]  # generator settings

VOC_MEAN = (123.0, 117.0, 104.0)


@DATASETS.register("voc")
def voc(root: str | None = None, train_sets: Sequence[str] = ("2007/trainval", "2012/trainval"),
        test_set: str = "2007/test", image_size: int = 300) -> DetData:
    """PASCAL VOC from a local copy: root/VOC2007, root/VOC2012 (07+12 trainval -> 07 test by default)."""
    if root is None:
        raise DataError("the voc dataset needs root=<folder holding VOC2007/ and VOC2012/> (dataset_kwargs.root)")
    train = [r for s in train_sets for r in read_voc(root, s, keep_difficult=False)]
    test = read_voc(root, test_set, keep_difficult=True)
    return DetData("voc", FileSource(train, image_size, VOC_MEAN), FileSource(test, image_size, VOC_MEAN),
                   len(VOC_CLASSES), list(VOC_CLASSES), list(VOC_MEAN), {"root": str(root)})


@DATASETS.register("coco")
def coco(root: str | None = None, train_split: str = "train2017", test_split: str = "val2017",
         image_size: int = 300) -> DetData:
    """MS-COCO from a local copy: root/{train2017,val2017}/ and root/annotations/instances_*.json."""
    if root is None:
        raise DataError("the coco dataset needs root=<folder holding train2017/, val2017/, annotations/>")
    train, names, ids = read_coco(root, train_split, training=True)
    test, names_t, _ = read_coco(root, test_split, training=False)
    if names != names_t:
        raise DataError(f"COCO {train_split} and {test_split} annotation files list different categories")
    return DetData("coco", FileSource(train, image_size, VOC_MEAN), FileSource(test, image_size, VOC_MEAN),
                   len(names), names, list(VOC_MEAN), {"root": str(root), "category_ids": ids})


def load_detection_data(name: str, **kwargs: Any) -> DetData:
    data = DATASETS.create(name, **kwargs)
    if not isinstance(data, DetData):
        raise DataError(f"dataset {name!r} is not a detection dataset")
    return data
