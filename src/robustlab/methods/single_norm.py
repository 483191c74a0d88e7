"""Single-norm PGD training per threat model (adv-inf, adv-l2, adv-l1), the rows of the multi-perturbation tables
(mng_ac.md), with the official code's per-norm settings."""
from __future__ import annotations

from typing import ClassVar

from robustlab.attacks.base import check_bn_mode
from robustlab.methods.multi_norm import TRAIN_SETTINGS
from robustlab.methods.pgd_at import PGDAT
from robustlab.registry import METHODS
from robustlab.threat import make_threat
from robustlab.validation import reject_inapplicable


class _SingleNorm(PGDAT):
    """PGD adversarial training against one norm with MNG-AC's training attack for it (TRAIN_SETTINGS); the attack
    runs with BatchNorm in train mode as in the official scripts."""

    single_norm: ClassVar[str] = "linf"

    def __init__(self, eps: float | None = None, steps: int | None = None, step_size: float | None = None,
                 random_start: bool = True, eps_ramp_epochs: float = 0.0, q: float = 0.99,
                 attack_bn_mode: str = "train") -> None:
        d_eps, d_steps, d_step = TRAIN_SETTINGS[self.single_norm]
        super().__init__(self.single_norm, d_eps if eps is None else eps, d_steps if steps is None else steps,
                         d_step if step_size is None else step_size, random_start, eps_ramp_epochs)
        if self.single_norm != "l1":
            reject_inapplicable({"q": (q, 0.99)}, "SLIDE's q applies to adv-l1 only")
        self.attack_bn_mode, self.q = check_bn_mode(attack_bn_mode, "attack_bn_mode"), q
        if self.single_norm == "l1":
            self.threat = make_threat("l1", self.eps, q=q)

    def ramped(self, ctx):
        threat, f = super().ramped(ctx)
        if self.single_norm == "l1" and f != 1.0:
            threat = make_threat("l1", self.eps * f, q=self.q)
        return threat, f


@METHODS.register("adv-inf")
class AdvInf(_SingleNorm):
    """Adv_inf (Madry et al. 2018, MNG-AC's baseline): PGD training against l_inf alone, eps 8/255, 10 x 1/255.

    mng_ac.md 5."""

    name = "adv-inf"
    single_norm = "linf"


@METHODS.register("adv-l2")
class AdvL2(_SingleNorm):
    """Adv_2 (Madry et al. 2018, MNG-AC's baseline): PGD training against l_2 alone, eps 128/255, 10 x 30/255.

    mng_ac.md 5."""

    name = "adv-l2"
    single_norm = "l2"


@METHODS.register("adv-l1")
class AdvL1(_SingleNorm):
    """Adv_1 (Tramer & Boneh 2019, MNG-AC's baseline): SLIDE training against l_1 alone, eps 2000/255, 20 x 1.0.

    q = 0.99; mng_ac.md 5."""

    name = "adv-l1"
    single_norm = "l1"
