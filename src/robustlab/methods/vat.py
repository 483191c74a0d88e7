"""Virtual adversarial training (Miyato et al. 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab import rng
from robustlab.attacks.base import attack_mode
from robustlab.methods.adversarial import kl_sum
from robustlab.methods.base import LossMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut
from robustlab.validation import check_eps, check_positive, check_positive_int


@METHODS.register("vat")
class VAT(LossMethod):
    """Virtual adversarial training (Miyato et al.): CE(x) + alpha * KL(p(x) || p(x + r_vadv)), l2 eps 2.0."""

    name = "vat"
    norm: str
    eps: float

    def __init__(self, eps: float = 2.0, xi: float = 1e-6, power_iterations: int = 1, alpha: float = 1.0) -> None:
        check_eps(eps)
        check_positive(xi, "xi")
        check_positive_int(power_iterations, "power_iterations")
        check_positive(alpha, "alpha", allow_zero=True)
        self.norm, self.eps, self.xi, self.ip, self.alpha = "l2", float(eps), xi, power_iterations, alpha

    def perturbation(self, model: torch.nn.Module, x: Tensor, gen: torch.Generator) -> Tensor:
        """r_vadv: eps times the unit l_2 direction found by power iteration on KL(p(x) || p(x + d))."""
        with attack_mode(model):
            with torch.no_grad():
                target = model(x)
            d = rng.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            for _ in range(self.ip):
                d = (self.xi * d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).requires_grad_(True)
                with torch.enable_grad():
                    (d,) = torch.autograd.grad(kl_sum(target, model(x + d)).sum(), d)
        return self.eps * d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def loss(self, model, batch, ctx):
        x = batch.x
        r = self.perturbation(ctx.attacked(model), x, ctx.generator)
        ctx.passes[1] += x.shape[0] * self.ip
        logits = model(torch.cat([x, (x + r).clamp(0, 1)]))  # [0, 1] is robustlab's domain (the IJCNN code does not clip)
        clean, vadv = logits.chunk(2)
        ce = F.cross_entropy(clean, batch.y)
        lds = kl_sum(clean.detach(), vadv).mean()
        return LossOut(ce + self.alpha * lds, {"ce": ce.detach(), "lds": lds.detach()}, clean)
