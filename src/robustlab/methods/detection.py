"""Detection training methods (spec cwat.md 4). The outer loss of every one is SSD's multibox loss; the
class-aware adversarial methods (cls, reg, mtd, toat, owat, cwat, cwat-fast) build on `det-std`."""
from __future__ import annotations

from robustlab.detection.loss import multibox_loss
from robustlab.methods.base import LossOut, Method
from robustlab.registry import METHODS


@METHODS.register("det-std")
class DetStandard(Method):
    """Standard (clean) detector training: the multibox loss with OHEM on natural images."""

    name = "det-std"
    task = "detection"

    def loss(self, model, batch, ctx):
        loc, conf = model(batch.x)
        loss, lcls, lreg = multibox_loss(loc, conf, batch.y, ctx.attacked(model).priors)
        return LossOut(loss, {"loss_cls": lcls.detach(), "loss_reg": lreg.detach()})
