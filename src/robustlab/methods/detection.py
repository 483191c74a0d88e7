"""Detection training methods (spec cwat.md 4): STD and the class-aware adversarial family of the CWAT seed.

The outer (model-update) loss of every method is SSD's multibox loss on the adversarial images, in train mode
(`clean_fraction` > 0 mixes in the clean loss). PGD-based methods (cls, reg, mtd, toat, owat, cwat) attack in
eval mode with frozen parameters; the fast methods (cwat-fast, mtd-fast) follow Free-AT: one train-mode forward
per replay shared by the perturbation's gradient and the parameters' update, with a perturbation that persists
across minibatches. Budgets are pixel units (0-255). Cost per minibatch (K attack steps, m replays):
STD 1 backward; cls/reg/toat/owat/cwat K + 1; mtd 2K + 1 (+ 2 no-grad forwards); cwat-fast 2m; mtd-fast 3m
(+ 2m no-grad forwards). The Trainer counts them."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from robustlab.attacks.base import PassCounter, attack_mode
from robustlab.detection.attacks import PIXEL_MAX, ascend, select_by_total_loss
from robustlab.detection.loss import decompose, multibox_loss
from robustlab.detection.objectives import Objective
from robustlab.detection.targets import match_targets
from robustlab.errors import InputError
from robustlab.methods.base import LossMethod, PersistentDelta, StepMethod
from robustlab.registry import METHODS
from robustlab.threat import LinfBall
from robustlab.types import LossOut
from robustlab.validation import check_positive, check_positive_int


def _check_eps(eps: float) -> float:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0 in pixel units (0-255), got {eps!r}")
    return float(eps)


@METHODS.register("det-std")
class DetStandard(LossMethod):
    """Standard (clean) detector training: the multibox loss with OHEM on natural images."""

    name = "det-std"
    task = "detection"
    robustness_goal = False

    def loss(self, model, batch, ctx):
        loc, conf = model(batch.x)
        loss, lcls, lreg = multibox_loss(loc, conf, batch.y, ctx.attacked(model).priors)
        return LossOut(loss, {"loss_cls": lcls.detach(), "loss_reg": lreg.detach()})


class _DetPGDMethod(LossMethod):
    """PGD-K adversarial fine-tuning on one objective (eps 8, alpha eps/4 = 2, K = 10, no random start)."""

    eps: float

    task = "detection"
    objective_name = "cls"

    def __init__(self, eps: float = 8.0, alpha: float | None = None, steps: int = 10, random_start: bool = False,
                 clean_fraction: float = 0.0, beta_cls: float = math.inf, beta_reg: float = math.inf,
                 beta_o: float = 6.0, granularity: str = "anchor", attack_negatives: str = "none",
                 cwa_scope: str = "image") -> None:
        self.eps = _check_eps(eps)
        self.threat = LinfBall(self.eps, box=(0.0, PIXEL_MAX))
        self.alpha = self.eps / 4 if alpha is None else float(alpha)
        check_positive(self.alpha, "alpha", allow_zero=True)
        check_positive_int(steps, "steps")
        if not 0.0 <= clean_fraction <= 1.0:
            raise InputError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
        self.steps, self.random_start, self.clean_fraction = steps, random_start, float(clean_fraction)
        self.objective = Objective(self.objective_name, float(beta_cls), float(beta_reg), float(beta_o), granularity,
                                   attack_negatives, cwa_scope)

    def describe(self):
        return {**super().describe(), **{k: v for k, v in vars(self.objective).items()}}

    def adversarial(self, model, x: Tensor, targets: Tensor, ctx) -> tuple[Tensor, dict]:
        net = ctx.attacked(model)
        with attack_mode(net, "eval"):
            counter = PassCounter(net)
            x_adv = ascend(counter, x, targets, self.objective, self.threat, self.alpha, self.steps, self.random_start,
                           ctx.generator)
        ctx.passes[1] += counter.backward
        return x_adv, {}

    def loss(self, model, batch, ctx):
        x_adv, logs = self.adversarial(model, batch.x, batch.y, ctx)
        priors = ctx.attacked(model).priors
        loc, conf = model(x_adv)
        loss, lcls, lreg = multibox_loss(loc, conf, batch.y, priors)
        logs = {**logs, "loss_cls_adv": lcls.detach(), "loss_reg_adv": lreg.detach()}
        if self.clean_fraction > 0:
            loc_c, conf_c = model(batch.x)
            clean, _, _ = multibox_loss(loc_c, conf_c, batch.y, priors)
            loss = (1 - self.clean_fraction) * loss + self.clean_fraction * clean
            logs["loss_clean"] = clean.detach()
        return LossOut(loss, logs)


@METHODS.register("cls")
class CLS(_DetPGDMethod):
    """CLS (Zhang & Wang, ICCV 2019; Chen et al., CVPR 2021): adversarial training on PGD-K of A_cls."""

    name = "cls"
    objective_name = "cls"


@METHODS.register("reg")
class REG(_DetPGDMethod):
    """REG (Zhang & Wang, ICCV 2019; Chen et al., CVPR 2021): adversarial training on PGD-K of A_reg."""

    name = "reg"
    objective_name = "reg"


@METHODS.register("toat")
class TOAT(_DetPGDMethod):
    """TOAT (Chen et al., CVPR 2021): PGD-K of min(L_cls, beta_cls) + min(L_reg, beta_reg); TOAT-6 by default."""

    name = "toat"
    objective_name = "toat"
    forwards_options_to = (_DetPGDMethod,)

    def __init__(self, beta_cls: float = 6.0, beta_reg: float = 6.0, **kwargs) -> None:
        super().__init__(beta_cls=beta_cls, beta_reg=beta_reg, **kwargs)


@METHODS.register("owat")
class OWAT(_DetPGDMethod):
    """OWAT (Chen et al., CVPR 2021): PGD-K of the sum of per-object losses clipped at beta_o = 6 (OWA)."""

    name = "owat"
    objective_name = "owa"


@METHODS.register("cwat")
class CWAT(_DetPGDMethod):
    """CWAT (Chen et al., CVPR 2021): PGD-K of the class-normalised clipped object losses (CWA, beta_o = 6)."""

    name = "cwat"
    objective_name = "cwa"


@METHODS.register("mtd")
class MTD(_DetPGDMethod):
    """MTD (Zhang & Wang 2019) as the seed re-implements it: per image the stronger of the PGD-K A_cls and
    PGD-K A_reg examples (the multi-task domain attack); 2K + 1 backward passes and 2 selection forwards."""

    name = "mtd"
    objective_name = "cls"

    def adversarial(self, model, x, targets, ctx):
        net = ctx.attacked(model)
        with attack_mode(net, "eval"):
            counter = PassCounter(net)
            matched = match_targets(targets, net.priors)
            args = (self.threat, self.alpha, self.steps, self.random_start, ctx.generator, matched)
            x_cls = ascend(counter, x, targets, Objective("cls"), *args)
            x_reg = ascend(counter, x, targets, Objective("reg"), *args)
            pick_cls, _ = select_by_total_loss(net, x_cls, x_reg, targets, matched)
        ctx.passes[1] += counter.backward
        return torch.where(pick_cls[:, None, None, None], x_cls, x_reg), {"chose_cls": pick_cls.float().mean()}


class _FastMethod(PersistentDelta, StepMethod):
    """Free-AT skeleton (spec cwat.md 4.4-4.5; Shafahi et al. 2019): each minibatch is replayed m times; the
    perturbation (step eps) persists across minibatches and epochs. `epochs` in the config counts data epochs,
    so N_ep update epochs need ceil(N_ep / m) of them; the lr schedule, stepped per optimiser update, lands at the
    same fractions."""

    task = "detection"

    def __init__(self, eps: float = 8.0, replays: int = 4) -> None:
        self.eps = _check_eps(eps)
        check_positive_int(replays, "replays")
        self.replays = replays
        self.delta: Tensor | None = None

    def steps_per_batch(self) -> int:
        return self.replays


@METHODS.register("cwat-fast")
class CWATFast(_FastMethod):
    """Fast CWAT (Chen et al., CVPR 2021, Algorithm 1): per replay one train-mode forward, one backward of the class-wise
    objective for the perturbation and one of the multibox loss for the update (2 backward passes)."""

    name = "cwat-fast"

    def __init__(self, eps: float = 8.0, replays: int = 4, objective: str = "cwa", beta_o: float = 6.0,
                 beta_cls: float | None = None, beta_reg: float | None = None, granularity: str = "anchor",
                 attack_negatives: str = "none", cwa_scope: str = "image") -> None:
        super().__init__(eps, replays)
        # task-wise clipping exists for objective=toat only (TOAT-6 by default); elsewhere it stays unset
        unset = 6.0 if objective == "toat" else math.inf
        self.objective = Objective(objective, float(unset if beta_cls is None else beta_cls),
                                   float(unset if beta_reg is None else beta_reg), float(beta_o), granularity,
                                   attack_negatives, cwa_scope)

    def train_step(self, model, batch, optimizer, ctx, backward_and_step):
        x, targets = batch.x, batch.y
        net = ctx.attacked(model)
        matched = match_targets(targets, net.priors)
        out = None
        for _ in range(self.replays):
            delta = self.delta_for(x).detach().requires_grad_(True)
            loc, conf = model((x + delta).clamp(0, 255))  # ONE forward in train mode, shared by both gradients
            d = decompose(loc, conf, targets, net.priors, matched)
            j = self.objective(d, net.num_classes, targets.shape[1]).sum()
            (g,) = torch.autograd.grad(j, delta, retain_graph=True)  # backward 1: the perturbation's gradient
            ctx.passes[1] += x.shape[0]
            loss, lcls, lreg = d.multibox()
            backward_and_step(loss)  # backward 2: the parameters' update
            with torch.no_grad():
                self.delta[: x.shape[0]] = (delta.detach() + self.eps * g.sign()).clamp(-self.eps, self.eps)
            out = LossOut(loss.detach(), {"loss_cls_adv": lcls.detach(), "loss_reg_adv": lreg.detach()},
                          stepped=True)
        assert out is not None  # replays >= 1
        return out


@METHODS.register("mtd-fast")
class MTDFast(_FastMethod):
    """Fast MTD (named in Chen et al., CVPR 2021; made precise in spec cwat.md 4.4): per replay one train-mode forward,
    the gradients of sum L_cls and sum L_reg for the perturbation and the update (3 backward passes), then per image
    the candidate step (A_cls or A_reg)
    with the larger total loss, by two no-grad eval-mode forwards."""

    name = "mtd-fast"

    def train_step(self, model, batch, optimizer, ctx, backward_and_step):
        x, targets = batch.x, batch.y
        net = ctx.attacked(model)
        matched = match_targets(targets, net.priors)
        n = x.shape[0]
        out = None
        for _ in range(self.replays):
            delta = self.delta_for(x).detach().requires_grad_(True)
            loc, conf = model((x + delta).clamp(0, 255))
            d = decompose(loc, conf, targets, net.priors, matched)
            lcls_b, lreg_b = d.task_losses()
            (g_cls,) = torch.autograd.grad(lcls_b.sum(), delta, retain_graph=True)
            (g_reg,) = torch.autograd.grad(lreg_b.sum(), delta, retain_graph=True)
            ctx.passes[1] += 2 * n
            loss, lcls, lreg = d.multibox()
            backward_and_step(loss)
            with torch.no_grad():
                d_cls = (delta + self.eps * g_cls.sign()).clamp(-self.eps, self.eps)
                d_reg = (delta + self.eps * g_reg.sign()).clamp(-self.eps, self.eps)
                with attack_mode(net, "eval"):
                    pick_cls, _ = select_by_total_loss(net, (x + d_cls).clamp(0, 255), (x + d_reg).clamp(0, 255),
                                                       targets, matched)
                self.delta[:n] = torch.where(pick_cls[:, None, None, None], d_cls, d_reg)
            out = LossOut(loss.detach(), {"loss_cls_adv": lcls.detach(), "loss_reg_adv": lreg.detach(),
                                          "chose_cls": pick_cls.float().mean()}, stepped=True)
        assert out is not None  # replays >= 1
        return out
