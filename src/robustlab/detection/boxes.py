"""SSD box geometry in plain torch (spec cwat.md sections 1.2-1.4 and 1.6): priors, corner/center
conversion, IoU, encoding/decoding with variances, ground-truth matching, greedy and batched NMS.

Conventions: boxes in corner form [x1, y1, x2, y2] normalised to [0, 1]; priors in center form
[cx, cy, w, h]; ground-truth labels 0..K-1, anchor labels 0 = background, 1..K = foreground.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from robustlab.errors import DataError

VARIANCES = (0.1, 0.2)


def center_to_corner(b: Tensor) -> Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)


def corner_to_center(b: Tensor) -> Tensor:
    return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], dim=-1)


def check_boxes(boxes: Tensor, name: str = "boxes", normalised: bool = True) -> None:
    """Clear errors for malformed boxes: wrong shape, NaN, x2 < x1 or y2 < y1, outside [0, 1]."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise DataError(f"{name} must have shape (M, 4) in [x1, y1, x2, y2] form, got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    if not torch.isfinite(boxes).all():
        raise DataError(f"{name} contain NaN or inf")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DataError(f"{name}[{i}] = {boxes[i].tolist()} has x2 < x1 or y2 < y1")
    if normalised and ((boxes < -1e-6) | (boxes > 1 + 1e-6)).any():
        raise DataError(f"{name} must be normalised to [0, 1] (got min {boxes.min():.4g}, max {boxes.max():.4g})")


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of corner-form boxes: a (..., N, 4), b (..., M, 4) -> (..., N, M); 0 when the union is empty."""
    ax1, ay1, ax2, ay2 = (a[..., :, None, i] for i in range(4))  # coordinate-wise: no (..., N, M, 2) temporaries
    bx1, by1, bx2, by2 = (b[..., None, :, i] for i in range(4))
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_min(0) * \
        (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_min(0)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / union.clamp_min(1e-12)


def make_priors(feature_maps: Sequence[int], steps: Sequence[int], min_sizes: Sequence[float],
                max_sizes: Sequence[float], aspect_ratios: Sequence[Sequence[int]], image_size: int,
                clip: bool = True) -> Tensor:
    """SSD default boxes (P, 4) in center form, in the reference order (location-major per source)."""
    out: list[Tensor] = []
    for f, step, smin, smax, ars in zip(feature_maps, steps, min_sizes, max_sizes, aspect_ratios):
        g = image_size / step
        s, s2 = smin / image_size, math.sqrt(smin * smax) / image_size
        shapes = [(s, s), (s2, s2)]
        for a in ars:
            r = math.sqrt(a)
            shapes += [(s * r, s / r), (s / r, s * r)]
        ii, jj = torch.meshgrid(torch.arange(f, dtype=torch.float32), torch.arange(f, dtype=torch.float32),
                                indexing="ij")
        cx, cy = ((jj + 0.5) / g).reshape(-1, 1), ((ii + 0.5) / g).reshape(-1, 1)
        wh = torch.tensor(shapes, dtype=torch.float32)  # (A, 2)
        n_loc, n_a = cx.shape[0], wh.shape[0]
        out.append(torch.cat([cx.expand(n_loc, n_a)[..., None], cy.expand(n_loc, n_a)[..., None],
                              wh[None].expand(n_loc, n_a, 2)], -1).reshape(-1, 4))
    priors = torch.cat(out)
    return priors.clamp(0, 1) if clip else priors


def encode(gt: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """Regression targets for corner-form gt boxes (..., P, 4) against center-form priors (P, 4)."""
    g = corner_to_center(gt)
    txy = (g[..., :2] - priors[:, :2]) / (variances[0] * priors[:, 2:])
    twh = torch.log(g[..., 2:].clamp_min(1e-12) / priors[:, 2:]) / variances[1]
    return torch.cat([txy, twh], -1)


def decode(loc: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES) -> Tensor:
    """Corner-form boxes from predicted offsets (..., P, 4)."""
    cxy = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    wh = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    return center_to_corner(torch.cat([cxy, wh], -1))


def match(gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, priors: Tensor, threshold: float = 0.5,
          variances: tuple[float, float] = VARIANCES) -> tuple[Tensor, Tensor, Tensor]:
    """Batched SSD matching (cwat.md 1.4). gt_boxes (B, M, 4) corner form, gt_labels (B, M) in 0..K-1,
    gt_valid (B, M) bool (padding = False; an image may have no object). Returns conf_t (B, P) with
    0 = background and label+1 for positives, loc_t (B, P, 4), obj_t (B, P): the index of the matched
    object for positives, -1 otherwise."""
    b, m = gt_labels.shape
    p = priors.shape[0]
    iou = box_iou(gt_boxes, center_to_corner(priors)[None].expand(b, p, 4))  # (B, M, P)
    iou = torch.where(gt_valid[..., None], iou, torch.full_like(iou, -1.0))
    best_iou, best_gt = iou.max(1)  # per prior: (B, P)
    best_prior = iou.argmax(2)  # per object: (B, M), first maximal index
    rows = torch.arange(b, device=priors.device)
    for j in range(m):  # forced matches in object order: a later object sharing a best prior wins
        v = gt_valid[:, j]
        bp = best_prior[:, j]
        best_gt[rows[v], bp[v]] = j
        best_iou[rows[v], bp[v]] = 2.0
    positive = best_iou >= threshold
    labels = gt_labels.gather(1, best_gt)
    conf_t = torch.where(positive, labels + 1, torch.zeros_like(labels))
    matched = gt_boxes.gather(1, best_gt[..., None].expand(b, p, 4))
    loc_t = encode(matched, priors, variances)
    obj_t = torch.where(positive, best_gt, torch.full_like(best_gt, -1))
    return conf_t, loc_t, obj_t


def nms_sorted(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS for groups of candidates already sorted by descending score: boxes (G, n, 4), valid (G, n)
    -> keep (G, n). Candidate i survives when no kept, earlier candidate of its group overlaps it with IoU
    strictly greater than the threshold: decided in score order, every group at once (n small steps on (G, i)
    slices, no host sync; a fixed-point sweep over all pairs needs as many sweeps as the longest suppression
    chain, 10 to 18 on an untrained SSD's 200 candidates per class)."""
    g, n = boxes.shape[:2]
    keep = valid.clone()
    if g == 0 or n == 0:
        return keep
    # the overlaps a few groups at a time: an untrained COCO SSD has 4 x 80 groups of 200 candidates, and its
    # (G, n, n) float temporaries cost more in fresh pages than in arithmetic
    per = max(1, (1 << 20) // (n * n))
    over = torch.cat([box_iou(b, b) > iou_threshold for b in boxes.split(per)])
    for i in range(1, n):
        keep[:, i] &= ~(over[:, i, :i] & keep[:, :i]).any(-1)
    return keep


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: indices kept, in selection order. A box is suppressed by a kept, higher-scoring box
    when their IoU is strictly greater than the threshold (equal scores keep index order)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = nms_sorted(boxes[order][None], torch.ones(1, order.numel(), dtype=torch.bool, device=boxes.device),
                      iou_threshold)[0]
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per class (boxes of different classes never suppress each other)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = classes.to(boxes.dtype)[:, None] * (boxes.max() + 1)  # move each class to its own region
    return nms(boxes + offset, scores, iou_threshold)


# Prior configurations (cwat.md 1.2); total priors: VOC/COCO SSD300 8732, TinySSD-96 866.
SSD300_VOC = dict(feature_maps=(38, 19, 10, 5, 3, 1), steps=(8, 16, 32, 64, 100, 300),
                  min_sizes=(30, 60, 111, 162, 213, 264), max_sizes=(60, 111, 162, 213, 264, 315),
                  aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), image_size=300)
SSD300_COCO = {**SSD300_VOC, "min_sizes": (21, 45, 99, 153, 207, 261), "max_sizes": (45, 99, 153, 207, 261, 315)}
TINYSSD_96 = dict(feature_maps=(12, 6, 3, 2, 1), steps=(8, 16, 32, 48, 96), min_sizes=(12, 24, 40, 56, 72),
                  max_sizes=(24, 40, 56, 72, 96), aspect_ratios=((2,), (2, 3), (2, 3), (2,), (2,)), image_size=96)
