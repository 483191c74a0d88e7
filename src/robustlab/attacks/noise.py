"""Additive Gaussian noise (l_2): MNG-AC's evaluation runs foolbox's `L2RepeatedAdditiveGaussianNoiseAttack` in its
l_2 group (mng_ac.md 6.1). Each of `repeats` draws is Gaussian noise scaled to l_2 norm eps, added to x and clipped
to the box; an image is broken if one draw fools the model. A floor, not an attack to trust: a model can resist
noise and fall to PGD at a tenth of the budget."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab import rng
from robustlab.attacks.base import Attack
from robustlab.registry import ATTACKS
from robustlab.threat import make_threat
from robustlab.types import AttackOut
from robustlab.validation import check_positive_int


@ATTACKS.register("gaussian-noise")
class GaussianNoise(Attack):
    """`repeats` draws of Gaussian noise of l_2 norm eps (clipped to the box); broken if any draw fools the model.
    Each draw is made for the whole batch (so an image's noise does not depend on the others); a broken image leaves
    the batch."""

    name = "gaussian-noise"

    def __init__(self, model: nn.Module, *, eps: float = 128 / 255, repeats: int = 100, seed: int | None = 0,
                 bn_mode: str = "eval", precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        check_positive_int(repeats, "repeats")
        self.threat = make_threat("l2", eps)
        self.repeats = repeats

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "repeats": self.repeats}

    def _run(self, counter, x, y, target, gen):
        x_adv = x.clone()
        broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        eps = float(self.threat.eps)  # a scalar budget (the spec's eps)
        for _ in range(self.repeats):
            noise = rng.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            idx = (~broken).nonzero().squeeze(1)  # one host sync per draw
            if idx.numel() == 0:
                break
            d = noise[idx]
            d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            cand = (x[idx] + eps * d).clamp(0, 1)
            with torch.no_grad():
                fooled = counter.logits(cand).argmax(1) != y[idx]
            x_adv[idx[fooled]] = cand[fooled]
            broken[idx[fooled]] = True
        return AttackOut(x_adv, broken)
