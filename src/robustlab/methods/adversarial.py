"""The shared part of single-norm adversarial training: the threat model, the inner PGD with its eps ramp and
start, and pass counting for the Trainer. PGD-AT, FGSM-AT, Fast-AT, Free-AT, TRADES, MART, PART and WPGD build on it
(baselines.md section 3).

Defaults are the papers' (CIFAR-10 scale, pixel units); MNIST configs override eps/steps. The inner attacks run
through the attack core in eval mode (BatchNorm statistics frozen), except Fast-AT and Free-AT, which keep train
mode as the original methods do."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from robustlab.attacks.base import BNMode, PassCounter, attack_mode
from robustlab.attacks.pgd import pgd
from robustlab.losses import ce_loss
from robustlab.methods.base import Method
from robustlab.threat import make_threat
from robustlab.types import StepContext
from robustlab.validation import check_eps, check_positive, check_positive_int


def kl_sum(logits_target: Tensor, logits: Tensor) -> Tensor:
    """Per-sample KL(p_target || p) summed over classes."""
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(logits_target, 1), reduction="none").sum(1)


def count_attack_passes(ctx: StepContext, counter: PassCounter) -> None:
    """Forwards are counted by the Trainer's forward hook; input-gradient backwards are reported here."""
    ctx.passes[1] += counter.backward


class AdversarialMethod(Method):
    """Shared by the PGD-family methods. eps_ramp_epochs > 0 grows eps (and the step) linearly from 0 over
    that many epochs, the usual remedy for MNIST PGD-AT at eps 0.3 stalling at chance accuracy."""

    attack_bn_mode: BNMode = "eval"  # BatchNorm mode of the inner attack (MNG-AC's baselines attack in train mode)
    norm: str
    eps: float

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, steps: int = 10, step_size: float | None = None,
                 random_start: bool = True, eps_ramp_epochs: float = 0.0) -> None:
        check_eps(eps)
        check_positive(eps_ramp_epochs, "eps_ramp_epochs", allow_zero=True)
        self.eps_ramp_epochs = eps_ramp_epochs
        check_positive_int(steps, "steps")
        self.norm, self.eps, self.steps = norm, float(eps), steps
        self.step_size = float(step_size) if step_size is not None else 2.5 * float(eps) / steps
        check_positive(self.step_size, "step_size", allow_zero=True)
        self.random_start = random_start
        self.threat = make_threat(norm, eps)

    def describe(self):
        return {"norm": self.norm, "eps": self.eps, "steps": self.steps, "step_size": self.step_size}

    def ramped(self, ctx: StepContext):
        """(threat model, fraction f of eps and of the step size) in force at this step; f = 1 without a ramp."""
        f = 1.0 if self.eps_ramp_epochs <= 0 else min(1.0, (ctx.progress + 1e-9) / self.eps_ramp_epochs)
        return (self.threat if f == 1.0 else make_threat(self.norm, self.eps * f)), f

    def batch_threat(self, model, x: Tensor, ctx: StepContext):
        """(threat model, step-size factor) of this batch's inner attack. PART overrides it with its per-element
        budget map; the default is the method's ball (eps-ramped when asked)."""
        return self.ramped(ctx)

    def start_point(self, ctx: StepContext):
        """How the inner attack's random start is drawn at this step (None: uniformly in the batch's threat model).
        PART overrides it with Pixel-AG's start."""
        return None

    def _pgd(self, model, x, y, ctx, loss_fn=ce_loss, random_start=None, steps=None, step_size=None):
        model = ctx.attacked(model)
        threat, f = self.batch_threat(model, x, ctx)
        with attack_mode(model, bn_mode=self.attack_bn_mode):
            counter = PassCounter(model)
            out = pgd(counter, x, y, threat=threat, loss_fn=loss_fn, steps=steps or self.steps,
                      step_size=f * (self.step_size if step_size is None else step_size),
                      random_start=self.random_start if random_start is None else random_start,
                      generator=ctx.generator, init=self.start_point(ctx))
        count_attack_passes(ctx, counter)
        return out.x_adv.detach()
