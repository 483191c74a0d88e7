"""WPGD (Terzi, Susto, Chaudhari: directional adversarial training for cost-sensitive classification;
spec wpgd.md section 3): PGD adversarial training whose inner maximisation uses the Wasserstein loss on the
label space under a cost C ** p, so the attacker spends its budget towards distant (costly) classes and leaves
the boundaries between similar classes alone; the outer loss stays cross-entropy on the adversarial batch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.label_metrics.metric import get_metric, metric_power
from robustlab.losses.wasserstein import WassersteinAttackLoss
from robustlab.methods.adversarial import AdversarialMethod
from robustlab.methods.base import LossMethod
from robustlab.outputs import atomic_save_npy
from robustlab.registry import METHODS
from robustlab.types import LossOut
from robustlab.validation import check_positive


@METHODS.register("wpgd")
class WPGD(AdversarialMethod, LossMethod):
    """WPGD (Terzi, Susto, Chaudhari): l_inf PGD on the Wasserstein loss with ground cost metric ** p, then CE on x*.

    The inner loss is in log form (wpgd.md 2.3). Defaults: eps 4/255, 8 steps of 2.5 eps / 8, uniform random start,
    attack in eval mode; metric "cifar10-wordnet" (normalised to [0, 1]), "uniform", or a .npy/.csv file; p = 1;
    entropy_weight = 1/lambda = 0."""

    name = "wpgd"

    def __init__(self, eps: float = 4 / 255, steps: int = 8, step_size: float | None = None,
                 metric: str | list = "cifar10-wordnet", p: float = 1.0, entropy_weight: float = 0.0,
                 normalize: str | None = "max", random_start: bool = True, eps_ramp_epochs: float = 0.0) -> None:
        super().__init__("linf", eps, steps, step_size, random_start, eps_ramp_epochs)
        check_positive(entropy_weight, "entropy_weight", allow_zero=True)
        metric_power(torch.ones(1), p)  # validates p > 0 before any training
        self.metric, self.p, self.entropy_weight, self.normalize = metric, float(p), float(entropy_weight), normalize
        self.cost: Tensor | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "metric": self.metric if isinstance(self.metric, str) else "matrix",
                "p": self.p, "entropy_weight": self.entropy_weight}

    @classmethod
    def standin_inputs(cls, kwargs, num_classes, folder):
        metric = kwargs.get("metric")
        if not (isinstance(metric, str) and metric.endswith((".npy", ".csv"))):
            return kwargs
        g = np.random.default_rng(0)
        c = g.uniform(0.1, 1.0, (num_classes, num_classes))
        c = (c + c.T) / 2
        np.fill_diagonal(c, 0.0)
        path = Path(folder) / f"label-metric{Path(metric).suffix}"
        if path.suffix == ".npy":
            atomic_save_npy(path, c)
        else:
            np.savetxt(path, c, delimiter=",")
        return {**kwargs, "metric": str(path)}

    def cost_for(self, num_classes: int) -> Tensor:
        """C ** p, validated against the model's number of classes (on first use)."""
        if self.cost is None or self.cost.shape[0] != num_classes:
            self.cost = metric_power(get_metric(self.metric, num_classes, self.normalize), self.p)
        return self.cost

    def loss(self, model, batch, ctx):
        k = _num_classes(ctx.attacked(model), batch.x)
        attack_loss = WassersteinAttackLoss(self.cost_for(k).to(batch.x.device), self.entropy_weight)
        x_adv = self._pgd(model, batch.x, batch.y, ctx, loss_fn=attack_loss)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "num_classes" in config:
        return int(config["num_classes"])
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


__all__ = ["WPGD"]
