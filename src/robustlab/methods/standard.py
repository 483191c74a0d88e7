"""Standard (clean) training: cross-entropy on the clean batch."""
from __future__ import annotations

import torch.nn.functional as F

from robustlab.methods.base import LossMethod
from robustlab.registry import METHODS
from robustlab.types import LossOut


@METHODS.register("standard")
class Standard(LossMethod):
    """Standard (clean) training: cross-entropy on natural images."""

    name = "standard"
    robustness_goal = False

    def loss(self, model, batch, ctx):
        logits = model(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce": loss.detach()}, logits)
