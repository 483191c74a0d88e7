"""Ground truth for a batch of images as one padded tensor, so detection batches index and move like
classification labels: targets (B, M, 6) = [x1, y1, x2, y2, label, difficult] with boxes normalised to
[0, 1], labels 0..K-1, and label -1 on padding rows. An image without objects is all padding (valid)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from robustlab.detection.boxes import check_boxes, match
from robustlab.errors import DataError

FIELDS = 6


def pad_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor], difficult: Sequence[Tensor] | None = None,
                min_objects: int = 1) -> Tensor:
    """Stack per-image (boxes (M_i, 4), labels (M_i,)[, difficult (M_i,)]) into (B, max M_i, 6)."""
    m = max([min_objects] + [int(b.shape[0]) for b in boxes])
    out = torch.zeros(len(boxes), m, FIELDS)
    out[..., 4] = -1
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        n = int(b.shape[0])
        if n:
            out[i, :n, :4] = torch.as_tensor(b, dtype=torch.float32).reshape(n, 4)
            out[i, :n, 4] = torch.as_tensor(lab, dtype=torch.float32).reshape(n)
            if difficult is not None:
                out[i, :n, 5] = torch.as_tensor(difficult[i], dtype=torch.float32).reshape(n)
    return out


def unpad(targets: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image (boxes (M, 4), labels (M,) int64, difficult (M,) bool), padding removed."""
    out = []
    for t in targets:
        v = t[:, 4] >= 0
        out.append((t[v, :4], t[v, 4].long(), t[v, 5] > 0))
    return out


def check_targets(targets: Tensor, num_classes: int) -> None:
    """Clear errors for malformed ground truth: shape, boxes (x2 < x1, outside [0, 1], NaN), labels out of range."""
    if targets.dim() != 3 or targets.shape[-1] != FIELDS:
        raise DataError(f"detection targets must have shape (B, M, {FIELDS}) = [x1, y1, x2, y2, label, difficult], "
                         f"got {tuple(targets.shape)}")
    lab = targets[..., 4]
    valid = lab >= 0
    if (lab[valid] != lab[valid].round()).any() or (lab[valid] >= num_classes).any() or ((lab < 0) & (lab != -1)).any():
        bad = lab[(valid & ((lab >= num_classes) | (lab != lab.round()))) | ((lab < 0) & (lab != -1))]
        raise DataError(f"object labels must be integers in 0..{num_classes - 1} (-1 marks padding), got {bad[:5].tolist()}")
    check_boxes(targets[..., :4][valid], "ground-truth boxes")


def match_targets(targets: Tensor, priors: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """SSD matching for padded targets (difficult objects are not matched, as in training)."""
    valid = (targets[..., 4] >= 0) & (targets[..., 5] <= 0)
    labels = targets[..., 4].long().clamp_min(0)
    return match(targets[..., :4], labels, valid, priors, threshold)
