"""Image decoding and the SSD training augmentation (cwat.md 1.7) in torch: photometric distortion, expand
(zoom out), IoU-constrained random crop, horizontal flip, resize. Images are (3, H, W) float in [0, 255],
boxes (M, 4) in pixels; randomness comes from one torch.Generator, so a seeded run is reproducible."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab import rng
from robustlab.data.files import DataError
from robustlab.detection.boxes import box_iou

CROP_MIN_IOU = (None, 0.1, 0.3, 0.7, 0.9, -1.0)  # None: keep the whole image; -1: unconstrained


def read_image(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise DataError(f"image file {path} is missing")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resize(img: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Bilinear resize to size x size; boxes go from pixels to [0, 1]."""
    _, h, w = img.shape
    # bilinear is a convex combination: the clamp only removes float rounding (255.00002 on some CPUs' kernels)
    out = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp_(0, 255)
    scale = torch.tensor([w, h, w, h], dtype=boxes.dtype)
    return out, (boxes / scale).clamp(0, 1)


def _u(gen: torch.Generator | None, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(rng.rand((), generator=gen))


def rgb_to_hsv(img: Tensor) -> Tensor:
    r, g, b = img / 255.0
    mx, mn = img.max(0).values / 255.0, img.min(0).values / 255.0
    d = mx - mn
    h = torch.zeros_like(mx)
    safe = torch.where(d > 0, d, torch.ones_like(d))
    h = torch.where(mx == r, ((g - b) / safe) % 6, h)
    h = torch.where(mx == g, (b - r) / safe + 2, h)
    h = torch.where(mx == b, (r - g) / safe + 4, h)
    h = torch.where(d > 0, h * 60.0, torch.zeros_like(h))
    s = torch.where(mx > 0, d / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    return torch.stack([h, s, mx])


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv
    h = (h % 360) / 60.0
    c = v * s
    x = c * (1 - ((h % 2) - 1).abs())
    m = v - c
    z = torch.zeros_like(h)
    i = h.floor().long().clamp(0, 5)
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    out = torch.zeros(3, *h.shape, dtype=hsv.dtype)
    for k, (a, b_, cc) in enumerate(table):
        sel = i == k
        out[0] = torch.where(sel, a, out[0])
        out[1] = torch.where(sel, b_, out[1])
        out[2] = torch.where(sel, cc, out[2])
    return (out + m) * 255.0


def photometric(img: Tensor, gen: torch.Generator | None) -> Tensor:
    img = img.clone()
    if _u(gen) < 0.5:
        img = img + _u(gen, -32, 32)
    contrast_first = _u(gen) < 0.5
    if contrast_first and _u(gen) < 0.5:
        img = img * _u(gen, 0.5, 1.5)
    img = img.clamp(0, 255)
    hsv = rgb_to_hsv(img)
    if _u(gen) < 0.5:
        hsv[1] = (hsv[1] * _u(gen, 0.5, 1.5)).clamp(0, 1)
    if _u(gen) < 0.5:
        hsv[0] = hsv[0] + _u(gen, -18, 18)
    img = hsv_to_rgb(hsv)
    if not contrast_first and _u(gen) < 0.5:
        img = img * _u(gen, 0.5, 1.5)
    if _u(gen) < 0.5:
        img = img[rng.randperm(3, generator=gen)]
    return img.clamp(0, 255)


def expand(img: Tensor, boxes: Tensor, mean_rgb: Sequence[float], gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    if _u(gen) < 0.5:
        return img, boxes
    _, h, w = img.shape
    r = _u(gen, 1, 4)
    hh, ww = int(h * r), int(w * r)
    top, left = int(_u(gen, 0, hh - h)), int(_u(gen, 0, ww - w))
    canvas = torch.tensor(list(mean_rgb), dtype=img.dtype).view(3, 1, 1).expand(3, hh, ww).clone()
    canvas[:, top:top + h, left:left + w] = img
    return canvas, boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)


def random_crop(img: Tensor, boxes: Tensor, labels: Tensor, difficult: Tensor, gen: torch.Generator | None,
                modes: Sequence[float | None] = CROP_MIN_IOU):
    """SSD's sampler: choose a mode; up to 50 patches with sides U(0.3, 1) of the image and aspect in [0.5, 2]
    whose minimum IoU with every box is >= the mode's threshold; keep the boxes whose centre lies inside."""
    _, h, w = img.shape
    for _ in range(100):  # bounded: a mode no patch can satisfy ends in the whole image, not in a hang
        mode = modes[int(rng.randint(len(modes), (), generator=gen))]
        if mode is None or boxes.shape[0] == 0:
            return img, boxes, labels, difficult
        for _ in range(50):
            cw, ch = _u(gen, 0.3 * w, w), _u(gen, 0.3 * h, h)
            if not 0.5 <= ch / cw <= 2:
                continue
            left, top = _u(gen, 0, w - cw), _u(gen, 0, h - ch)
            rect = torch.tensor([[int(left), int(top), int(left + cw), int(top + ch)]], dtype=boxes.dtype)
            if box_iou(boxes, rect).min() < mode:  # the intended test (the reference's never rejects)
                continue
            centers = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = ((centers > rect[0, :2]) & (centers < rect[0, 2:])).all(1)
            if not inside.any():
                continue
            x1, y1, x2, y2 = (int(v) for v in rect[0].tolist())
            b = boxes[inside].clone()
            b[:, :2] = torch.maximum(b[:, :2], rect[0, :2]) - rect[0, :2]
            b[:, 2:] = torch.minimum(b[:, 2:], rect[0, 2:]) - rect[0, :2]
            return img[:, y1:y2, x1:x2], b, labels[inside], difficult[inside]
    return img, boxes, labels, difficult


def ssd_augment(img: Tensor, boxes: Tensor, labels: Tensor, difficult: Tensor, mean_rgb: Sequence[float],
                gen: torch.Generator | None, flip: bool = True):
    img = photometric(img, gen)
    img, boxes = expand(img, boxes, mean_rgb, gen)
    img, boxes, labels, difficult = random_crop(img, boxes, labels, difficult, gen)
    if flip and _u(gen) < 0.5:
        w = img.shape[-1]
        img = img.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    return img, boxes, labels, difficult
