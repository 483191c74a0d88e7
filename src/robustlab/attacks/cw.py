"""Carlini-Wagner l_2 (Carlini & Wagner, S&P 2017, arXiv:1608.04644), baselines.md 2.3.

tanh change of variables, Adam on w, per-sample binary search over the constant c, early abort,
kappa-adjusted success test, smallest successful l_2 perturbation kept over all steps. Failures
return x with success=False (the original returns a constant 0.5 image).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import Attack, restrict_to_budget
from robustlab.registry import ATTACKS
from robustlab.types import AttackOut
from robustlab.validation import check_positive, check_positive_int


@ATTACKS.register("cw")
class CW(Attack):
    """C&W l_2 minimal-perturbation attack. Defaults: kappa 0, 9 binary steps, 1000 iterations, lr 1e-2, c0 1e-3."""

    name = "cw"
    no_op_options = {"seed": "deterministic: draws nothing at random (every attack takes a seed)"}
    minimal = True
    supports_targeted = True

    def __init__(self, model: nn.Module, *, kappa: float = 0.0, binary_steps: int = 9, steps: int = 1000,
                 lr: float = 1e-2, initial_const: float = 1e-3, abort_early: bool = True, eps: float | None = None,
                 seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        check_positive_int(binary_steps, "binary_steps")
        check_positive_int(steps, "steps")
        check_positive(lr, "lr")
        check_positive(initial_const, "initial_const")
        check_positive(kappa, "kappa", allow_zero=True)
        self.kappa, self.binary_steps, self.steps, self.lr = kappa, binary_steps, steps, lr
        self.initial_const, self.abort_early = initial_const, abort_early
        # optional budget: a point beyond it is scaled onto the l_2 ball and counts if it still fools the model
        # (foolbox's judging of minimisation attacks, MNG-AC's protocol)
        self.eps_value = eps

    @property
    def norm(self) -> str:
        return "l2"

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": "l2", "eps": self.eps_value, "steps": self.steps,
                "binary_steps": self.binary_steps, "kappa": self.kappa}

    def _run(self, counter, x, y, target, gen):
        n = x.shape[0]
        dev, dt = x.device, x.dtype
        dims = tuple(range(1, x.dim()))
        lower = torch.zeros(n, device=dev, dtype=dt)
        upper = torch.full((n,), 1e10, device=dev, dtype=dt)
        const = torch.full((n,), self.initial_const, device=dev, dtype=dt)
        best_l2 = torch.full((n,), float("inf"), device=dev, dtype=dt)
        best_adv = x.clone()
        w0 = torch.atanh((2 * x - 1) * 0.999999)
        label = target if target is not None else y
        sign = -1.0 if target is not None else 1.0  # kappa shifts the label logit up (untargeted) or down
        check_every = max(self.steps // 10, 1)
        for bstep in range(self.binary_steps):
            if self.binary_steps >= 10 and bstep == self.binary_steps - 1:
                const = upper.clone()
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            prev = float("inf")
            for it in range(self.steps):
                with torch.enable_grad():
                    x_new = (torch.tanh(w) + 1) / 2
                    logits = counter.logits(x_new)
                    l2sq = (x_new - x).pow(2).sum(dims)
                    z_lab = logits.gather(1, label[:, None]).squeeze(1)
                    z_other = logits.scatter(1, label[:, None], float("-inf")).amax(1)
                    g = (z_lab - z_other) if target is None else (z_other - z_lab)
                    loss_i = l2sq + const * torch.clamp(g, min=-self.kappa)
                    loss = loss_i.sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                counter.backward += n
                opt.step()
                with torch.no_grad():
                    adj = logits.detach().scatter_add(1, label[:, None], torch.full((n, 1), sign * self.kappa, device=dev, dtype=dt))
                    pred = adj.argmax(1)
                    adv = pred == target if target is not None else pred != y
                    l2sq_d = l2sq.detach()
                    better = adv & (l2sq_d < best_l2)
                    best_l2 = torch.where(better, l2sq_d, best_l2)
                    best_adv = torch.where(better.view(-1, 1, 1, 1), x_new.detach(), best_adv)
                    found |= adv
                if self.abort_early and it % check_every == 0:
                    cur = float(loss.detach())  # one sync every steps/10 iterations
                    if cur > prev * 0.9999:
                        break
                    prev = cur
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            mid = (lower + upper) / 2
            const = torch.where(upper < 1e9, mid, torch.where(found, const, const * 10))
        if target is not None:  # a targeted success beyond eps is not rescaled (scaling judges untargeted)
            norms = best_l2.sqrt()
            success = torch.isfinite(norms) & (norms <= (self.eps_value if self.eps_value is not None else math.inf))
            x_adv = torch.where(success.view(-1, 1, 1, 1), best_adv, x)
            return AttackOut(x_adv, success, norms=torch.where(success, norms, torch.full_like(norms, math.inf)))
        return restrict_to_budget(counter, x, best_adv, y, best_l2.sqrt(), self.eps_value, "l2")
