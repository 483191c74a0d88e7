"""The adversary-critic attack (Matyasko & Chau, NeurIPS 2018; spec critic.md sections 3, 5, 8.2).

A targeted l_2 attack that raises the target's log-probability to log C with the l_2-minimal step of
the linearised constraint, r = (log C - log p_t) / ||grad log p_t||_2 along the gradient (eq. 7).

- `closest_boundary_targets`: the class whose linearised decision boundary is nearest (section 3).
- `high_confidence_attack`: the differentiable training version (section 5): N_max steps, a
  sigmoid-adjusted straight-through estimator for the stopping indicator, input gradients kept in the
  graph (`create_graph=True`) so a loss on the result reaches the classifier's parameters.
- `CriticAttack` (registered as `critic`): the evaluation version (section 8.2): up to 500 steps,
  per-step l_2 clip 0.1, box projection, stops once the target is predicted with confidence C.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack, PassCounter
from robustlab.errors import InputError
from robustlab.registry import ATTACKS
from robustlab.threat import per_sample_norm
from robustlab.types import AttackOut
from robustlab.validation import check_positive, check_positive_int


def _bview(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def check_confidence(c: float | Tensor, name: str = "confidence") -> None:
    """Target confidences must lie strictly inside (0, 1): log C is finite and C is reachable."""
    if isinstance(c, Tensor):
        bad = ~((c > 0) & (c < 1))
        if bool(bad.any()):
            raise InputError(f"{name} must lie in (0, 1); got values in [{c.min().item():.4g}, {c.max().item():.4g}]")
        return
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1:
        raise InputError(f"{name} must lie in (0, 1), got {c!r}")


def logit_jacobian(logits: Tensor, x: Tensor) -> Tensor:
    """(N, K, D) input gradients of every logit: K backward passes through one forward (retained graph).

    Samples are independent (no batch statistics), so the gradient of the batch sum of logit k is the
    per-sample gradient. No graph is kept on the result."""
    k = logits.shape[1]
    rows = [torch.autograd.grad(logits[:, j].sum(), x, retain_graph=True)[0].flatten(1) for j in range(k)]
    return torch.stack(rows, 1)


def closest_boundary_targets(logits: Tensor, jacobian: Tensor, reference: Tensor) -> Tensor:
    """argmin_{k != l} |z_k - z_l| / ||grad_x (z_k - z_l)||_2 for reference classes l (section 3); constant."""
    ar = torch.arange(logits.shape[0], device=logits.device)
    f = (logits - logits[ar, reference][:, None]).detach()
    w = jacobian - jacobian[ar, reference][:, None]
    dist = f.abs() / w.norm(dim=2).clamp_min(1e-12)
    dist[ar, reference] = math.inf
    return dist.argmin(1)


def find_targets(model: nn.Module, x: Tensor, reference: Tensor | None = None) -> Tensor:
    """Closest-boundary targets at x w.r.t. `reference` (default: the prediction); K backward passes."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        jac = logit_jacobian(logits, xg)
    ref = logits.argmax(1) if reference is None else reference
    return closest_boundary_targets(logits.detach(), jac, ref)


def random_targets(reference: Tensor, num_classes: int, gen: torch.Generator | None = None) -> Tensor:
    """Masked-uniform targets: a class drawn uniformly among the num_classes - 1 classes other than reference."""
    shift = rng.randint(1, num_classes, reference.shape, generator=gen, device=reference.device)
    return (reference + shift) % num_classes


def straight_through_indicator(pt: Tensor, c: Tensor) -> Tensor:
    """Forward: 1 where p_t < C, else 0 (sigmoid(C - p_t) > 1/2, so exactly equal gives 0);
    backward: the derivative of sigmoid(C - p_t) (the sigmoid-adjusted straight-through estimator)."""
    soft = torch.sigmoid(c - pt)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def high_confidence_attack(model: nn.Module, x: Tensor, target: Tensor, confidence: Tensor, *, steps: int = 5,
                           overshoot: float = 0.05, create_graph: bool = True,
                           backprop_through_points: bool = False, counter: PassCounter | None = None) -> Tensor:
    """The differentiable targeted attack A_f(x; t, C) of training (critic.md section 5).

    Returns x + (1 + overshoot) r without clipping to [0, 1] (as in training). With create_graph the result
    depends on the model's parameters through the input gradients g, the step sizes and the straight-through
    stopping indicators of every step; the evaluation points u are detached unless backprop_through_points
    (the official code's truncation is the default). `confidence` may carry a graph (the cycle attack's)."""
    e = 1e-8
    n = x.shape[0]
    log_c = torch.log(confidence)
    r = torch.zeros_like(x)
    alive = torch.ones(n, device=x.device, dtype=x.dtype)
    ar = torch.arange(n, device=x.device)
    for _ in range(steps):
        u = x + (1 + overshoot) * r
        if not backprop_through_points or not u.requires_grad:
            u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            lp = F.log_softmax(model(u), 1)[ar, target]
            alive = alive * straight_through_indicator(lp.exp(), confidence)
            (g,) = torch.autograd.grad(lp.sum(), u, create_graph=create_graph)
        if counter is not None:
            counter.forward += n
            counter.backward += n
        a = (lp - log_c).abs()
        norm = torch.sqrt(e + g.flatten(1).pow(2).sum(1))
        r = r + _bview(alive * (math.sqrt(e) + a / norm) / norm, x) * g
        if not create_graph:
            r = r.detach()
    return x + (1 + overshoot) * r


@ATTACKS.register("critic")
class CriticAttack(Attack):
    """Adversary-critic attack (evaluation version): closest-boundary target, C = clean confidence, <= 500 steps."""

    name = "critic"
    no_op_options = {"seed": "deterministic: draws nothing at random (every attack takes a seed)"}
    minimal = True
    supports_targeted = True

    def __init__(self, model: nn.Module, *, steps: int = 500, max_step: float = 0.1, overshoot: float = 0.02,
                 confidence: float | None = None, eps: float | None = None, seed: int | None = 0,
                 bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        check_positive_int(steps, "steps")
        check_positive(max_step, "max_step")
        check_positive(overshoot, "overshoot", allow_zero=True)
        if confidence is not None:
            check_confidence(confidence)
        self.steps, self.max_step, self.overshoot, self.confidence = steps, float(max_step), overshoot, confidence
        self.eps_value = eps  # optional budget: successes beyond it count as failures

    @property
    def norm(self) -> str:
        return "l2"

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": "l2", "eps": self.eps_value, "steps": self.steps,
                "max_step": self.max_step, "confidence": self.confidence if self.confidence is not None else "clean"}

    def _run(self, counter, x, y, target, gen):
        n = x.shape[0]
        ar = torch.arange(n, device=x.device)
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = counter.logits(xg)
            if target is None:
                jac = logit_jacobian(logits, xg)
                counter.backward += n * logits.shape[1]
        if target is None:
            target = closest_boundary_targets(logits.detach(), jac, y)
        if self.confidence is None:
            conf = F.softmax(logits.detach(), 1).amax(1).clamp(1e-6, 1 - 1e-6)
        else:
            conf = torch.full((n,), float(self.confidence), device=x.device, dtype=x.dtype)
        log_c = conf.log()
        k = 1 + self.overshoot
        r = torch.zeros_like(x)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            idx = active.nonzero().squeeze(1)  # one sync per step: the loop shrinks to the active samples
            if idx.numel() == 0:
                break
            u = (x[idx] + k * r[idx]).requires_grad_(True)
            with torch.enable_grad():
                z = counter.logits(u)
                lp = F.log_softmax(z, 1)[torch.arange(idx.numel(), device=x.device), target[idx]]
                g = counter.grad(lp.sum(), u)
            reached = (z.detach().argmax(1) == target[idx]) & (lp.detach() >= log_c[idx])  # checked before the step
            norm = torch.sqrt(1e-8 + g.flatten(1).pow(2).sum(1))
            step = _bview((1e-4 + (lp.detach() - log_c[idx]).abs() / norm) / norm, u) * g
            step = step * _bview((self.max_step / per_sample_norm(step, "l2").clamp_min(1e-12)).clamp(max=1.0), u)
            step = torch.where(_bview(reached, u), torch.zeros_like(step), step)
            new = r[idx] + step
            r[idx] = ((x[idx] + k * new).clamp(0, 1) - x[idx]) / k  # project onto the box
            active[idx] = ~reached
        x_adv = (x + k * r).clamp(0, 1)
        with torch.no_grad():
            p = F.softmax(counter.logits(x_adv), 1)
        success = (p.argmax(1) == target) & (p[ar, target] >= conf * (1 - 1e-6))
        norms = per_sample_norm(x_adv - x, "l2")
        if self.eps_value is not None:
            success &= norms <= self.eps_value
        x_adv = torch.where(_bview(success, x), x_adv, x) if self.eps_value is not None else x_adv
        norms = torch.where(success, norms, torch.full_like(norms, math.inf))
        return AttackOut(x_adv, success, norms=norms)


__all__ = [
    "CriticAttack",
    "check_confidence",
    "closest_boundary_targets",
    "find_targets",
    "high_confidence_attack",
    "logit_jacobian",
    "straight_through_indicator",
]
