"""MMA: minimum-margin attack (Gao et al., ICML 2022), as used by PART; baselines.md 2.9.

Targets = the k largest clean logits other than y; for each, PGD on the CW margin towards it from a
shared uniform start; per sample keep the run with the largest z_t - z_y at its final point
("min_margin"), or attack sequentially only the points still robust ("sequential").
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.base import Attack
from robustlab.losses import cw_margin_loss
from robustlab.registry import ATTACKS
from robustlab.threat import make_threat
from robustlab.types import AttackOut
from robustlab.validation import check_choice, check_positive, check_positive_int


@ATTACKS.register("mma")
class MMA(Attack):
    """Minimum-margin attack, l_inf: k=3 targets, 20 steps each, step 2/255, confidence 50."""

    name = "mma"

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float | Tensor = 8 / 255, steps: int = 20,
                 step_size: float = 2 / 255, k: int = 3, confidence: float = 50.0, selection: str = "min_margin",
                 seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        check_positive_int(steps, "steps")
        check_positive_int(k, "k")
        check_positive(step_size, "step_size", allow_zero=True)
        check_choice(selection, "selection", ("min_margin", "sequential"))
        self.threat = make_threat(norm, eps)
        self.steps, self.step_size, self.k, self.confidence, self.selection = steps, step_size, k, confidence, selection

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "steps": self.steps, "k": self.k, "selection": self.selection}

    def _targeted_run(self, counter, x0, x, y, t, threat):
        def loss_fn(logits, y_, t_):
            return cw_margin_loss(logits, y_, t_, kappa=self.confidence)

        x_adv = x0
        for _ in range(self.steps):
            _, _, g = counter.loss_and_grad(x_adv, loss_fn, y, t)
            x_adv = threat.step(x_adv, g, self.step_size, x)
        return x_adv

    def _run(self, counter, x, y, target, gen):
        with torch.no_grad():
            clean = counter.logits(x)
        k = min(self.k, clean.shape[1] - 1)
        targets = clean.scatter(1, y[:, None], float("-inf")).topk(k, dim=1)[1]
        x0 = self.threat.random_init(x, gen)
        if self.selection == "sequential":
            x_adv = x.clone()
            robust = clean.argmax(1) == y
            for j in range(k):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                adv = self._targeted_run(counter, x0[idx], x[idx], y[idx], targets[idx, j], self.threat.subset(idx))
                with torch.no_grad():
                    fooled = counter.logits(adv).argmax(1) != y[idx]
                x_adv[idx] = torch.where(fooled.view(-1, 1, 1, 1), adv, x_adv[idx])
                robust[idx] = ~fooled
            return AttackOut(x_adv, ~robust)
        best = x0
        best_gap = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        for j in range(k):
            t = targets[:, j]
            adv = self._targeted_run(counter, x0, x, y, t, self.threat)
            with torch.no_grad():
                logits = counter.logits(adv)
            gap = logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
            better = gap > best_gap
            best = torch.where(better.view(-1, 1, 1, 1), adv, best)
            best_gap = torch.where(better, gap, best_gap)
        return AttackOut(best, None)
