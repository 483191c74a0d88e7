"""Per-sample attack objectives on logits (larger = more adversarial). Reduce at the call site.

Signature: loss(logits (N, K), y (N,), target (N,) | None) -> (N,).
For targeted attacks `target` is the class to reach; the objective then rewards it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.errors import InputError

LossFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j (positive iff correctly classified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - other


def ce_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin_loss(logits: Tensor, y: Tensor, target: Tensor | None = None, kappa: float = 50.0) -> Tensor:
    """Carlini-Wagner margin as in Madry's `cw` loss: -max(z_y - max_{j!=y} z_j + kappa, 0); targeted towards t."""
    if target is not None:
        z_t = logits.gather(1, target[:, None]).squeeze(1)
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        return -torch.clamp(z_y - z_t + kappa, min=0)
    return -torch.clamp(margin(logits, y) + kappa, min=0)


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020); targeted variant when `target` is given."""
    if target is not None:
        return dlr_targeted_loss(logits, y, target)
    if logits.shape[1] < 3:
        raise InputError(f"the DLR loss needs at least 3 classes, the model outputs {logits.shape[1]}")
    z_sorted, ind_sorted = logits.sort(dim=1)
    top_is_y = (ind_sorted[:, -1] == y).to(logits.dtype)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    best_other = z_sorted[:, -2] * top_is_y + z_sorted[:, -1] * (1.0 - top_is_y)
    return -(z_y - best_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    if logits.shape[1] < 4:
        raise InputError(f"the targeted DLR loss needs at least 4 classes, the model outputs {logits.shape[1]}")
    z_sorted, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def probability_margin_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """The probability margin of PMA (Xie et al. 2024, "Towards Million-Scale Adversarial Robustness Evaluation With
    Stronger Individual Attacks"): max_{j != y} p_j - p_y of the softmax, in [-1, 1], positive iff misclassified;
    targeted, p_t - p_y. Unlike CE it saturates once the point is fooled, and unlike the logit margin it weighs
    classes by their probability."""
    p = logits.softmax(1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    if target is not None:
        return p.gather(1, target[:, None]).squeeze(1) - p_y
    return p.scatter(1, y[:, None], float("-inf")).amax(1) - p_y


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_margin_loss, "dlr": dlr_loss, "pm": probability_margin_loss}


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"unknown attack loss {name!r}; valid losses: {', '.join(LOSSES)}") from None
