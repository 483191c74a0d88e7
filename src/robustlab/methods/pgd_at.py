"""PGD adversarial training (Madry et al. 2018)."""
from __future__ import annotations

import torch.nn.functional as F

from robustlab.methods.adversarial import AdversarialMethod
from robustlab.methods.base import LossMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut


@METHODS.register("pgd-at")
class PGDAT(AdversarialMethod, LossMethod):
    """PGD adversarial training (Madry et al. 2018): CE on PGD examples (eps 8/255, step 2/255, 10 steps)."""

    name = "pgd-at"

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, steps: int = 10, step_size: float | None = 2 / 255,
                 random_start: bool = True, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norm, eps, steps, step_size, random_start, eps_ramp_epochs)

    def loss(self, model, batch, ctx):
        x_adv = self._pgd(model, batch.x, batch.y, ctx)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)
