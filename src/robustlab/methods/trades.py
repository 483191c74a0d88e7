"""TRADES (Zhang et al. 2019) and TRADES_inf, the l_inf baseline of the multi-perturbation tables (mng_ac.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab import rng
from robustlab.attacks.base import PassCounter, attack_mode
from robustlab.attacks.pgd import pgd
from robustlab.methods.adversarial import AdversarialMethod, count_attack_passes, kl_sum
from robustlab.methods.base import LossMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut
from robustlab.validation import check_positive


@METHODS.register("trades")
class TRADES(AdversarialMethod, LossMethod):
    """TRADES (Zhang et al. 2019): CE(x) + beta * KL(p(x) || p(x_adv)); inner max of the KL (beta 6)."""

    name = "trades"

    def __init__(self, norm: str = "linf", eps: float = 0.031, steps: int = 10, step_size: float = 0.007,
                 beta: float = 6.0, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norm, eps, steps, step_size, False, eps_ramp_epochs)
        check_positive(beta, "beta", allow_zero=True)
        self.beta = beta

    def describe(self):
        return {**super().describe(), "beta": self.beta}

    def _inner(self, model, x, ctx, loss_of_logits):
        """The shared PGD loop on loss_of_logits(logits, clean logits), started at x + N(0, 0.001^2) as the TRADES and
        MART codes (then clipped: the reference codes do not clip here; [0, 1] is robustlab's domain)."""
        model = ctx.attacked(model)
        threat, f = self.batch_threat(model, x, ctx)

        def start(x: Tensor, gen: torch.Generator | None) -> Tensor:
            return threat.clip(x + 0.001 * rng.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype))

        with attack_mode(model):
            counter = PassCounter(model)
            with torch.no_grad():
                clean = counter.logits(x)
            out = pgd(counter, x, clean, threat=threat, loss_fn=lambda logits, t, _target: loss_of_logits(logits, t),
                      steps=self.steps, step_size=f * self.step_size, generator=ctx.generator, init=start)
        count_attack_passes(ctx, counter)
        return out.x_adv.detach()

    def loss(self, model, batch, ctx):
        x_adv = self._inner(model, batch.x, ctx, lambda logits, t: kl_sum(t, logits))
        logits = model(torch.cat([batch.x, x_adv]))
        clean, adv = logits.chunk(2)
        ce = F.cross_entropy(clean, batch.y)
        kl = kl_sum(clean, adv).mean()
        return LossOut(ce + self.beta * kl, {"ce": ce.detach(), "kl": kl.detach()}, adv)


@METHODS.register("trades-inf")
class TRADESInf(TRADES):
    """TRADES_inf (Zhang et al. 2019) as MNG-AC's baseline: l_inf, eps 0.031, 10 steps of 0.007, beta 6."""

    name = "trades-inf"

    def __init__(self, eps: float = 0.031, steps: int = 10, step_size: float = 0.007, beta: float = 6.0,
                 eps_ramp_epochs: float = 0.0) -> None:
        super().__init__("linf", eps, steps, step_size, beta, eps_ramp_epochs)
