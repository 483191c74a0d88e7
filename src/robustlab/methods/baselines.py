"""Baseline defenses (baselines.md section 3): standard, FGSM-AT, Fast-AT, Free-AT, PGD-AT, TRADES, MART, VAT,
and the l_2 margin maximisation of the adversary-critic paper's Table 1 (critic.md 9).

Defaults are the papers' (CIFAR-10 scale, pixel units); MNIST configs override eps/steps. The inner
attacks run through robustlab's attack core in eval mode (BatchNorm statistics frozen), except
Fast-AT and Free-AT which keep train mode as the original methods do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.attacks.base import BNMode, PassCounter, attack_mode
from robustlab.attacks.pgd import pgd
from robustlab.errors import InputError
from robustlab.losses import ce_loss
from robustlab.methods.base import LossOut, Method, PersistentDelta, StepContext
from robustlab.registry import METHODS
from robustlab.threat import make_threat
from robustlab.validation import check_eps, check_positive, check_positive_int


def _kl_sum(logits_target: Tensor, logits: Tensor) -> Tensor:
    """Per-sample KL(p_target || p) summed over classes."""
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(logits_target, 1), reduction="none").sum(1)


def _attack_passes(ctx: StepContext, counter: PassCounter) -> None:
    """Forwards are counted by the Trainer's forward hook; input-gradient backwards are reported here."""
    ctx.passes[1] += counter.backward


@METHODS.register("standard")
class Standard(Method):
    """Standard (clean) training: cross-entropy on natural images."""

    name = "standard"
    robustness_goal = False

    def loss(self, model, batch, ctx):
        logits = model(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce": loss.detach()}, logits)


class _Adversarial(Method):
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
        _attack_passes(ctx, counter)
        return out.x_adv.detach()


@METHODS.register("pgd-at")
class PGDAT(_Adversarial):
    """PGD adversarial training (Madry et al. 2018): CE on PGD examples (eps 8/255, step 2/255, 10 steps)."""

    name = "pgd-at"

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, steps: int = 10, step_size: float | None = 2 / 255,
                 random_start: bool = True, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norm, eps, steps, step_size, random_start, eps_ramp_epochs)

    def loss(self, model, batch, ctx):
        x_adv = self._pgd(model, batch.x, batch.y, ctx)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)


@METHODS.register("fgsm-at")
class FGSMAT(_Adversarial):
    """FGSM-AT (Goodfellow et al. 2015): a*CE(x) + (1-a)*CE(x_fgsm), a = 0.5, no random start."""

    name = "fgsm-at"

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, alpha: float = 0.5) -> None:
        super().__init__(norm, eps, 1, eps, False)
        if not 0 <= alpha <= 1:
            raise InputError(f"fgsm-at mixing weight alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def describe(self):
        return {**super().describe(), "alpha": self.alpha}

    def loss(self, model, batch, ctx):
        x_adv = self._pgd(model, batch.x, batch.y, ctx, step_size=self.eps)
        logits = model(torch.cat([batch.x, x_adv]))
        clean, adv = logits.chunk(2)
        ce_c, ce_a = F.cross_entropy(clean, batch.y), F.cross_entropy(adv, batch.y)
        loss = self.alpha * ce_c + (1 - self.alpha) * ce_a
        return LossOut(loss, {"ce": ce_c.detach(), "ce_adv": ce_a.detach()}, adv)


@METHODS.register("fast-at")
class FastAT(_Adversarial):
    """Fast-AT (Wong et al. 2020): FGSM from a uniform random start, step 1.25 eps, model in train mode."""

    name = "fast-at"

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, alpha: float | None = None) -> None:
        super().__init__(norm, eps, 1, 1.25 * eps if alpha is None else alpha, True)

    def loss(self, model, batch, ctx):
        with attack_mode(ctx.attacked(model), bn_mode="train"):  # the original keeps train mode here
            counter = PassCounter(ctx.attacked(model))
            out = pgd(counter, batch.x, batch.y, threat=self.threat, loss_fn=ce_loss, steps=1,
                      step_size=self.step_size, random_start=True, generator=ctx.generator)
        _attack_passes(ctx, counter)
        logits = model(out.x_adv.detach())
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)


@METHODS.register("free-at")
class FreeAT(PersistentDelta, _Adversarial):
    """Free-AT (Shafahi et al. 2019): each minibatch replayed m times; one backward gives both the parameter
    update and the perturbation step (size eps); the perturbation persists across minibatches."""

    name = "free-at"

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, replays: int = 8) -> None:
        super().__init__(norm, eps, 1, eps, False)
        check_positive_int(replays, "replays")
        self.replays = replays
        self.delta: Tensor | None = None

    def describe(self):
        return {**super().describe(), "replays": self.replays}

    def steps_per_batch(self) -> int:
        return self.replays

    def loss(self, model, batch, ctx):  # used only for reporting; training goes through train_step
        logits = model(batch.x)
        return LossOut(F.cross_entropy(logits, batch.y), {}, logits)

    def train_step(self, model, batch, optimizer, ctx, backward_and_step):
        x, y = batch.x, batch.y
        out = None
        for _ in range(self.replays):
            delta = self.delta_for(x).detach().requires_grad_(True)
            x_adv = self.threat.project(x + delta, x)
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y)
            backward_and_step(loss)  # one backward: the parameters' gradients and delta's
            with torch.no_grad():
                new = self.threat.project(x + delta + self.eps * delta.grad.sign(), x) - x
                self.delta[: x.shape[0]] = new
            out = LossOut(loss.detach(), {"ce_adv": loss.detach()}, logits.detach(), stepped=True)
        assert out is not None  # replays >= 1
        return out


@METHODS.register("trades")
class TRADES(_Adversarial):
    """TRADES (Zhang et al. 2019): CE(x) + beta * KL(p(x) || p(x_adv)); inner max of the KL (beta 6)."""

    name = "trades"

    def __init__(self, norm: str = "linf", eps: float = 0.031, steps: int = 10, step_size: float = 0.007,
                 beta: float = 6.0, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norm, eps, steps, step_size, False, eps_ramp_epochs)
        check_positive(beta, "beta", allow_zero=True)
        self.beta = beta

    def describe(self):
        return {**super().describe(), "beta": self.beta}

    def _inner(self, model, x, ctx, loss_of_logits):
        """The shared PGD loop on loss_of_logits(logits, clean logits), started at x + N(0, 0.001^2) as the TRADES and
        MART codes (then clipped: the reference codes do not clip here; [0, 1] is robustlab's domain)."""
        model = ctx.attacked(model)
        threat, f = self.batch_threat(model, x, ctx)

        def start(x: Tensor, gen: torch.Generator | None) -> Tensor:
            return threat.clip(x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype))

        with attack_mode(model):
            counter = PassCounter(model)
            with torch.no_grad():
                clean = counter.logits(x)
            out = pgd(counter, x, clean, threat=threat, loss_fn=lambda logits, t, _target: loss_of_logits(logits, t),
                      steps=self.steps, step_size=f * self.step_size, generator=ctx.generator, init=start)
        _attack_passes(ctx, counter)
        return out.x_adv.detach()

    def loss(self, model, batch, ctx):
        x_adv = self._inner(model, batch.x, ctx, lambda logits, t: _kl_sum(t, logits))
        logits = model(torch.cat([batch.x, x_adv]))
        clean, adv = logits.chunk(2)
        ce = F.cross_entropy(clean, batch.y)
        kl = _kl_sum(clean, adv).mean()
        return LossOut(ce + self.beta * kl, {"ce": ce.detach(), "kl": kl.detach()}, adv)


@METHODS.register("mart")
class MART(TRADES):
    """MART (Wang et al. 2020): BCE on the adversarial example + beta * KL weighted by (1 - p_nat[y])."""

    name = "mart"

    def __init__(self, norm: str = "linf", eps: float = 0.031, steps: int = 10, step_size: float = 0.007,
                 beta: float = 6.0, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norm, eps, steps, step_size, beta, eps_ramp_epochs)

    def loss(self, model, batch, ctx):
        y = batch.y
        x_adv = self._inner(model, batch.x, ctx, lambda logits, t: F.cross_entropy(logits, y, reduction="none"))
        logits = model(torch.cat([batch.x, x_adv]))
        clean, adv = logits.chunk(2)
        p_adv, p_nat = F.softmax(adv, 1), F.softmax(clean, 1)
        p_other = p_adv.scatter(1, y[:, None], -1.0)  # argmax over k != y
        y_tilde = p_other.argmax(1)
        bce = F.cross_entropy(adv, y) + (-torch.log(1.0001 - p_adv.gather(1, y_tilde[:, None]).squeeze(1) + 1e-12)).mean()
        kl = (torch.log(p_nat + 1e-12) - torch.log(p_adv + 1e-12)).mul(p_nat).sum(1)
        weight = 1.0000001 - p_nat.gather(1, y[:, None]).squeeze(1)
        reg = (kl * weight).mean()
        return LossOut(bce + self.beta * reg, {"bce": bce.detach(), "kl_weighted": reg.detach()}, adv)


@METHODS.register("vat")
class VAT(Method):
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
            d = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            for _ in range(self.ip):
                d = (self.xi * d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).requires_grad_(True)
                with torch.enable_grad():
                    (d,) = torch.autograd.grad(_kl_sum(target, model(x + d)).sum(), d)
        return self.eps * d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def loss(self, model, batch, ctx):
        x = batch.x
        r = self.perturbation(ctx.attacked(model), x, ctx.generator)
        ctx.passes[1] += x.shape[0] * self.ip
        logits = model(torch.cat([x, (x + r).clamp(0, 1)]))  # [0, 1] is robustlab's domain (the IJCNN code does not clip)
        clean, vadv = logits.chunk(2)
        ce = F.cross_entropy(clean, batch.y)
        lds = _kl_sum(clean.detach(), vadv).mean()
        return LossOut(ce + self.alpha * lds, {"ce": ce.detach(), "lds": lds.detach()}, clean)


@METHODS.register("margin")
class MarginMaximization(Method):
    """l_2 margin maximisation (Matyasko & Chau, IJCNN 2017): hinge loss + 0.1 ||grad z_y - grad z_l||^2.

    critic.md 9: multiclass hinge loss + lambda * ||grad_x z_y - grad_x z_l||_2^2, l the class whose logit
    gradient differs most from z_y's (argmax taken as a constant); double backpropagation through the input
    gradients."""

    name = "margin"
    norm = "l2"

    def __init__(self, lam: float = 0.1, margin: float = 1.0) -> None:
        check_positive(lam, "lam", allow_zero=True)
        check_positive(margin, "margin", allow_zero=True)
        self.lam, self.margin = float(lam), float(margin)

    def regularizer(self, logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample ||grad_x (z_y - z_l)||^2 with a graph (x must require grad and `logits` depend on it)."""
        from robustlab.attacks.critic import logit_jacobian

        jac = logit_jacobian(logits, x)  # (N, K, D) without a graph: only to choose l
        ar = torch.arange(x.shape[0], device=x.device)
        l_ = (jac - jac[ar, y][:, None]).pow(2).sum(2).argmax(1)
        diff = logits[ar, y] - logits[ar, l_]
        (g,) = torch.autograd.grad(diff.sum(), x, create_graph=True)
        return g.flatten(1).pow(2).sum(1)

    def loss(self, model, batch, ctx):
        x = batch.x.detach().requires_grad_(True)
        logits = model(x)
        y = batch.y
        ar = torch.arange(x.shape[0], device=x.device)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        hinge = (self.margin + other - logits[ar, y]).clamp_min(0).mean()
        if self.lam == 0:
            return LossOut(hinge, {"hinge": hinge.detach()}, logits)
        reg = self.regularizer(logits, x, y).mean()
        ctx.passes[1] += x.shape[0] * (logits.shape[1] + 1)
        return LossOut(hinge + self.lam * reg, {"hinge": hinge.detach(), "grad_reg": reg.detach()}, logits)


__all__ = ["Standard", "PGDAT", "FGSMAT", "FastAT", "FreeAT", "TRADES", "MART", "VAT", "MarginMaximization"]
