"""Synthetic stand-ins for the datasets robustlab reads from users' files, written in each dataset's real on-disk
format (MNIST IDX, CIFAR python pickles, SVHN .mat, Tiny-ImageNet and class folders, CIFAR-10-C .npy, VOC XML,
COCO JSON) at the real image size and class count, so `robustlab train --smoke` and the tests exercise the real
loaders without the real data. Images are seeded noise; boxes are random but valid.

`write_standin(dataset, folder, n_train, n_test, seed, dataset_kwargs)` writes the files and returns the
dataset_kwargs that point the dataset's loader at them; a dataset without files (embedded) gets its kwargs back.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from robustlab.errors import DataError

Writer = Callable[[Path, int, int, np.random.Generator, dict[str, Any]], dict[str, Any]]
WRITERS: dict[str, Writer] = {}


def _writer(name: str) -> Callable[[Writer], Writer]:
    def register(f: Writer) -> Writer:
        WRITERS[name] = f
        return f
    return register


def write_standin(dataset: str, folder: str | Path, n_train: int, n_test: int, seed: int = 0,
                  dataset_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes a stand-in for `dataset` under `folder`; returns the dataset_kwargs (the given ones, e.g. a VOC
    image_size, with `root` pointing at the stand-in) that load it."""
    dataset_kwargs = dict(dataset_kwargs or {})
    if dataset not in WRITERS:
        return dataset_kwargs  # embedded data needs no files
    if n_train < 0 or n_test < 1:
        raise DataError(f"a stand-in needs n_train >= 0 and n_test >= 1 images, got {n_train} and {n_test}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return WRITERS[dataset](folder, n_train, n_test, rng, dataset_kwargs)


def _labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n labels covering as many of the k classes as n allows."""
    return (np.arange(n) + rng.integers(0, k)) % k


def _save_image(path: Path, hwc: np.ndarray, quality: int = 90) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hwc.squeeze(-1) if hwc.shape[-1] == 1 else hwc).save(path, quality=quality)


# -- classification ------------------------------------------------------------------------------------
def _idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.astype(np.uint8).tobytes()


@_writer("mnist")
def _mnist(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    for stem, n in (("train", n_train), ("t10k", n_test)):
        (root / f"{stem}-images-idx3-ubyte").write_bytes(_idx_bytes(rng.integers(0, 256, (n, 28, 28))))
        (root / f"{stem}-labels-idx1-ubyte").write_bytes(_idx_bytes(_labels(rng, n, 10)))
    kw.pop("validation", None)  # a count of the real 60,000; the stand-in holds n_train
    return {**kw, "root": str(root)}


def _cifar_pickle(path: Path, n: int, rng: np.random.Generator, labels: dict[str, int]) -> None:
    d: dict[bytes, Any] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    for key, k in labels.items():
        d[key.encode()] = _labels(rng, n, k).tolist()  # the real batches hold plain lists
    path.write_bytes(pickle.dumps(d))


@_writer("cifar10")
def _cifar10(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    per = np.diff(np.linspace(0, n_train, 6).round().astype(int))
    for i, n in enumerate(per, start=1):
        _cifar_pickle(root / f"data_batch_{i}", int(n), rng, {"labels": 10})
    _cifar_pickle(root / "test_batch", n_test, rng, {"labels": 10})
    return {**kw, "root": str(root)}


@_writer("cifar100")
def _cifar100(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    for split, n in (("train", n_train), ("test", n_test)):
        _cifar_pickle(root / split, n, rng, {"fine_labels": 100, "coarse_labels": 20})
    return {**kw, "root": str(root)}


@_writer("svhn")
def _svhn(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    from scipy.io import savemat

    for split, n in (("train", n_train), ("test", n_test)):
        y = _labels(rng, n, 10)
        y[y == 0] = 10  # SVHN's label for the digit 0
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                               "y": y.reshape(-1, 1).astype(np.uint8)})
    return {**kw, "root": str(root)}


@_writer("tiny-imagenet")
def _tiny_imagenet(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    wnids = [f"n{i:08d}" for i in range(200)]
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    for i, c in enumerate(_labels(rng, n_train, 200)):
        _save_image(root / "train" / wnids[c] / "images" / f"{wnids[c]}_{i}.JPEG", rng.integers(0, 256, (64, 64, 3), np.uint8))
    for w in wnids:  # the loader reads every class's folder
        (root / "train" / w / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, c in enumerate(_labels(rng, n_test, 200)):
        _save_image(root / "val" / "images" / f"val_{i}.JPEG", rng.integers(0, 256, (64, 64, 3), np.uint8))
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return {**kw, "root": str(root)}


@_writer("image-folder")
def _image_folder(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    k = 10  # the folder tree names its classes; ten, like most of the seeds' datasets
    size = int(kw.get("size") or 32)
    channels = 1 if kw.get("grayscale") else 3
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(k):
            (root / split / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(_labels(rng, n, k)):
            _save_image(root / split / f"class{c:03d}" / f"{i}.png", rng.integers(0, 256, (size, size, channels), np.uint8))
    return {**kw, "root": str(root)}


@_writer("cifar10-c")
def _cifar10_c(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    corruption = kw.get("corruption", "gaussian_noise")
    np.save(root / f"{corruption}.npy", rng.integers(0, 256, (5 * n_test, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(_labels(rng, n_test, 10), 5).astype(np.int64))
    return {**kw, "root": str(root)}


# -- detection -----------------------------------------------------------------------------------------
def _boxes(rng: np.random.Generator, w: int, h: int, k: int, n_obj: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    out = []
    for _ in range(n_obj):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = int(rng.integers(x0 + w // 8, w)), int(rng.integers(y0 + h // 8, h))
        out.append((int(rng.integers(0, k)), (x0, y0, x1, y1)))
    return out


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Original (width, height) around the model's size, not square: the loaders resize."""
    return int(size * rng.uniform(0.8, 1.3)), int(size * rng.uniform(0.8, 1.3))


@_writer("voc")
def _voc(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    from robustlab.detection.folders import VOC_CLASSES

    size = int(kw.get("image_size", 300))
    train_sets = list(kw.get("train_sets", ("2007/trainval", "2012/trainval")))
    test_set = kw.get("test_set", "2007/test")
    per_set = {s: int(n) for s, n in zip(train_sets, np.diff(np.linspace(0, n_train, len(train_sets) + 1).round()))}
    per_set[test_set] = per_set.get(test_set, 0) + n_test
    serial = 0
    for image_set, n in per_set.items():
        year, _, split = image_set.partition("/")
        base = root / f"VOC{year}"
        (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (base / "Annotations").mkdir(exist_ok=True)
        ids = []
        for _ in range(n):
            serial += 1
            image_id = f"{year}_{serial:06d}"
            w, h = _image_size(rng, size)
            _save_image(base / "JPEGImages" / f"{image_id}.jpg", rng.integers(0, 256, (h, w, 3), np.uint8))
            objects = "".join(
                f"<object><name>{VOC_CLASSES[c]}</name><difficult>{int(rng.random() < 0.1)}</difficult><bndbox>"
                f"<xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                for c, b in _boxes(rng, w, h, len(VOC_CLASSES), int(rng.integers(1, 4))))
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
                f"<depth>3</depth></size>{objects}</annotation>")
            ids.append(image_id)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return {**kw, "root": str(root)}


COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80


@_writer("coco")
def _coco(root: Path, n_train: int, n_test: int, rng: np.random.Generator, kw: dict) -> dict:
    size = int(kw.get("image_size", 300))
    categories = [{"id": c, "name": f"category{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    image_id = ann_id = 0
    for split, n in ((kw.get("train_split", "train2017"), n_train), (kw.get("test_split", "val2017"), n_test)):
        images, annotations = [], []
        for _ in range(n):
            image_id += 1
            w, h = _image_size(rng, size)
            name = f"{image_id:012d}.jpg"
            _save_image(root / split / name, rng.integers(0, 256, (h, w, 3), np.uint8))
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for c, (x0, y0, x1, y1) in _boxes(rng, w, h, len(COCO_CATEGORY_IDS), int(rng.integers(1, 4))):
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[c],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                                    "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {**kw, "root": str(root)}

