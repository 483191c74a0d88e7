"""The multibox loss with online hard example mining (cwat.md 1.5) and its decomposition per anchor, per
ground-truth object and per class (cwat.md 2): the interface the class-aware attacks are written against.

`decompose` computes every per-anchor term once; the training loss, the task losses of A_cls / A_reg / TOAT,
and the object-wise / class-wise groupings of OWA / CWA are all sums over its fields.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.detection.targets import match_targets

NEG_POS_RATIO = 3


@dataclass
class Decomp:
    lc: Tensor  # (B, P) softmax CE per anchor (target 0 for background)
    lr: Tensor  # (B, P) smooth-L1 summed over the 4 offsets, 0 for negatives
    pos: Tensor  # (B, P) bool: matched anchors
    neg: Tensor  # (B, P) bool: OHEM negatives mined on these logits
    cls_t: Tensor  # (B, P) anchor class, 0 = background, 1..K
    obj_t: Tensor  # (B, P) index of the matched ground-truth object, -1 for background
    n_pos: Tensor  # (B,) matched anchors per image

    def task_losses(self) -> tuple[Tensor, Tensor]:
        """Per image classification (positives + OHEM negatives) and regression losses, each divided by
        max(N_b, 1): the objectives of A_cls and A_reg and the task terms of TOAT."""
        n = self.n_pos.clamp_min(1).to(self.lc.dtype)
        lcls = (self.lc * (self.pos | self.neg)).sum(1) / n
        lreg = (self.lr * self.pos).sum(1) / n
        return lcls, lreg

    def multibox(self) -> tuple[Tensor, Tensor, Tensor]:
        """(L, L_cls, L_reg) of the whole batch, normalised by the batch's total number of positives."""
        # A batch without matched anchors mines no negatives, so its loss is exactly 0 (no host sync needed).
        n = self.n_pos.sum().clamp_min(1).to(self.lc.dtype)
        lcls = (self.lc * (self.pos | self.neg)).sum() / n
        lreg = (self.lr * self.pos).sum() / n
        return lcls + lreg, lcls, lreg

    def object_losses(self, num_objects: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per ground-truth object (B, M): mean classification loss and mean regression loss over the object's
        matched anchors, and the number of anchors it owns (0 for padding or an object that lost its anchors)."""
        b = self.lc.shape[0]
        idx = self.obj_t.clamp_min(0)
        w = self.pos.to(self.lc.dtype)
        count = torch.zeros(b, num_objects, dtype=self.lc.dtype, device=self.lc.device).scatter_add(1, idx, w)
        lc = torch.zeros_like(count).scatter_add(1, idx, self.lc * w)
        lr = torch.zeros_like(count).scatter_add(1, idx, self.lr * w)
        return lc / count.clamp_min(1), lr / count.clamp_min(1), count

    def class_counts(self, num_classes: int) -> Tensor:
        """(B, K + 1) matched anchors per class and image (column 0, background, counts nothing): n_{b,c}."""
        b = self.lc.shape[0]
        return torch.zeros(b, num_classes + 1, dtype=self.lc.dtype, device=self.lc.device).scatter_add(
            1, self.cls_t, self.pos.to(self.lc.dtype))


def anchor_losses(loc: Tensor, conf: Tensor, conf_t: Tensor, loc_t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-anchor softmax cross-entropy (B, P) and smooth-L1 regression (B, P; zero on background)."""
    if conf.dtype in (torch.float16, torch.bfloat16):  # AMP: losses in float32; float64 stays float64
        conf, loc = conf.float(), loc.float()
    lc = F.cross_entropy(conf.flatten(0, 1), conf_t.flatten(), reduction="none").view_as(conf_t)
    pos = conf_t > 0
    lr = F.smooth_l1_loss(loc, loc_t.to(loc.dtype), reduction="none").sum(-1) * pos
    return lc, lr


def hard_negatives(lc: Tensor, pos: Tensor, ratio: int = NEG_POS_RATIO) -> Tensor:
    """OHEM per image: the min(ratio * N_b, P - 1) background anchors with the largest background loss
    (ties go to the lower index). Mining never carries gradient; images without positives mine none."""
    with torch.no_grad():
        p = lc.shape[1]
        score = lc.detach().masked_fill(pos, float("-inf"))
        n_neg = (ratio * pos.sum(1)).clamp(max=p - 1)
        order = score.sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=lc.device).expand_as(order))
        return (rank < n_neg[:, None]) & ~pos


def decompose(loc: Tensor, conf: Tensor, targets: Tensor, priors: Tensor,
              matched: tuple[Tensor, Tensor, Tensor] | None = None) -> Decomp:
    """All per-anchor terms of the multibox loss for padded targets (B, M, 6). `matched` (conf_t, loc_t, obj_t)
    can be passed in: matching depends only on boxes and priors, so attacks compute it once per batch."""
    conf_t, loc_t, obj_t = matched if matched is not None else match_targets(targets, priors)
    lc, lr = anchor_losses(loc, conf, conf_t, loc_t)
    pos = conf_t > 0
    return Decomp(lc, lr, pos, hard_negatives(lc, pos), conf_t, obj_t, pos.sum(1))


def multibox_loss(loc: Tensor, conf: Tensor, targets: Tensor, priors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(L, L_cls, L_reg): SSD's training loss, L = (sum over positives and mined negatives of CE + sum over
    positives of smooth-L1) / N, with N the batch's number of matched anchors."""
    return decompose(loc, conf, targets, priors).multibox()
