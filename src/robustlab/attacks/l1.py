"""l_1 attacks of the multi-perturbation protocol (mng_ac.md 6.1) beside SLIDE (`pgd:norm=l1`):

* `ead`: the elastic-net attack (Chen et al., AAAI 2018, arXiv:1709.04114), FISTA on
  c * max(z_y - max_{j!=y} z_j + kappa, 0) + ||d||_2^2 + beta ||d||_1 with the projected shrinkage-thresholding
  step, a binary search over c per sample, and the smallest-l_1 success kept (decision rule "L1").
* `salt-pepper`: salt-and-pepper noise of growing density (a black-box decision attack), smallest-l_1 success
  kept.

Both are minimal-perturbation attacks. With `eps`, the result is judged as foolbox judges its minimisation
attacks: the perturbation is first scaled into the l_1 ball (and stays in the box), then the model decides, so a
success counts only if it still fools the model inside the budget.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack, restrict_to_budget
from robustlab.registry import ATTACKS
from robustlab.threat import per_sample_norm
from robustlab.validation import check_eps, check_positive, check_positive_int


def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


class _MinimalL1(Attack):
    minimal = True

    def __init__(self, model: nn.Module, eps: float | None, seed: int | None, bn_mode: str, precision: str = "fp32",
                 compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        if eps is not None:
            check_eps(eps)
        self.eps_value = None if eps is None else float(eps)

    @property
    def norm(self) -> str:
        return "l1"


@ATTACKS.register("ead")
class EAD(_MinimalL1):
    """Elastic-net attack (Chen et al., AAAI 2018) with the l_1 decision rule.

    Defaults (foolbox 3 as used by MNG-AC's evaluation): 5 binary-search steps, 1000 FISTA steps, step 1e-2
    decaying as sqrt(1 - t/T), beta 1e-2, c0 1e-3, kappa 0, early abort."""

    name = "ead"
    no_op_options = {"seed": "deterministic: draws nothing at random (every attack takes a seed)"}

    def __init__(self, model: nn.Module, *, eps: float | None = None, binary_steps: int = 5, steps: int = 1000,
                 step_size: float = 1e-2, beta: float = 1e-2, initial_const: float = 1e-3, kappa: float = 0.0,
                 abort_early: bool = True, seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, eps, seed, bn_mode, precision, compile)
        check_positive_int(binary_steps, "binary_steps")
        check_positive_int(steps, "steps")
        check_positive(step_size, "step_size")
        check_positive(beta, "beta", allow_zero=True)
        check_positive(initial_const, "initial_const")
        check_positive(kappa, "kappa", allow_zero=True)
        self.binary_steps, self.steps, self.step_size = binary_steps, steps, float(step_size)
        self.beta, self.initial_const, self.kappa = float(beta), float(initial_const), float(kappa)
        self.abort_early = abort_early

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": "l1", "eps": self.eps_value, "steps": self.steps,
                "binary_steps": self.binary_steps, "beta": self.beta}

    def _run(self, counter, x, y, target, gen):
        n, dev, dt = x.shape[0], x.device, x.dtype
        const = torch.full((n,), self.initial_const, device=dev, dtype=dt)
        lower = torch.zeros(n, device=dev, dtype=dt)
        upper = torch.full((n,), float("inf"), device=dev, dtype=dt)
        best_norm = torch.full((n,), float("inf"), device=dev, dtype=dt)
        best_adv = x.clone()
        check_every = max(self.steps // 10, 1)
        for _ in range(self.binary_steps):
            x_k = x.clone()
            y_k = x.clone()  # FISTA's extrapolated point (the slack variable)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            prev = float("inf")
            for it in range(self.steps):
                lr = self.step_size * (1 - it / self.steps) ** 0.5
                yk = y_k.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = counter.logits(yk)
                    z_y = logits.gather(1, y[:, None]).squeeze(1)
                    z_o = logits.scatter(1, y[:, None], float("-inf")).amax(1)
                    hinge = (z_y - z_o + self.kappa).clamp_min(0)
                    objective = (const * hinge + (yk - x).flatten(1).pow(2).sum(1)).sum()
                    g = counter.grad(objective, yk)
                x_old = x_k
                x_k = _shrink(y_k - lr * g, x, self.beta)
                y_k = x_k + it / (it + 3) * (x_k - x_old)
                with torch.no_grad():
                    pred = counter.logits(x_k).argmax(1)  # judged at the iterate, as foolbox does
                    adv = pred != y
                    l1 = per_sample_norm(x_k - x, "l1")
                    better = adv & (l1 < best_norm)
                    best_norm = torch.where(better, l1, best_norm)
                    best_adv = torch.where(_view(better, x), x_k, best_adv)
                    found |= adv
                if self.abort_early and it % check_every == 0:
                    with torch.no_grad():
                        full = float((const * hinge.detach()).sum() + (x_k - x).flatten(1).pow(2).sum()
                                     + self.beta * (x_k - x).abs().sum())  # one sync every steps/10 iterations
                    if full > prev * 0.9999:
                        break
                    prev = full
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10)
        return restrict_to_budget(counter, x, best_adv, y, best_norm, self.eps_value, "l1")


def _shrink(z: Tensor, x: Tensor, beta: float) -> Tensor:
    """Projected shrinkage-thresholding: soft-threshold z - x by beta, then clip to [0, 1]."""
    d = z - x
    return torch.where(d > beta, (z - beta).clamp(max=1.0), torch.where(d < -beta, (z + beta).clamp(min=0.0), x))


@ATTACKS.register("salt-pepper")
class SaltAndPepper(_MinimalL1):
    """Salt-and-pepper noise (foolbox's decision attack, Rauber et al. 2017), density scanned upward from 0.

    The same draw for every channel of a pixel; after each success at density p the scan restarts below p with a
    finer step. 1000 queries by default."""

    name = "salt-pepper"

    def __init__(self, model: nn.Module, *, eps: float | None = None, steps: int = 1000, seed: int | None = 0,
                 bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, eps, seed, bn_mode, precision, compile)
        check_positive_int(steps, "steps")
        self.steps = steps

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": "l1", "eps": self.eps_value, "steps": self.steps}

    def _run(self, counter, x, y, target, gen):
        n, dev, dt = x.shape[0], x.device, x.dtype
        best_norm = torch.full((n,), float("inf"), device=dev, dtype=dt)
        best_adv = x.clone()
        p = torch.zeros(n, device=dev, dtype=dt)
        step = torch.full((n,), 1.0 / self.steps, device=dev, dtype=dt)
        for it in range(self.steps):
            u = rng.rand((n, 1, *x.shape[2:]), generator=gen, device=dev, dtype=dt)
            pv = _view(p, x)
            x_ = torch.where(u >= 1 - pv / 2, torch.ones_like(x), torch.where(u < pv / 2, torch.zeros_like(x), x))
            with torch.no_grad():
                adv = counter.logits(x_).argmax(1) != y
            l1 = per_sample_norm(x_ - x, "l1")
            better = adv & (l1 < best_norm)
            best_norm = torch.where(better, l1, best_norm)
            best_adv = torch.where(_view(better, x), x_, best_adv)
            remaining = self.steps - it
            step = torch.where(better, p / remaining, step)
            p = torch.where(better, torch.zeros_like(p), (p + step).clamp(max=1.0))
        return restrict_to_budget(counter, x, best_adv, y, best_norm, self.eps_value, "l1")


__all__ = ["EAD", "SaltAndPepper"]
