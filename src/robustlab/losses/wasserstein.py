"""The Wasserstein loss on the label space (spec wpgd.md section 2): optimal transport from the predicted
distribution to the target under a ground cost C (a label metric, already raised to the power p).

For a one-hot target kappa every plan sends all mass to kappa, so the distance is the closed form
sum_k C[kappa, k] q_k; the entropic term subtracts entropy_weight * H(q) / log K. WPGD only ever needs one-hot
targets; the tests check the closed form against POT's exact transport solver (`ot.emd2`, test-only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.errors import InputError


def wasserstein_onehot(logits: Tensor, y: Tensor, cost: Tensor, entropy_weight: float = 0.0) -> Tensor:
    """Per-sample l_W = sum_k C[y, k] softmax(z)_k - entropy_weight * H(softmax(z)) / log K."""
    logp = F.log_softmax(logits, 1)
    q = logp.exp()
    c = cost.to(logits)[y]
    loss = (c * q).sum(1)
    if entropy_weight:
        h = -(q * logp).sum(1)
        loss = loss - entropy_weight * h / math.log(logits.shape[1])
    return loss


def log_wasserstein_onehot(logits: Tensor, y: Tensor, cost: Tensor) -> Tensor:
    """log sum_k C[y, k] q_k = logsumexp(z + log C[y]) - logsumexp(z): stable when the model is confident (the
    plain form's gradient underflows to zero there). Same sign-PGD / normalised-PGD iterates as l_W
    (wpgd.md 2.3); -inf only for a row of zero costs (a class that costs nothing to mistake)."""
    c = cost.to(logits)[y]
    return torch.logsumexp(logits + torch.log(c), 1) - torch.logsumexp(logits, 1)


class WassersteinAttackLoss:
    """Attack objective (logits, y, target) -> (N,) for PGD: the log form when entropy_weight = 0, else l_W."""

    def __init__(self, cost: Tensor, entropy_weight: float = 0.0) -> None:
        self.cost, self.entropy_weight = cost, float(entropy_weight)

    def __call__(self, logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        if target is not None:
            raise InputError("the Wasserstein attack loss is untargeted (it spreads the mass by the metric)")
        if self.entropy_weight:
            return wasserstein_onehot(logits, y, self.cost, self.entropy_weight)
        out = log_wasserstein_onehot(logits, y, self.cost)
        # a sample whose whole cost row is zero has no direction to push: a finite constant keeps PGD's sum finite
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


__all__ = ["wasserstein_onehot", "log_wasserstein_onehot", "WassersteinAttackLoss"]
