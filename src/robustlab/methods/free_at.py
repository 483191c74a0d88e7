"""Free adversarial training (Shafahi et al. 2019): minibatch replays with a persistent perturbation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.methods.adversarial import AdversarialMethod
from robustlab.methods.base import PersistentDelta, StepMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut
from robustlab.validation import check_positive_int


@METHODS.register("free-at")
class FreeAT(PersistentDelta, AdversarialMethod, StepMethod):
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
