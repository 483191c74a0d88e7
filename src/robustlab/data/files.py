"""Loaders for users' own copies of standard datasets (nothing is downloaded):

- `mnist`: the four IDX files (`train-images-idx3-ubyte`, ..., optionally `.gz`)
- `cifar10` / `cifar100`: the python pickle batches (`data_batch_1..5` + `test_batch`, or `train` + `test`)
- `svhn`: `train_32x32.mat` and `test_32x32.mat`
- `tiny-imagenet`: `train/<wnid>/images/*.JPEG`, `val/images/*.JPEG` + `val/val_annotations.txt`, `wnids.txt`
  (training images streamed from disk by DataLoader workers; `image-folder` too with stream=true)
- `image-folder`: `<root>/train/<class>/*` and `<root>/test/<class>/*` (any image format Pillow reads)
- `cifar10-c`: `<corruption>.npy` (N*5 images, severities 1..5 in blocks) + `labels.npy`

Each takes `root` and returns an ImageData; a missing or malformed file raises DataError naming the
path and the layout expected. Pickles are read with a restricted unpickler that admits only the plain
containers and numpy arrays CIFAR batches consist of (never arbitrary code).
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from robustlab import rng
from robustlab.data.embedded import ImageData, as_float_images, take
from robustlab.data.loading import ImageFiles, read_image_array
from robustlab.errors import DataError
from robustlab.registry import DATASETS


def _need(path: Path, layout: str) -> Path:
    if not path.exists():
        raise DataError(f"missing {path}; expected layout: {layout}")
    return path


def _find(root: Path, names: list[str], layout: str) -> Path:
    for n in names:
        if (root / n).exists():
            return root / n
    raise DataError(f"none of {', '.join(names)} found in {root}; expected layout: {layout}")


def _to_data(name: str, x_tr, y_tr, x_te, y_te, num_classes: int) -> ImageData:
    """Training images stay uint8 (converted per batch on the device), test images become float in [0, 1]."""
    def pixels(a):
        return torch.from_numpy(np.array(a, copy=True))  # own, writable memory (IDX buffers are read-only)

    def imgs(a):
        return as_float_images(pixels(a)).float()

    def labels(a):
        return torch.from_numpy(np.array(a, dtype=np.int64, copy=True))

    x_train: torch.Tensor | ImageFiles = x_tr
    if not isinstance(x_tr, ImageFiles):
        t = pixels(x_tr)
        x_train = t if t.dtype == torch.uint8 else t.float()
    return ImageData(name, x_train, labels(y_tr), imgs(x_te), labels(y_te), num_classes)


# -- MNIST IDX --------------------------------------------------------------------------------
MNIST_LAYOUT = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz)"


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is not a valid gzip file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX files are supported (type code {dtype_code:#x})")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (header)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    n = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise DataError(f"{path} is truncated or padded: header says {n} bytes of data, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


@DATASETS.register("mnist")
def mnist(root: str | Path, validation: int = 0) -> ImageData:
    """MNIST from the four IDX files (gzip or not). validation=N holds out the first N training images (not
    trained on), as TensorFlow's read_data_sets does: the adversary-critic paper trains on the last 50,000."""
    root = Path(root)
    parts = []
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        parts.append(read_idx(_find(root, [stem, stem + ".gz", stem.replace("-idx", ".idx")], MNIST_LAYOUT)))
    x_tr, y_tr, x_te, y_te = parts
    for x, y, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"MNIST {split} images {x.shape} and labels {y.shape} do not match in {root}")
    if isinstance(validation, bool) or not isinstance(validation, int) or not 0 <= validation < x_tr.shape[0]:
        raise DataError(f"validation must be an integer in [0, {x_tr.shape[0]}), got {validation!r}")
    x_tr, y_tr = x_tr[validation:], y_tr[validation:]
    return _to_data("mnist", x_tr[:, None], y_tr, x_te[:, None], y_te, 10)


# -- CIFAR pickles ----------------------------------------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """Admits only numpy array reconstruction (what CIFAR batches contain); anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: CIFAR batches contain only arrays and lists")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # malformed pickle
        raise DataError(f"{path} is not a readable CIFAR python batch: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dictionary")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d:
        raise DataError(f"{path} has no 'data' entry (keys: {sorted(d)})")
    return d


def _cifar_arrays(d: dict, label_key: str, path: Path):
    x = np.asarray(d["data"], dtype=np.uint8)
    if x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be N x 3072 uint8, got {x.shape}")
    if label_key not in d:
        raise DataError(f"{path} has no {label_key!r} entry")
    y = np.asarray(d[label_key], dtype=np.int64)
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels")
    return x.reshape(-1, 3, 32, 32), y


@DATASETS.register("cifar10")
def cifar10(root: str | Path) -> ImageData:
    """CIFAR-10 python batches: data_batch_1..5 and test_batch."""
    root = Path(root)
    layout = "data_batch_1 ... data_batch_5 and test_batch (the 'python version' pickles)"
    xs, ys = zip(*(_cifar_arrays(_load_batch(_need(root / f"data_batch_{i}", layout)), "labels", root / f"data_batch_{i}")
                   for i in range(1, 6)))
    x_te, y_te = _cifar_arrays(_load_batch(_need(root / "test_batch", layout)), "labels", root / "test_batch")
    return _to_data("cifar10", np.concatenate(xs), np.concatenate(ys), x_te, y_te, 10)


@DATASETS.register("cifar100")
def cifar100(root: str | Path, label: str = "fine") -> ImageData:
    """CIFAR-100 python pickles `train` and `test`; label='fine' (100 classes) or 'coarse' (20)."""
    root = Path(root)
    layout = "train and test (the CIFAR-100 'python version' pickles)"
    key = {"fine": "fine_labels", "coarse": "coarse_labels"}.get(label)
    if key is None:
        raise DataError(f"CIFAR-100 label must be 'fine' or 'coarse', got {label!r}")
    x_tr, y_tr = _cifar_arrays(_load_batch(_need(root / "train", layout)), key, root / "train")
    x_te, y_te = _cifar_arrays(_load_batch(_need(root / "test", layout)), key, root / "test")
    return _to_data("cifar100", x_tr, y_tr, x_te, y_te, 100 if label == "fine" else 20)


# -- SVHN -------------------------------------------------------------------------------------
def _svhn_split(path: Path):
    from scipy.io import loadmat

    try:
        m = loadmat(str(path))
    except Exception as e:
        raise DataError(f"{path} is not a readable MATLAB file: {e}") from None
    if "X" not in m or "y" not in m:
        raise DataError(f"{path} must contain 'X' (32x32x3xN) and 'y' (Nx1)")
    x = np.transpose(m["X"], (3, 2, 0, 1))
    y = m["y"].reshape(-1).astype(np.int64)
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels")
    return x, y


@DATASETS.register("svhn")
def svhn(root: str | Path) -> ImageData:
    """SVHN cropped digits: train_32x32.mat and test_32x32.mat (label 10 mapped to 0)."""
    root = Path(root)
    layout = "train_32x32.mat and test_32x32.mat"
    x_tr, y_tr = _svhn_split(_need(root / "train_32x32.mat", layout))
    x_te, y_te = _svhn_split(_need(root / "test_32x32.mat", layout))
    return _to_data("svhn", x_tr, y_tr, x_te, y_te, 10)


# -- image folders ----------------------------------------------------------------------------
_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _folder_files(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (split_dir / c).rglob("*") if p.suffix.lower() in _IMG_EXT)
        paths += files
        labels += [ci] * len(files)
    if not paths:
        raise DataError(f"no images found under {split_dir}")
    return paths, labels


def _decode_all(paths: list[Path], size: int | None, mode: str, where: Path) -> np.ndarray:
    xs = [read_image_array(p, size, mode) for p in paths]
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise DataError(f"images under {where} have different sizes {sorted(shapes)[:3]}...; pass size=N to resize")
    return np.stack(xs)


def _image_shape(paths: list[Path], size: int | None, mode: str, where: Path) -> tuple[int, int, int]:
    """(C, H, W) the files decode to, from their headers (no pixel is decoded); one size for all, or size=N."""
    from PIL import Image, UnidentifiedImageError

    channels = 1 if mode == "L" else 3
    if size is not None:
        return (channels, size, size)
    sizes = set()
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.add(im.size)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {p}: {e}") from None
    if len(sizes) > 1:
        raise DataError(f"images under {where} have different sizes {sorted(sizes)[:3]}...; pass size=N to resize")
    w, h = sizes.pop()
    return (channels, h, w)


def _train_images(paths: list[Path], labels: list[int], size: int | None, mode: str, where: Path,
                  stream: bool) -> tuple[np.ndarray | ImageFiles, np.ndarray]:
    """Training images decoded now (uint8 in memory) or left on disk for DataLoader workers (stream=True)."""
    y = np.asarray(labels, dtype=np.int64)
    if not stream:
        return _decode_all(paths, size, mode, where), y
    return ImageFiles(paths, torch.from_numpy(y), size, mode, _image_shape(paths, size, mode, where)), y


@DATASETS.register("image-folder")
def image_folder(root: str | Path, size: int | None = None, grayscale: bool = False, stream: bool = False) -> ImageData:
    """Any class-per-folder tree: <root>/train/<class>/*.png and <root>/test/<class>/*.png. stream=true leaves the
    training images on disk, decoded by DataLoader workers during training (for trees too large for memory)."""
    root = Path(root)
    layout = "<root>/train/<class>/<image> and <root>/test/<class>/<image>"
    train_dir, test_dir = _need(root / "train", layout), _need(root / "test", layout)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {train_dir}; expected layout: {layout}")
    extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"test classes {extra} have no train folder in {train_dir}")
    mode = "L" if grayscale else "RGB"
    x_tr, y_tr = _train_images(*_folder_files(train_dir, classes), size, mode, train_dir, stream)
    test_paths, test_labels = _folder_files(test_dir, classes)
    x_te = _decode_all(test_paths, size, mode, test_dir)
    data = _to_data("image-folder", x_tr, y_tr, x_te, np.asarray(test_labels), len(classes))
    data.classes = list(classes)
    return data


@DATASETS.register("tiny-imagenet")
def tiny_imagenet(root: str | Path, stream: bool = True) -> ImageData:
    """Tiny-ImageNet-200: train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt, wnids.txt. The 100,000
    training images stay on disk, decoded by DataLoader workers during training (stream=false: decoded up front,
    1.2 GB of uint8); the 10,000 validation images (the test split) are decoded now."""
    root = Path(root)
    layout = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    wnids = [w.strip() for w in _need(root / "wnids.txt", layout).read_text().split() if w.strip()]
    if not wnids:
        raise DataError(f"{root / 'wnids.txt'} lists no classes")
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for w in wnids:
        files = sorted(p for p in (_need(root / "train" / w / "images", layout)).glob("*")
                       if p.suffix.lower() in _IMG_EXT)
        paths += files
        labels += [index[w]] * len(files)
    ann = _need(root / "val" / "val_annotations.txt", layout)
    vx, vy = [], []
    for ln, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{ann} line {ln}: expected '<file>\\t<wnid>...', got {line!r}")
        if parts[1] not in index:
            raise DataError(f"{ann} line {ln}: class {parts[1]!r} is not in wnids.txt")
        vx.append(read_image_array(_need(root / "val" / "images" / parts[0], layout), 64, "RGB"))
        vy.append(index[parts[1]])
    if not paths or not vx:
        raise DataError(f"no images found in {root}; expected layout: {layout}")
    x_tr, y_tr = _train_images(paths, labels, 64, "RGB", root / "train", stream)
    return _to_data("tiny-imagenet", x_tr, y_tr, np.stack(vx), np.asarray(vy), len(wnids))


# -- CIFAR-10-C -------------------------------------------------------------------------------
@DATASETS.register("cifar10-c")
def cifar10_c(root: str | Path, corruption: str = "gaussian_noise", severity: int = 5) -> ImageData:
    """CIFAR-10-C style corruption set: <corruption>.npy (5 severity blocks, NHWC uint8) + labels.npy.

    The selected severity block is the test split; the train split is empty (evaluation only).
    """
    root = Path(root)
    layout = "<corruption>.npy (N*5 x 32 x 32 x 3 uint8, severities 1..5 in order) and labels.npy"
    if not 1 <= int(severity) <= 5:
        raise DataError(f"severity must be in 1..5, got {severity}")
    path = root / f"{corruption}.npy"
    if not path.exists():
        avail = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels") if root.exists() else []
        raise DataError(f"missing {path}; corruptions present: {', '.join(avail) or 'none'}; expected layout: {layout}")
    try:
        x = np.load(path, allow_pickle=False)
        y = np.load(_need(root / "labels.npy", layout), allow_pickle=False)
    except ValueError as e:
        raise DataError(f"cannot read {path} or labels.npy as plain arrays: {e}") from None
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] % 5 or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: expected (5N, H, W, C) images matching labels.npy, got {x.shape} and {y.shape}")
    n = x.shape[0] // 5
    block = slice((int(severity) - 1) * n, int(severity) * n)
    x_te = x[block].transpose(0, 3, 1, 2)
    y_te = y[block].astype(np.int64)
    empty = np.zeros((0, *x_te.shape[1:]), dtype=np.uint8)
    return _to_data(f"cifar10-c/{corruption}/{severity}", empty, np.zeros(0, np.int64), x_te, y_te, 10)


# -- class subsets and imbalance --------------------------------------------------------------
def select_classes(data: ImageData, classes: list[int] | None = None, imbalance: dict[int, float] | None = None,
                   seed: int = 0) -> ImageData:
    """Keep only `classes` (relabelled 0..k-1 in the given order) and/or subsample the training set of
    some classes to a fraction (`imbalance={3: 0.3}`), as WPGD's unbalanced two-class studies need."""
    x_tr, y_tr, x_te, y_te, k = data.x_train, data.y_train, data.x_test, data.y_test, data.num_classes
    if imbalance:
        g = torch.Generator().manual_seed(seed)
        keep = torch.ones_like(y_tr, dtype=torch.bool)
        for c, frac in imbalance.items():
            if not 0 < frac <= 1:
                raise DataError(f"imbalance fraction for class {c} must be in (0, 1], got {frac}")
            idx = (y_tr == c).nonzero().squeeze(1)
            drop = idx[rng.randperm(idx.numel(), generator=g)[int(round(frac * idx.numel())):]]
            keep[drop] = False
        kept = keep.nonzero().squeeze(1)
        x_tr, y_tr = take(x_tr, kept), y_tr[kept]
    if classes is not None:
        if len(set(classes)) != len(classes) or any(not 0 <= c < k for c in classes):
            raise DataError(f"classes must be distinct indices in 0..{k - 1}, got {classes}")
        remap = torch.full((k,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        mtr, mte = remap[y_tr] >= 0, remap[y_te] >= 0
        x_tr, y_tr = take(x_tr, mtr.nonzero().squeeze(1)), remap[y_tr[mtr]]
        x_te, y_te = x_te[mte], remap[y_te[mte]]
        k = len(classes)
    return ImageData(data.name, x_tr, y_tr, x_te, y_te, k)


