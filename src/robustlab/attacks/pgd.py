"""FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018, arXiv:1706.06083) for l_inf, l_2 and l_1.

Threat model: any `LpBall` (l_1 uses the SLIDE sparse step). Defaults: baselines.md 2.1-2.2.
PGD returns the final iterate (training attacks, and `PGD(...)` by default); with best_iterate=True (what
`evaluate` uses for PGD specs that do not say otherwise) per sample the first iterate that fools the model, and
fooled samples leave the batch: never weaker, usually cheaper. With restarts, per sample the restart that fools
the model, else the one with the highest final loss.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from robustlab.attacks.base import Attack, PassCounter
from robustlab.errors import InputError
from robustlab.losses import get_loss
from robustlab.losses.classification import margin
from robustlab.registry import ATTACKS
from robustlab.threat import LpBall, make_threat
from robustlab.threat.lp import normalise_norm
from robustlab.types import AttackOut
from robustlab.validation import check_positive, check_positive_int, reject_inapplicable


def pgd(
    counter: PassCounter,
    x: Tensor,
    y: Tensor,
    *,
    threat: LpBall,
    loss_fn,
    steps: int,
    step_size: float | Tensor,
    random_start: bool = True,
    restarts: int = 1,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
    init: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
    best_iterate: bool = False,
) -> AttackOut:
    """The one PGD loop of robustlab: no mode handling, no validation. Loss gradients are of the per-sample sum.

    `loss_fn(output, y, target)` is the per-sample objective: y is what it compares against (labels; TRADES' clean
    logits; a detector's padded targets) and the model's output may be anything loss_fn reads (a detector's
    (loc, conf)). random_start draws x_0 with `threat.random_init`, or with `init(x, generator)` when given
    (Pixel-AG's start, TRADES' small Gaussian). With restarts > 1 the output must be logits (success is a
    misclassification). best_iterate (evaluation, logits only): per sample the first iterate that fools the model
    (else the final one), and fooled samples leave the batch (see `_best_iterate_run`)."""
    best_x = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
    best_rate = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)  # success share of the kept restart
    start = init if init is not None else threat.random_init
    for _ in range(restarts):
        x_adv = start(x, generator) if random_start else x.clone()
        if best_iterate:
            x_adv = _best_iterate_run(counter, x, y, x_adv, threat, loss_fn, steps, step_size, target)
        for _ in range(0 if best_iterate else steps):
            _, _, g = counter.loss_and_grad(x_adv, loss_fn, y, target)
            x_adv = threat.step(x_adv, g, step_size, x)
        if restarts == 1:  # success flags left to the caller (Attack.run adds them on demand)
            return AttackOut(x_adv, None)
        with torch.no_grad():
            logits = counter.logits(x_adv)
            loss = loss_fn(logits, y, target)
        # with eot > 1 a restart is judged by the share of eot passes it succeeds on, never by one draw
        rate = (_success(logits, y, target).to(x.dtype) if counter.eot == 1
                else counter.success_rate(x_adv, lambda out: _success(out, y, target)))
        better = (rate > best_rate) | ((rate == best_rate) & (loss > best_loss))
        best_x = torch.where(better.view(-1, 1, 1, 1), x_adv, best_x)
        best_loss = torch.where(better, loss, best_loss)
        best_rate = torch.maximum(best_rate, rate)
    return AttackOut(best_x, best_rate > 0.5)


def _best_iterate_run(counter: PassCounter, x: Tensor, y: Tensor, x_adv: Tensor, threat: LpBall, loss_fn,
                      steps: int, step_size: float | Tensor, target: Tensor | None) -> Tensor:
    """PGD from x_adv keeping, per sample, the first iterate the model misclassifies (x_0 included; the final
    iterate where none does). Each iterate is judged by the forward pass its gradient step needs anyway, so this
    costs no extra pass; a fooled sample leaves the working batch, which shrinks the later passes. Samples never
    interact (the model is in eval mode, the loss is per sample, the random start is drawn before the loop), so
    leaving the batch changes no other sample's trajectory. With a per-sample budget or step size the batch
    keeps its size and fooled samples are frozen instead.
    With eot > 1 (randomised models) an iterate fools the model only when it fools every one of the eot passes;
    a sample never fooled so returns its iterate with the lowest share of correct passes (ties: the latest),
    the final one where every pass of every iterate was correct."""
    per_sample = any(isinstance(v, Tensor) and v.numel() > 1 for v in (threat.eps, step_size))
    estimate = counter.eot > 1
    out = x_adv.clone()
    active = torch.arange(x.shape[0], device=x.device)
    xa, x0, ya, ta = x_adv, x, y, target
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best, acc_best = x_adv.clone(), torch.ones(x.shape[0], device=x.device, dtype=x.dtype)  # eot > 1 only

    def fooling(logits: Tensor) -> Tensor:  # reads the working batch (ya, ta narrow as samples leave)
        return _success(logits, ya, ta)

    for _ in range(steps):
        rate, _, g = counter.success_and_grad(xa, loss_fn, ya, ta, fooling)
        fooled = rate == 1
        if estimate:
            better = (rate > 0) & (1 - rate <= acc_best)
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), xa, best)
            acc_best = torch.minimum(acc_best, 1 - rate)
        if per_sample:
            newly = fooled & ~done
            out[newly] = xa[newly]
            done |= fooled
            xa = torch.where(done.view(-1, *([1] * (x.dim() - 1))), xa, threat.step(xa, g, step_size, x0))
            continue
        out[active[fooled]] = xa[fooled]
        keep = ~fooled
        active, xa, x0, ya, g = active[keep], xa[keep], x0[keep], ya[keep], g[keep]
        ta = ta[keep] if ta is not None else None
        if estimate:
            best, acc_best = best[keep], acc_best[keep]
        if active.numel() == 0:
            return out
        xa = threat.step(xa, g, step_size, x0)
    if estimate:  # never fooled by every pass: the iterate with the lowest estimate, if any pass was fooled
        xa = torch.where((acc_best < 1).view(-1, *([1] * (x.dim() - 1))), best, xa)
    if per_sample:
        return torch.where(done.view(-1, *([1] * (x.dim() - 1))), out, xa)
    out[active] = xa
    return out


def _success(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    pred = logits.argmax(1)
    return pred == target if target is not None else pred != y


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected gradient descent, l_inf / l_2 / l_1 (SLIDE), CE / CW-margin / DLR loss, random start, restarts.

    Example: `PGD(model, norm="linf", eps=0.3, steps=40, step_size=0.01)(x, y) -> x_adv`.
    step_size defaults to 2.5 * eps / steps. l_1 only: `q` (SLIDE's sparsity quantile) and `mask_saturated`
    (on by default: never spend a sparse step on a pixel that sits on a box face and is pushed outward, the
    stronger variant of Tramer & Boneh and foolbox; without it SLIDE overstates l_1 robustness on images with
    many saturated pixels such as MNIST). l_2 only: `l2_proj` ("scale_then_clip" as the reference codes, or
    "exact"). best_iterate: per sample the first iterate that fools the model, fooled samples leaving the batch
    (evaluation; `evaluate` turns it on for PGD specs); off, the final iterate (what training uses).
    eot: each step's gradient is the mean over eot forward/backward passes (expectation over transformation, for
    models with randomness in the forward pass).
    """

    name = "pgd"
    supports_targeted = True

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float | Tensor = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        loss: str = "ce",
        random_start: bool = True,
        restarts: int = 1,
        q: float = 0.99,
        mask_saturated: bool = True,
        l2_proj: str = "scale_then_clip",
        seed: int | None = 0,
        bn_mode: str = "eval",
        precision: str = "fp32",
        compile: bool = False,
        best_iterate: bool = False,
        eot: int = 1,
    ) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        check_positive_int(steps, "steps")
        check_positive_int(restarts, "restarts")
        check_positive_int(eot, "eot")
        self.eot = eot  # gradients averaged over eot passes per step (models with randomness in the forward)
        if not isinstance(best_iterate, bool):
            raise InputError(f"best_iterate must be true or false, got {best_iterate!r}")
        if best_iterate and bn_mode != "eval":
            raise InputError("best_iterate lets fooled samples leave the batch, which changes BatchNorm's batch "
                             "statistics under bn_mode=train: use bn_mode=eval (evaluation) or best_iterate=false")
        self.best_iterate = best_iterate
        threat_kwargs: dict[str, Any] = {}
        key = normalise_norm(norm)
        if key != "l1":
            reject_inapplicable({"q": (q, 0.99), "mask_saturated": (mask_saturated, True)},
                                "SLIDE's options apply to norm=l1 only")
        if key != "l2":
            reject_inapplicable({"l2_proj": (l2_proj, "scale_then_clip")}, "l2_proj applies to norm=l2 only")
        if key == "l1":
            threat_kwargs = {"q": q, "mask_saturated": bool(mask_saturated)}
        elif key == "l2":
            threat_kwargs = {"l2_proj": l2_proj}
        self.threat = make_threat(key, eps, **threat_kwargs)
        if step_size is None:
            step_size = 2.5 * float(eps if not isinstance(eps, Tensor) else eps.max()) / steps
        check_positive(step_size, "step_size", allow_zero=True)
        self.steps, self.step_size, self.loss = steps, step_size, loss
        self.loss_fn = get_loss(loss)
        self.random_start, self.restarts = random_start, restarts

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "steps": self.steps, "step_size": self.step_size, "loss": self.loss,
                "restarts": self.restarts, "best_iterate": self.best_iterate, "eot": self.eot}

    def _run(self, counter, x, y, target, gen):
        return pgd(counter, x, y, threat=self.threat, loss_fn=self.loss_fn, steps=self.steps,
                   step_size=self.step_size, random_start=self.random_start, restarts=self.restarts,
                   target=target, generator=gen, best_iterate=self.best_iterate)


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """Fast gradient sign method (l_inf) / fast gradient method (l_2): one step of size eps, no random start."""

    name = "fgsm"
    no_op_options = {"seed": "deterministic: draws nothing at random (every attack takes a seed)"}
    supports_targeted = True

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float | Tensor = 8 / 255, loss: str = "ce",
                 seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        if norm not in ("linf", "l2", "Linf", "L2", "inf"):
            raise InputError(f"FGSM supports norms linf and l2, got {norm!r}")
        self.threat = make_threat(norm, eps)
        self.loss_fn = get_loss(loss)

    def _run(self, counter, x, y, target, gen):
        return pgd(counter, x, y, threat=self.threat, loss_fn=self.loss_fn, steps=1,
                   step_size=self.threat.eps_like(x), random_start=False, target=target, generator=gen)


__all__ = ["PGD", "FGSM", "pgd", "margin"]
