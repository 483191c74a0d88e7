"""Margin maximisation: a hinge on the logit margin plus its input-gradient regulariser."""
from __future__ import annotations

import torch
from torch import Tensor

from robustlab.methods.base import LossMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut
from robustlab.validation import check_positive


@METHODS.register("margin")
class MarginMaximization(LossMethod):
    """l_2 margin maximisation (Matyasko & Chau, IJCNN 2017): hinge loss + 0.1 ||grad z_y - grad z_l||^2.

    critic.md 9: multiclass hinge loss + lambda * ||grad_x z_y - grad_x z_l||_2^2, l the class whose logit
    gradient differs most from z_y's (argmax taken as a constant); double backpropagation through the input
    gradients."""

    name = "margin"
    norm = "l2"
    double_backward = True

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
