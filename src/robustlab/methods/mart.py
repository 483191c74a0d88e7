"""MART (Wang et al. 2020): misclassification-aware adversarial training."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.methods.trades import TRADES
from robustlab.registry import METHODS
from robustlab.types import LossOut


@METHODS.register("mart")
class MART(TRADES):
    """MART (Wang et al. 2020): BCE on the adversarial example + beta * KL weighted by (1 - p_nat[y])."""

    name = "mart"

    def __init__(self, norm: str = "linf", eps: float = 0.031, steps: int = 10, step_size: float = 0.007,
                 beta: float = 6.0, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norm, eps, steps, step_size, beta, eps_ramp_epochs)

    def loss(self, model, batch, ctx):
        y = batch.y
        x_adv = self._inner(model, batch.x, ctx, lambda logits, t: F.cross_entropy(logits, y, reduction="none"))
        logits = model(torch.cat([batch.x, x_adv]))
        clean, adv = logits.chunk(2)
        p_adv, p_nat = F.softmax(adv, 1), F.softmax(clean, 1)
        p_other = p_adv.scatter(1, y[:, None], -1.0)  # argmax over k != y
        y_tilde = p_other.argmax(1)
        bce = F.cross_entropy(adv, y) + (-torch.log(1.0001 - p_adv.gather(1, y_tilde[:, None]).squeeze(1) + 1e-12)).mean()
        kl = (torch.log(p_nat + 1e-12) - torch.log(p_adv + 1e-12)).mul(p_nat).sum(1)
        weight = 1.0000001 - p_nat.gather(1, y[:, None]).squeeze(1)
        reg = (kl * weight).mean()
        return LossOut(bce + self.beta * reg, {"bce": bce.detach(), "kl_weighted": reg.detach()}, adv)
