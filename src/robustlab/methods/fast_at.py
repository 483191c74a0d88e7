"""Fast adversarial training (Wong et al. 2020): FGSM from a uniform random start."""
from __future__ import annotations

import torch.nn.functional as F

from robustlab.attacks.base import PassCounter, attack_mode
from robustlab.attacks.pgd import pgd
from robustlab.losses import ce_loss
from robustlab.methods.adversarial import AdversarialMethod, count_attack_passes
from robustlab.methods.base import LossMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut


@METHODS.register("fast-at")
class FastAT(AdversarialMethod, LossMethod):
    """Fast-AT (Wong et al. 2020): FGSM from a uniform random start, step 1.25 eps, model in train mode."""

    name = "fast-at"

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, alpha: float | None = None) -> None:
        super().__init__(norm, eps, 1, 1.25 * eps if alpha is None else alpha, True)

    def loss(self, model, batch, ctx):
        with attack_mode(ctx.attacked(model), bn_mode="train"):  # the original keeps train mode here
            counter = PassCounter(ctx.attacked(model))
            out = pgd(counter, batch.x, batch.y, threat=self.threat, loss_fn=ce_loss, steps=1,
                      step_size=self.step_size, random_start=True, generator=ctx.generator)
        count_attack_passes(ctx, counter)
        logits = model(out.x_adv.detach())
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)
