"""The 19 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) at their CIFAR severity parameters,
written in numpy / scipy / PIL (no OpenCV, ImageMagick or scikit-image).

`corrupt(images, "fog", severity=3, seed=0)` takes (N, H, W, C) uint8 or float images in [0, 1] and
returns the same shape and dtype; each image's randomness comes from a generator seeded by (seed,
corruption, image index), the same for every severity, so a call is reproducible and the severities of
one image differ only by their parameters. `write_cifar10_c(images, labels, out_dir)` writes the layout the
`cifar10-c` dataset reads: `<corruption>.npy` with the 5 severities stacked in order, and `labels.npy`.

Where the original relies on a library robustlab does not use, the routine is re-derived and marked
"approximate" in its docstring: motion blur (ImageMagick's one-sided Gaussian line kernel), spatter's
water branch (edges and distance transform with scipy instead of Canny), and frost, whose original
overlays crops of six frost photographs that cannot ship here: robustlab synthesises a frost texture.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from scipy import ndimage

from robustlab.errors import DataError, InputTypeError
from robustlab.outputs import atomic_save_npy, atomic_write_text

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "gaussian_blur", "snow", "frost", "fog", "brightness", "spatter",
               "contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate")


# -- helpers ----------------------------------------------------------------------------------
def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the spatial axes of (H, W, C) or (H, W)."""
    s = (sigma, sigma, 0) if x.ndim == 3 else (sigma, sigma)
    return ndimage.gaussian_filter(x, s, mode="nearest", truncate=4.0)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    half = 8 if radius <= 8 else int(np.ceil(radius))
    r = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(r, r)
    k = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    k /= k.sum()
    return ndimage.gaussian_filter(k, alias_blur, mode="constant", truncate=2.0 if radius <= 8 else 3.0)


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of img by `factor` (>= 1) back to its own size (bilinear)."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[top:top + ch, left:left + cw]
    z = ndimage.zoom(crop, (factor, factor) + (1,) * (img.ndim - 2), order=1)
    th, tw = (z.shape[0] - h) // 2, (z.shape[1] - w) // 2
    return z[th:th + h, tw:tw + w]


def _motion_kernel_blur(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Approximate ImageMagick motion blur: a one-sided line of Gaussian weights exp(-i^2 / 2 sigma^2),
    i = 0..radius pixels, along `angle` degrees, sampled with bilinear shifts."""
    offsets = np.arange(0, int(np.ceil(radius)) + 1, dtype=np.float64)
    w = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    t = np.deg2rad(angle)
    out = np.zeros_like(img, dtype=np.float64)
    for o, wt in zip(offsets, w):
        shift = (o * np.sin(t), o * np.cos(t)) + (0,) * (img.ndim - 2)
        out += wt * ndimage.shift(img, shift, order=1, mode="nearest")
    return out


def _plasma(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square plasma fractal on a size x size grid (size a power of two), scaled to [0, 1]."""
    m = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        sq = corners + np.roll(corners, -1, 0)
        sq = sq + np.roll(sq, -1, 1)
        m[half:size:step, half:size:step] = sq / 4 + wibble * rng.uniform(-wibble, wibble, sq.shape)
        centres = m[half:size:step, half:size:step]
        ul = m[0:size:step, 0:size:step]
        a = centres + np.roll(centres, 1, 0) + ul + np.roll(ul, -1, 1)
        m[0:size:step, half:size:step] = a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)
        b = centres + np.roll(centres, 1, 1) + ul + np.roll(ul, -1, 0)
        m[half:size:step, 0:size:step] = b / 4 + wibble * rng.uniform(-wibble, wibble, b.shape)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / max(m.max(), 1e-12)


def _gray(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114]) if x.shape[-1] == 3 else x[..., 0]


def _pil(x: np.ndarray):
    from PIL import Image

    u8 = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)


def _from_pil(img, channels: int) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64) / 255
    return a[..., None] if a.ndim == 2 else a[..., :channels]


# -- the corruptions (one image (H, W, C) float64 in [0, 1] -> same) -------------------------------
def gaussian_noise(x, s, rng):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return x + rng.normal(size=x.shape, scale=c)


def shot_noise(x, s, rng):
    c = [500, 250, 100, 75, 50][s - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x, s, rng):
    """Salt and pepper on a fraction `amount` of the elements, half each."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    u = rng.random(x.shape)
    out = x.copy()
    out[u < c / 2] = 0.0
    out[(u >= c / 2) & (u < c)] = 1.0
    return out


def speckle_noise(x, s, rng):
    c = [0.06, 0.1, 0.12, 0.16, 0.2][s - 1]
    return x + x * rng.normal(size=x.shape, scale=c)


def gaussian_blur(x, s, rng):
    return _blur(x, [0.4, 0.6, 0.7, 0.8, 1.0][s - 1])


def glass_blur(x, s, rng):
    """Blur, locally shuffle pixels (sequential swaps with a random neighbour), blur again. Runs on the whole
    batch (N, H, W, C) at once: the swap sweep is sequential in the pixels, vectorised over the images."""
    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    n, h, w = x.shape[:3]
    y = np.floor(np.clip(ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest"), 0, 1) * 255) / 255
    ar = np.arange(n)
    for _ in range(iters):
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                d = rng.integers(-delta, delta, size=(2, n))
                i2, j2 = i + d[1], j + d[0]
                a, b = y[ar, i, j].copy(), y[ar, i2, j2].copy()
                y[ar, i, j], y[ar, i2, j2] = b, a
    return ndimage.gaussian_filter(y, (0, sigma, sigma, 0), mode="nearest")


def defocus_blur(x, s, rng):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    k = _disk(radius, alias)
    return np.stack([ndimage.convolve(x[..., ch], k, mode="reflect") for ch in range(x.shape[-1])], -1)


def motion_blur(x, s, rng):
    """Approximate: a one-sided Gaussian line kernel in a random direction in [-45, 45] degrees."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    return _motion_kernel_blur(x, radius, sigma, rng.uniform(-45, 45))


def zoom_blur(x, s, rng):
    top = [1.06, 1.11, 1.16, 1.21, 1.26][s - 1]
    factors = np.arange(1, top, 0.01)
    out = sum(_clipped_zoom(x, f) for f in factors)
    return (x + out) / (len(factors) + 1)


def snow(x, s, rng):
    """Snow flakes (thresholded, zoomed noise streaked by motion blur) over a brightened image."""
    loc, scale, zoom, thresh, radius, sigma, keep = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    h, w = x.shape[:2]
    layer = rng.normal(size=(h, w), loc=loc, scale=scale)
    layer = _clipped_zoom(layer[..., None], zoom)[..., 0]
    layer[layer < thresh] = 0
    layer = np.round(np.clip(layer, 0, 1) * 255) / 255
    layer = _motion_kernel_blur(layer, radius, sigma, rng.uniform(-135, -45))[..., None]
    bright = np.maximum(x, _gray(x)[..., None] * 1.5 + 0.5)
    y = keep * x + (1 - keep) * bright
    return y + layer + np.rot90(layer, k=2)


def _frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic frost: a plasma haze with thin bright crystal needles, pale blue-white, 0..255 (approximate:
    the original crops one of six frost photographs)."""
    size = 1 << int(np.ceil(np.log2(max(h, w, 8))))
    haze = _plasma(size, 2.0, rng)[:h, :w]
    needles = np.zeros((h, w))
    for _ in range(max(4, (h * w) // 40)):
        y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
        t, length = rng.uniform(0, np.pi), rng.uniform(2, max(h, w) / 3)
        for r in np.linspace(0, length, int(2 * length) + 1):
            yy, xx = int(y0 + r * np.sin(t)), int(x0 + r * np.cos(t))
            if 0 <= yy < h and 0 <= xx < w:
                needles[yy, xx] = 1.0
    v = np.clip(0.55 * haze + 0.8 * _blur(needles, 0.6) + 0.35 * needles, 0, 1)
    return np.stack([v * 0.85, v * 0.93, v], -1) * 255  # RGB, slightly blue


def frost(x, s, rng):
    """Approximate (synthetic frost texture, see _frost_texture): c0 * image + c1 * frost."""
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    tex = _frost_texture(*x.shape[:2], rng) / 255
    if x.shape[-1] == 1:
        tex = _gray(tex)[..., None]
    return a * x + b * tex


def fog(x, s, rng):
    amount, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    h, w = x.shape[:2]
    size = 1 << int(np.ceil(np.log2(max(h, w, 2))))
    mx = x.max()
    y = x + amount * _plasma(size, decay, rng)[:h, :w, None]
    return y * mx / (mx + amount)


def brightness(x, s, rng):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    if x.shape[-1] != 3:
        return x + c  # the V channel of a grey image is the image
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


def spatter(x, s, rng):
    """Water drops (severities 1-3, approximate: scipy edges and distance transform instead of Canny) or mud
    (severities 4-5)."""
    loc, scale, sigma, thresh, inten, mud = [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                                             (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                                             (0.65, 0.1, 0.5, 0.68, 0.6, 1)][s - 1]
    h, w, ch = x.shape
    liquid = _blur(rng.normal(size=(h, w), loc=loc, scale=scale), sigma)
    liquid[liquid < thresh] = 0
    if not mud:
        lq = np.floor(liquid * 255)
        mag = np.hypot(ndimage.sobel(lq, 0), ndimage.sobel(lq, 1))
        edges = mag > 100
        dist = np.minimum(ndimage.distance_transform_edt(~edges), 20)
        dist = ndimage.uniform_filter(dist, 3, mode="reflect")
        ranks = dist.ravel().argsort().argsort().reshape(dist.shape)
        dist = np.floor(ranks / max(dist.size - 1, 1) * 255)  # histogram equalisation
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        dist = np.clip(ndimage.convolve(dist, ker, mode="reflect"), 0, 255)
        dist = ndimage.uniform_filter(dist, 3, mode="reflect")
        m = liquid * dist
        m = m / max(m.max(), 1e-12) * inten
        color = np.array([175, 238, 238]) / 255
        color = color if ch == 3 else np.array([_gray(color[None])[0]])
        return x + m[..., None] * color
    m = _blur((liquid > thresh).astype(np.float64), inten)
    m[m < 0.8] = 0
    color = np.array([63, 42, 20]) / 255
    color = color if ch == 3 else np.array([_gray(color[None])[0]])
    return x * (1 - m[..., None]) + color * m[..., None]


def contrast(x, s, rng):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def elastic_transform(x, s, rng):
    """Random affine warp of three points, then a smooth random displacement field (bilinear, reflected)."""
    h, w, ch = x.shape
    size = h
    alpha, sig, aff = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                       (0.1, 0.03, 0.03)][s - 1]
    alpha, sig, aff = alpha * size, sig * size, aff * size
    centre = np.array([h, w], dtype=np.float64) // 2
    sq = min(h, w) // 3
    pts1 = np.array([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])  # (row, col) points
    pts2 = pts1 + rng.uniform(-aff, aff, size=pts1.shape)
    # affine A with pts2 = A @ [p; 1]; warp: output(q) = input(A^-1 q)
    src = np.hstack([pts1, np.ones((3, 1))])
    a = np.linalg.solve(src, pts2).T  # 2 x 3
    inv = np.linalg.inv(np.vstack([a, [0, 0, 1]]))
    warped = np.stack([ndimage.affine_transform(x[..., c], inv[:2, :2], offset=inv[:2, 2], order=1, mode="mirror")
                       for c in range(ch)], -1)
    if alpha == 0:
        return warped
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sig, mode="reflect", truncate=3) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sig, mode="reflect", truncate=3) * alpha
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [rows + dy, cols + dx]
    return np.stack([ndimage.map_coordinates(warped[..., c], coords, order=1, mode="reflect") for c in range(ch)], -1)


def pixelate(x, s, rng):
    from PIL import Image

    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w, ch = x.shape
    img = _pil(x).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    return _from_pil(img, ch)


def jpeg_compression(x, s, rng):
    from PIL import Image

    q = [80, 65, 58, 50, 40][s - 1]
    buf = io.BytesIO()
    _pil(x).save(buf, "JPEG", quality=q)
    buf.seek(0)
    return _from_pil(Image.open(buf), x.shape[-1])


def saturate(x, s, rng):
    a, b = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][s - 1]
    if x.shape[-1] != 3:
        return x.copy()  # a grey image has no saturation
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
    return hsv_to_rgb(hsv)


_FUNCS: dict[str, Callable] = {name: globals()[name] for name in CORRUPTIONS}
_BATCHED = {"glass_blur"}  # functions of the whole (N, H, W, C) batch


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption at one severity (1..5) to (N, H, W, C) images; same shape and dtype out."""
    if corruption not in _FUNCS:
        raise DataError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise DataError(f"severity must be an integer in 1..5, got {severity!r}")
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"images must be (N, H, W, C) with C = 1 or 3, got shape {x.shape}")
    integer = x.dtype == np.uint8
    if not integer and not np.issubdtype(x.dtype, np.floating):
        raise InputTypeError(f"images must be uint8 or floating point in [0, 1], got {x.dtype}")
    f = x.astype(np.float64) / 255 if integer else x.astype(np.float64)
    if not integer and (f.min() < 0 or f.max() > 1 or not np.isfinite(f).all()):
        raise DataError("float images must be finite and lie in [0, 1]")
    # Common random numbers: image i draws from a generator seeded by (seed, corruption, i) whatever the severity,
    # so severities differ only by their parameters (and a call is reproducible image by image).
    cidx = CORRUPTIONS.index(corruption)
    if corruption in _BATCHED:
        out = np.clip(_FUNCS[corruption](f, severity, np.random.default_rng([seed, cidx])), 0, 1)
    else:
        out = np.stack([np.clip(_FUNCS[corruption](img, severity, np.random.default_rng([seed, cidx, i])), 0, 1)
                        for i, img in enumerate(f)])
    return np.round(out * 255).astype(np.uint8) if integer else out.astype(x.dtype)


COMPLETE = "complete.json"  # written last by write_cifar10_c: the generation finished


def write_cifar10_c(images: np.ndarray, labels: np.ndarray, out_dir: str | Path, corruptions=CORRUPTIONS,
                    seed: int = 0, progress: bool | None = None) -> Path:
    """Write `<corruption>.npy` ((5N, H, W, C) uint8, severities 1..5 in order) and `labels.npy` (5N,)."""
    from robustlab.utils import progress_bar

    x = np.asarray(images)
    if x.dtype != np.uint8:
        x = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"labels must be (N,) for {x.shape[0]} images, got {y.shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bar(len(corruptions) * 5, "corruptions", progress) as bar:
        for name in corruptions:
            blocks = []
            for sev in range(1, 6):
                blocks.append(corrupt(x, name, sev, seed))
                bar.update(1)
            atomic_save_npy(out / f"{name}.npy", np.concatenate(blocks))
    atomic_save_npy(out / "labels.npy", np.tile(y.astype(np.uint8 if y.max() < 256 else np.int64), 5))
    # written last: a folder without it is an interrupted generation (robustlab corruptions generate redoes it)
    atomic_write_text(out / COMPLETE, json.dumps({"corruptions": list(corruptions), "seed": seed, "n": int(x.shape[0])}))
    return out
