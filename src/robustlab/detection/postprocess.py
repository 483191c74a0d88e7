"""Detections from raw SSD outputs (cwat.md 1.6): softmax, decode + clip, per-class score threshold and top-k,
greedy NMS per class, then the best `max_per_image` over all classes. Batched over images and classes; used
for evaluation only (never inside attacks or training)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab.detection.boxes import decode, nms_sorted


@dataclass
class Detections:
    boxes: Tensor  # (n, 4) corner form, normalised to [0, 1]
    scores: Tensor  # (n,) descending
    labels: Tensor  # (n,) int64 in 0..K-1


@torch.no_grad()
def detect(loc: Tensor, conf: Tensor, priors: Tensor, score_threshold: float = 0.01, top_k: int = 200,
           nms_threshold: float = 0.45, max_per_image: int = 200, clip: bool = True) -> list[Detections]:
    b, p, k1 = conf.shape
    k = k1 - 1
    prob = torch.softmax(conf.float(), -1)[..., 1:].transpose(1, 2)  # (B, K, P)
    boxes = decode(loc.float(), priors)
    if clip:
        boxes = boxes.clamp(0, 1)
    scores, idx = top_stable(prob, min(top_k, p))  # (B, K, T); equal scores keep prior order
    valid = scores > score_threshold
    t = max(1, int(valid.sum(-1).max()))  # candidates past the threshold are a prefix: drop the empty tail
    scores, idx, valid = scores[..., :t], idx[..., :t], valid[..., :t]
    cand = boxes[:, None].expand(b, k, p, 4).gather(2, idx[..., None].expand(b, k, t, 4))  # (B, K, T, 4)
    keep = nms_sorted(cand.reshape(b * k, t, 4), valid.reshape(b * k, t), nms_threshold).view(b, k, t)
    flat = torch.where(keep, scores, torch.full_like(scores, -1.0)).reshape(b, k * t)
    m = min(max_per_image, k * t)
    top, pos = flat.sort(dim=-1, descending=True, stable=True)
    top, pos = top[:, :m], pos[:, :m]
    labels = pos // t
    out_boxes = cand.reshape(b, k * t, 4).gather(1, pos[..., None].expand(b, m, 4))
    kept = top >= 0
    return [Detections(out_boxes[i][kept[i]], top[i][kept[i]], labels[i][kept[i]]) for i in range(b)]


def top_stable(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the first k entries of a stable descending sort along the last dimension (equal values
    in index order; NaN counts as -1, below any probability), without sorting the whole dimension: the rows' k-th
    largest value splits each row into the values above it and the first of its ties, and only those k are sorted.
    An untrained COCO SSD300 has 80 classes x 8732 priors per image, where a full sort was most of `detect`."""
    x = x.nan_to_num(nan=-1.0)
    kth = x.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = x > kth
    tie = x == kth
    chosen = above | (tie & (tie.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k per row
    idx = chosen.nonzero()[:, -1].view(*x.shape[:-1], k)  # ascending within each row
    values = x.gather(-1, idx)
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), idx.gather(-1, order)
