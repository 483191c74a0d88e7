"""MSD (Maini et al., ICML 2020): multi steepest descent, one step in each norm per iteration keeping the best,
as in MNG-AC's code (no random start, best iterate)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.attacks.base import PassCounter, attack_mode
from robustlab.losses import ce_loss
from robustlab.methods.adversarial import count_attack_passes
from robustlab.methods.base import LossMethod
from robustlab.methods.multi_norm import MultiNormAttacks, MultiNormMethod
from robustlab.registry import METHODS
from robustlab.threat.lp import NORMS
from robustlab.types import LossOut
from robustlab.validation import check_positive, check_positive_int


def msd_attack(model: nn.Module, x: Tensor, y: Tensor, attacks: MultiNormAttacks, steps: int,
               step_size: dict[str, float], counter: PassCounter, ramp: float = 1.0) -> Tensor:
    """Multi steepest descent (Maini et al. 2020, mng_ac.md 5): from delta = 0, each iteration takes one step in
    every norm from the current point and keeps, per sample, the candidate with the largest CE; returns each
    sample's best iterate over the run. ramp: the fraction of the budgets and steps in force."""
    threats = [attacks.threat(n, ramp) for n in attacks.norms]
    x_cur = x.clone()
    best = x.clone()
    best_loss = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for _ in range(steps):
        _, _, g = counter.loss_and_grad(x_cur, ce_loss, y, None)
        cands = torch.stack([t.step(x_cur, g, ramp * step_size[n], x) for t, n in zip(threats, attacks.norms)])
        with torch.no_grad():
            losses = torch.stack([F.cross_entropy(counter.logits(c), y, reduction="none") for c in cands])
        # ties go to the later candidate (the reference code's order l_1, l_2, l_inf compares with >=)
        k = len(attacks.norms) - 1 - losses.flip(0).argmax(0)
        ar = torch.arange(x.shape[0], device=x.device)
        x_cur = cands[k, ar]
        loss = losses[k, ar]
        better = loss > best_loss
        best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_cur, best)
        best_loss = torch.where(better, loss, best_loss)
    return best


@METHODS.register("msd")
class MSD(MultiNormMethod, LossMethod):
    """MSD (Maini, Wong, Kolter 2020) as run in MNG-AC's code: 20 iterations, no random start, steps 1/255 (l_inf),
    25/255 (l_2), 1.0 (l_1 SLIDE); CE on each sample's best iterate.

    MSD has its own iteration count and step sizes (`msd_*`); it takes the budgets, SLIDE's q, the BatchNorm mode
    and the eps ramp of the per-norm attacks, and none of their steps, step sizes or random start (it has none)."""

    name = "msd"

    def __init__(self, norms=NORMS, msd_steps: int = 20, msd_step_size_linf: float = 1 / 255,
                 msd_step_size_l2: float = 25 / 255, msd_step_size_l1: float = 1.0, eps_linf: float = 8 / 255,
                 eps_l2: float = 128 / 255, eps_l1: float = 2000 / 255, q: float = 0.99, attack_bn_mode: str = "train",
                 eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norms, eps_linf=eps_linf, eps_l2=eps_l2, eps_l1=eps_l1, q=q, attack_bn_mode=attack_bn_mode,
                         eps_ramp_epochs=eps_ramp_epochs)
        check_positive_int(msd_steps, "msd_steps")
        sizes = {"linf": msd_step_size_linf, "l2": msd_step_size_l2, "l1": msd_step_size_l1}
        for n, v in sizes.items():
            check_positive(v, f"msd_step_size_{n}")
        self.msd_steps = msd_steps
        self.msd_step_size = {n: float(sizes[n]) for n in self.norms}

    def describe(self):
        d = {k: v for k, v in super().describe().items() if k not in ("steps", "step_size")}  # the PGD ones: unused
        return {**d, "msd_steps": self.msd_steps, "msd_step_size": self.msd_step_size}

    def loss(self, model, batch, ctx):
        net = ctx.attacked(model)
        with attack_mode(net, bn_mode=self.attacks.attack_bn_mode):
            counter = PassCounter(net)
            x_adv = msd_attack(net, batch.x, batch.y, self.attacks, self.msd_steps, self.msd_step_size, counter,
                               self.attacks.ramp(ctx))
        count_attack_passes(ctx, counter)
        logits = model(x_adv.detach())
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)
