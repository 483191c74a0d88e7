"""FGSM adversarial training (Goodfellow et al. 2015; Kurakin et al. mix of clean and adversarial)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.errors import InputError
from robustlab.methods.adversarial import AdversarialMethod
from robustlab.methods.base import LossMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut


@METHODS.register("fgsm-at")
class FGSMAT(AdversarialMethod, LossMethod):
    """FGSM-AT (Goodfellow et al. 2015): a*CE(x) + (1-a)*CE(x_fgsm), a = 0.5, no random start."""

    name = "fgsm-at"

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, alpha: float = 0.5) -> None:
        super().__init__(norm, eps, 1, eps, False)
        if not 0 <= alpha <= 1:
            raise InputError(f"fgsm-at mixing weight alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def describe(self):
        return {**super().describe(), "alpha": self.alpha}

    def loss(self, model, batch, ctx):
        x_adv = self._pgd(model, batch.x, batch.y, ctx, step_size=self.eps)
        logits = model(torch.cat([batch.x, x_adv]))
        clean, adv = logits.chunk(2)
        ce_c, ce_a = F.cross_entropy(clean, batch.y), F.cross_entropy(adv, batch.y)
        loss = self.alpha * ce_c + (1 - self.alpha) * ce_a
        return LossOut(loss, {"ce": ce_c.detach(), "ce_adv": ce_a.detach()}, adv)
