"""Tramer & Boneh (NeurIPS 2019): Adv_avg trains on the three adversarial batches together, Adv_max on each sample's
worst one."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.attacks.base import attack_mode
from robustlab.methods.base import LossMethod
from robustlab.methods.multi_norm import MultiNormMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut


@METHODS.register("adv-avg")
class AdvAvg(MultiNormMethod, LossMethod):
    """Adv_avg (Tramer & Boneh 2019): every threat model's attack on each batch, loss = mean of their CE losses
    (one forward over the concatenated adversarial batches)."""

    name = "adv-avg"

    def loss(self, model, batch, ctx):
        advs = [self.attacks.attack(model, batch.x, batch.y, n, ctx) for n in self.norms]
        logits = model(torch.cat(advs)).chunk(len(advs))
        ces = [F.cross_entropy(lg, batch.y) for lg in logits]
        loss = torch.stack(ces).mean()
        return LossOut(loss, {f"ce_{n}": c.detach() for n, c in zip(self.norms, ces)}, logits[0])


@METHODS.register("adv-max")
class AdvMax(MultiNormMethod, LossMethod):
    """Adv_max (Tramer & Boneh 2019): every threat model's attack; each sample trains on the adversarial example
    with the largest cross-entropy."""

    name = "adv-max"

    def loss(self, model, batch, ctx):
        x, y = batch.x, batch.y
        advs = torch.stack([self.attacks.attack(model, x, y, n, ctx) for n in self.norms])  # (K, N, C, H, W)
        net = ctx.attacked(model)
        with attack_mode(net, bn_mode=self.attacks.attack_bn_mode), torch.no_grad():
            ce = torch.stack([F.cross_entropy(net(a), y, reduction="none") for a in advs])  # (K, N)
        worst = ce.argmax(0)
        x_adv = advs[worst, torch.arange(x.shape[0], device=x.device)]
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        picked = {f"picked_{n}": (worst == k).float().mean() for k, n in enumerate(self.norms)}
        return LossOut(loss, {"ce_adv": loss.detach(), **picked}, logits)
