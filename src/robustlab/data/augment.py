"""Training-time augmentation of classification batches, on tensors and on their device: random crop with 4-pixel
zero padding, optionally with a horizontal flip (the CIFAR recipe). Randomness from the step's generator."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab import rng


def augment(x: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    """Random crop with 4-pixel zero padding (+ horizontal flip), batched, on tensors."""
    if kind == "none":
        return x
    n, c, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = rng.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    dx = rng.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    out = _crop(padded, dy, dx, h, w)
    if kind == "crop-flip":
        flip = rng.rand(n, generator=gen, device=x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _crop(padded: Tensor, dy: Tensor, dx: Tensor, h: int, w: int) -> Tensor:
    n, c, hp, wp = padded.shape
    iy = (dy[:, None] + torch.arange(h, device=padded.device)[None])  # (n, h)
    ix = (dx[:, None] + torch.arange(w, device=padded.device)[None])  # (n, w)
    rows = padded.gather(2, iy[:, None, :, None].expand(n, c, h, wp))
    return rows.gather(3, ix[:, None, None, :].expand(n, c, h, w))
