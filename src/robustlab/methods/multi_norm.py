"""The shared part of the multi-perturbation methods (spec mng_ac.md): the per-norm training attacks (PGD; SLIDE for
l_1) with their CIFAR-10/SVHN defaults (mng_ac.md 1.8: l_inf 8/255 in 10 steps of 1/255, l_2 128/255 in 10 of 30/255,
l_1 2000/255 in 20 SLIDE steps of 1.0, q = 0.99), run with BatchNorm in train mode as the official scripts
(mng_ac.md 1.7), and the base of the methods that use them."""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

from torch import Tensor, nn

from robustlab.attacks.base import PassCounter, attack_mode, check_bn_mode, restored_buffers
from robustlab.attacks.pgd import pgd
from robustlab.errors import InputError
from robustlab.losses import ce_loss
from robustlab.methods.adversarial import count_attack_passes
from robustlab.methods.base import Method
from robustlab.threat import LpBall, make_threat
from robustlab.threat.lp import NORMS
from robustlab.types import StepContext
from robustlab.validation import check_eps, check_positive, check_positive_int, reject_inapplicable

# (eps, steps, step size) of the training attacks, CIFAR-10 / SVHN (mng_ac.md 1.8)
TRAIN_SETTINGS = {"linf": (8 / 255, 10, 1 / 255), "l2": (128 / 255, 10, 30 / 255), "l1": (2000 / 255, 20, 1.0)}


def check_norms(norms) -> tuple[str, ...]:
    """A non-empty tuple of distinct known norm names."""
    if isinstance(norms, str):
        norms = (norms,)
    norms = tuple(norms)
    if not norms:
        raise InputError(f"the set of threat models is empty; give one or more of {', '.join(NORMS)}")
    for n in norms:
        if n not in NORMS:
            raise InputError(f"unknown norm {n!r}; valid norms: {', '.join(NORMS)}")
    if len(set(norms)) != len(norms):
        raise InputError(f"repeated norm in {norms!r}")
    return norms


class MultiNormAttacks:
    """The per-norm training attacks (PGD; SLIDE for l_1) a multi-perturbation method runs."""

    def __init__(self, norms=NORMS, eps_linf: float = 8 / 255, eps_l2: float = 128 / 255, eps_l1: float = 2000 / 255,
                 steps_linf: int = 10, steps_l2: int = 10, steps_l1: int = 20, step_size_linf: float = 1 / 255,
                 step_size_l2: float = 30 / 255, step_size_l1: float = 1.0, q: float = 0.99,
                 random_start: bool = True, attack_bn_mode: str = "train", eps_ramp_epochs: float = 0.0) -> None:
        self.norms = check_norms(norms)
        check_positive(eps_ramp_epochs, "eps_ramp_epochs", allow_zero=True)
        self.eps_ramp_epochs, self.q = float(eps_ramp_epochs), q
        bn_mode = check_bn_mode(attack_bn_mode, "attack_bn_mode")
        eps = {"linf": eps_linf, "l2": eps_l2, "l1": eps_l1}
        steps = {"linf": steps_linf, "l2": steps_l2, "l1": steps_l1}
        sizes = {"linf": step_size_linf, "l2": step_size_l2, "l1": step_size_l1}
        for n in NORMS:
            check_eps(eps[n], f"eps_{n}")
            if eps[n] <= 0:
                raise InputError(f"eps_{n} must be > 0, got {eps[n]}")
            check_positive_int(steps[n], f"steps_{n}")
            check_positive(sizes[n], f"step_size_{n}")
        defaults = inspect.signature(MultiNormAttacks.__init__).parameters
        for n in NORMS:
            if n not in self.norms:
                reject_inapplicable({f"{k}_{n}": (v[n], defaults[f"{k}_{n}"].default)
                                     for k, v in (("eps", eps), ("steps", steps), ("step_size", sizes))},
                                    f"{n!r} is not among the trained norms {self.norms}")
        if "l1" not in self.norms:
            reject_inapplicable({"q": (q, defaults["q"].default)}, "SLIDE's q applies to the l1 norm only")
        self.eps = {n: float(eps[n]) for n in self.norms}
        self.steps = {n: int(steps[n]) for n in self.norms}
        self.step_size = {n: float(sizes[n]) for n in self.norms}
        self.threats: dict[str, LpBall] = {n: make_threat(n, eps[n], **({"q": q} if n == "l1" else {}))
                                           for n in self.norms}
        self.random_start, self.attack_bn_mode = random_start, bn_mode

    def describe(self) -> dict[str, Any]:
        return {"norms": list(self.norms), "eps": self.eps, "steps": self.steps, "step_size": self.step_size,
                "attack_bn_mode": self.attack_bn_mode, "eps_ramp_epochs": self.eps_ramp_epochs}

    def ramp(self, ctx: StepContext) -> float:
        """Fraction of every budget (and step size) in force: grows linearly to 1 over eps_ramp_epochs (the usual
        remedy for MNIST-scale budgets stalling at chance accuracy, as for pgd-at)."""
        return 1.0 if self.eps_ramp_epochs <= 0 else min(1.0, (ctx.progress + 1e-9) / self.eps_ramp_epochs)

    def threat(self, norm: str, f: float) -> LpBall:
        if f == 1.0:
            return self.threats[norm]
        return make_threat(norm, self.eps[norm] * f, **({"q": self.q} if norm == "l1" else {}))

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, norm: str, ctx: StepContext,
               keep_buffers: bool = False) -> Tensor:
        """x_adv for one norm (detached). keep_buffers: train-mode BN without touching the running statistics."""
        net = ctx.attacked(model)
        f = self.ramp(ctx)
        with attack_mode(net, bn_mode=self.attack_bn_mode), (restored_buffers(net) if keep_buffers else nullcontext()):
            counter = PassCounter(net)
            out = pgd(counter, x, y, threat=self.threat(norm, f), loss_fn=ce_loss, steps=self.steps[norm],
                      step_size=f * self.step_size[norm], random_start=self.random_start, generator=ctx.generator)
        count_attack_passes(ctx, counter)
        return out.x_adv.detach()


class MultiNormMethod(Method):
    """Base of the methods that train against several threat models (norms: any non-empty subset)."""

    norm = "linf"
    forwards_options_to = (MultiNormAttacks,)

    def __init__(self, norms=NORMS, **attack_kwargs: Any) -> None:
        self.attacks = MultiNormAttacks(norms, **attack_kwargs)
        self.norms = self.attacks.norms
        self.norm = self.norms[0]
        self.eps = self.attacks.eps[self.norm]  # the default evaluation attack's threat model

    def describe(self) -> dict[str, Any]:
        return {**self.attacks.describe(), **{k: v for k, v in super().describe().items() if k not in ("norm", "eps")}}
