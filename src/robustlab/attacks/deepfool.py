"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016, arXiv:1511.04599), l_2 and l_inf; baselines.md 2.4.

Reference class = the clean prediction; candidates = the `num_classes` largest clean logits. Each
iteration linearises all candidate boundaries (one backward per candidate) and steps to the closest,
with overshoot 0.02; iterates are clipped to [0, 1]. Only samples not yet fooled are processed.

Targeted (`attack.run(x, y, target=t)`): the reference class is y and the only candidate is t; a sample is done
when the model predicts t (the visual label metric of WPGD, wpgd.md 1.1, is its mean distance per class pair).

The adversary-critic paper's variant (critic.md 8.1) is `deepfool:steps=500,max_step=0.1,project=true`:
each step's length is capped at max_step and the accumulated perturbation itself is projected so that
x + (1 + overshoot) r stays in the box (instead of only clipping the iterate).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import Attack
from robustlab.errors import InputError
from robustlab.registry import ATTACKS
from robustlab.threat import per_sample_norm
from robustlab.types import AttackOut
from robustlab.validation import check_positive, check_positive_int


@ATTACKS.register("deepfool")
class DeepFool(Attack):
    """DeepFool minimal-perturbation attack (norm l2 or linf), overshoot 0.02, max 50 iterations."""

    name = "deepfool"
    no_op_options = {"seed": "deterministic: draws nothing at random (every attack takes a seed)"}
    minimal = True
    supports_targeted = True

    def __init__(self, model: nn.Module, *, norm: str = "l2", steps: int = 50, overshoot: float = 0.02,
                 num_classes: int = 10, eps: float | None = None, max_step: float | None = None, project: bool = False,
                 seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        key = str(norm).lower()
        if key not in ("l2", "linf", "inf"):
            raise InputError(f"DeepFool supports norms l2 and linf, got {norm!r}")
        check_positive_int(steps, "steps")
        check_positive_int(num_classes, "num_classes", minimum=2)
        check_positive(overshoot, "overshoot", allow_zero=True)
        if max_step is not None:
            check_positive(max_step, "max_step")
        self.max_step, self.project = max_step, bool(project)
        self._norm = "l2" if key == "l2" else "linf"
        self.steps, self.overshoot, self.num_classes, self.eps_value = steps, overshoot, num_classes, eps

    @property
    def norm(self) -> str:
        return self._norm

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": self._norm, "eps": self.eps_value, "steps": self.steps,
                "overshoot": self.overshoot, "max_step": self.max_step, "project": self.project}

    def _run(self, counter, x, y, target, gen):
        with torch.no_grad():
            clean = counter.logits(x)
        if target is None:
            k = min(self.num_classes, clean.shape[1])
            cands = clean.topk(k, dim=1)[1]  # column 0 is the clean prediction l0
            active = clean.argmax(1) == y  # misclassified points keep r = 0
        else:
            k = 2
            cands = torch.stack([y, target], 1)  # linearise z_t - z_y
            active = clean.argmax(1) != target
        l0 = cands[:, 0]
        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        for _ in range(self.steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xi = x_adv[idx].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = counter.logits(xi)
                # still on the reference side (untargeted) or not yet at the target (targeted)
                still = logits.argmax(1) == l0[idx] if target is None else logits.argmax(1) != target[idx]
                z = logits.gather(1, cands[idx])  # (m, k)
                f = z[:, 1:] - z[:, :1]
                grads = [counter.grad(f[:, j].sum(), xi, retain_graph=j < k - 2) for j in range(k - 1)]
            w = torch.stack(grads, 1).flatten(2)  # (m, k-1, D)
            f = f.detach()
            size = w.norm(dim=2) if self._norm == "l2" else w.abs().sum(2)
            dist = f.abs() / (size + 1e-12)
            j = dist.argmin(1)
            ar = torch.arange(idx.numel(), device=x.device)
            wl, fl, sl = w[ar, j], f[ar, j], size[ar, j]
            d = fl.abs() / (sl + 1e-12)  # distance to the linearised boundary
            if self.max_step is not None:
                d = d.clamp(max=self.max_step)
            if self._norm == "l2":
                r_i = ((d + 1e-4) / (sl + 1e-12))[:, None] * wl  # (d + 1e-4) w/||w||
            else:
                r_i = (d + 1e-4)[:, None] * wl.sign()
            r_i = torch.where(still[:, None], r_i, torch.zeros_like(r_i))
            r_tot[idx] = r_tot[idx] + r_i.view_as(xi)
            x_adv[idx] = (x[idx] + (1 + self.overshoot) * r_tot[idx]).clamp(0, 1)
            if self.project:  # keep r itself feasible: r = (clip(x + (1+o) r) - x) / (1+o)
                r_tot[idx] = (x_adv[idx] - x[idx]) / (1 + self.overshoot)
            active[idx] = still
        with torch.no_grad():
            pred = counter.logits(x_adv).argmax(1)
        success = pred != y if target is None else pred == target
        norms = per_sample_norm(x_adv - x, self._norm)
        if self.eps_value is not None:
            success &= norms <= self.eps_value
            x_adv = torch.where(success.view(-1, 1, 1, 1), x_adv, x)
        norms = torch.where(success, norms, torch.full_like(norms, float("inf")))
        return AttackOut(x_adv, success, norms=norms)
