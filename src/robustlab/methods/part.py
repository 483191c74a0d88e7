"""PART: pixel-reweighted adversarial training (Zhang et al., ICML 2024; spec part.md).

Standard AT gives every input element the same l_inf budget eps. PART computes a class activation map
of the model for each training image's predicted class, keeps the pixels whose squared, upsampled map
stands out (z-score > 1) as important, and attacks inside a per-element box: eps on important elements,
eps_low elsewhere (Pixel-AG). The outer loss is the base method's: AT (`part`), TRADES (`part-t`) or
MART (`part-m`). The first `burn_in_epochs` train the base method with the uniform budget (CAMs of an
untrained model mean nothing); afterwards the masks come from a frozen snapshot of the model (the
"mask model"), refreshed after burn-in and then every `refresh_epochs` (the seed's s) epochs, applied to
each batch's own (augmented) images. That per-batch alignment fixes the official code's misalignment
(part.md 8); `mask_alignment="batch_index"` replays it (compatibility mode, in-memory data): batch i of an epoch
takes the masks of batch i of a second shuffled, augmented pass made at the last refresh, as the code's list of
masks indexed by batch position does.

Pipeline (part.md 3): CAM (B, h, w) in [0, 1] -> bicubic upsampling to H x W -> square -> mask
(`zscore`: v > mean + std per image, the same for every channel; `official_jet`: the official code's
route through matplotlib's jet colormap, per channel) -> budget map E = where(mask, eps, eps_low)."""
from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from robustlab.attacks.cam import CAM_METHODS
from robustlab.attacks.pixel_ag import (
    MASK_MODES,
    PIXEL_AG_STARTS,
    UPSAMPLE,
    check_budgets,
    default_cam_layer,
    part_budget,
    uniform_eps_start,
)
from robustlab.errors import ConfigError
from robustlab.methods.mart import MART
from robustlab.methods.pgd_at import PGDAT
from robustlab.methods.trades import TRADES
from robustlab.registry import METHODS
from robustlab.threat import LinfBall
from robustlab.types import StepContext
from robustlab.validation import check_choice, check_positive_int


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached snapshot of `model` in eval mode with frozen parameters and without the original's hooks
    (a deepcopy would otherwise copy whatever a hook is bound to, e.g. the Trainer with its data)."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for name, value in vars(m).items():
            if name.endswith("_hooks") or "_hooks_" in name:
                memo[id(value)] = type(value)()
    snap = copy.deepcopy(model, memo).eval()
    for p in snap.parameters():
        p.requires_grad_(False)
    return snap


MASK_ALIGNMENTS = ("per_batch_snapshot", "batch_index")  # robustlab's default; the official code's (part.md 8)


class PixelReweighting:
    """Mixin over a PGD-family method: the per-element budget after burn-in, and the mask model's refreshes."""

    def _part_init(self, eps_low: float, burn_in_epochs: int, refresh_epochs: int, cam_method: str,
                   cam_layer: str | None, mask_mode: str, upsample: str,
                   mask_alignment: str = "per_batch_snapshot") -> None:
        check_budgets(self.eps, eps_low)  # type: ignore[attr-defined]
        check_positive_int(burn_in_epochs, "burn_in_epochs", minimum=0)
        check_positive_int(refresh_epochs, "refresh_epochs")
        check_choice(cam_method, "CAM method", CAM_METHODS)
        check_choice(mask_mode, "mask_mode", MASK_MODES)
        check_choice(upsample, "upsample mode", UPSAMPLE)
        check_choice(mask_alignment, "mask_alignment", MASK_ALIGNMENTS)
        self.mask_alignment = mask_alignment
        # batch_index replays the official code's second pass over the data (the trainer checks it has the data)
        self.needs_other_pass = mask_alignment == "batch_index"
        self.eps_low, self.burn_in_epochs, self.refresh_epochs = float(eps_low), burn_in_epochs, refresh_epochs
        self.cam_method, self.cam_layer, self.mask_mode, self.upsample = cam_method, cam_layer, mask_mode, upsample
        self.mask_model: nn.Module | None = None
        self._pending: dict[str, Tensor] | None = None
        self.refreshed_at: list[int] = []  # PART epochs (1-based) at which the mask model was refreshed

    def part_epoch(self, ctx: StepContext) -> int:
        """1-based epoch of the PART phase (<= 0 during burn-in)."""
        return ctx.epoch - self.burn_in_epochs + 1

    def _refresh(self, model: nn.Module, ctx: StepContext) -> None:
        e = self.part_epoch(ctx)
        due = ctx.step == 0 and (e == 1 or (e >= 2 and e % self.refresh_epochs == 0))
        if self.mask_model is None:
            self.mask_model = frozen_copy(model)
            if self._pending is not None and not due:  # resumed: the snapshot in force when the run stopped
                self.mask_model.load_state_dict(self._pending)
                self._pending = None
                return
            due = True
        if due:
            self.mask_model.load_state_dict(model.state_dict())
            self.refreshed_at.append(e)

    def batch_threat(self, model, x: Tensor, ctx: StepContext):
        if ctx.epoch < self.burn_in_epochs:
            return super().batch_threat(model, x, ctx)  # type: ignore[misc]
        model = ctx.attacked(model)
        self._refresh(model, ctx)
        assert self.mask_model is not None
        layer = self.cam_layer or default_cam_layer(model)
        if self.mask_alignment == "batch_index":  # the official code's masks: those of another pass's batch
            if ctx.other_pass is None:
                raise ConfigError("mask_alignment='batch_index' takes its masks from a second pass over the training "
                                  "data (StepContext.other_pass), which the trainer gives for data held in memory")
            x = ctx.other_pass(self._last_refresh(ctx), ctx.step)
        budget = part_budget(self.mask_model, x, self.eps, self.eps_low, layer=layer,  # type: ignore[attr-defined]
                             cam_method=self.cam_method, mask_mode=self.mask_mode, upsample=self.upsample)
        return LinfBall(budget), 1.0

    def _last_refresh(self, ctx: StepContext) -> int:
        """The (0-based) epoch whose mask pass is in force: the last refresh, PART epoch 1 or a multiple of s."""
        e = self.part_epoch(ctx)
        r = (e // self.refresh_epochs) * self.refresh_epochs
        return (r if r >= 2 else 1) + self.burn_in_epochs - 1

    def state_tensors(self) -> dict[str, Tensor]:
        if self.mask_model is None:
            return {}
        return {f"mask_model/{k}": v for k, v in self.mask_model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        state = {k[len("mask_model/"):]: v for k, v in tensors.items() if k.startswith("mask_model/")}
        self._pending = state or None
        self.mask_model = None

    def part_describe(self) -> dict[str, Any]:
        return {"eps_low": self.eps_low, "burn_in_epochs": self.burn_in_epochs, "refresh_epochs": self.refresh_epochs,
                "cam_method": self.cam_method, "cam_layer": self.cam_layer, "mask_mode": self.mask_mode,
                "upsample": self.upsample, "mask_alignment": self.mask_alignment}


@METHODS.register("part")
class PART(PixelReweighting, PGDAT):
    """PART (Zhang et al. 2024): PGD-AT with Pixel-AG (8/255 on CAM-important pixels, 7/255 elsewhere).

    Step 2/255, 10 steps, after 20 burn-in epochs of PGD-AT; masks refreshed every `refresh_epochs` (s). Pixel-AG
    starts at x + U(-eps, eps) with the scalar eps, unclipped (`start="uniform_eps"`, part.md 4.1);
    `start="budget"` starts uniformly inside the per-element box instead."""

    name = "part"

    def __init__(self, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10, step_size: float = 2 / 255,
                 burn_in_epochs: int = 20, refresh_epochs: int = 1, cam_method: str = "gradcam",
                 cam_layer: str | None = None, mask_mode: str = "zscore", upsample: str = "torch_bicubic",
                 random_start: bool = True, start: str = "uniform_eps", eps_ramp_epochs: float = 0.0,
                 mask_alignment: str = "per_batch_snapshot") -> None:
        PGDAT.__init__(self, "linf", eps, steps, step_size, random_start, eps_ramp_epochs)
        self._part_init(eps_low, burn_in_epochs, refresh_epochs, cam_method, cam_layer, mask_mode, upsample,
                        mask_alignment)
        check_choice(start, "Pixel-AG start", PIXEL_AG_STARTS)
        self.start = start

    def start_point(self, ctx: StepContext):
        if ctx.epoch < self.burn_in_epochs or self.start != "uniform_eps":
            return None  # burn-in is plain PGD-AT (its start is uniform in the ball, clipped)
        return uniform_eps_start(self.eps)

    def describe(self):
        return {**PGDAT.describe(self), **self.part_describe(), "start": self.start}


@METHODS.register("part-t")
class PARTT(PixelReweighting, TRADES):
    """PART-T: TRADES (beta 6) with the Pixel-AG inner maximisation of the KL term after burn-in."""

    name = "part-t"

    def __init__(self, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10, step_size: float = 2 / 255,
                 beta: float = 6.0, burn_in_epochs: int = 20, refresh_epochs: int = 1, cam_method: str = "gradcam",
                 cam_layer: str | None = None, mask_mode: str = "zscore", upsample: str = "torch_bicubic",
                 eps_ramp_epochs: float = 0.0, mask_alignment: str = "per_batch_snapshot") -> None:
        TRADES.__init__(self, "linf", eps, steps, step_size, beta, eps_ramp_epochs)
        self._part_init(eps_low, burn_in_epochs, refresh_epochs, cam_method, cam_layer, mask_mode, upsample,
                        mask_alignment)

    def describe(self):
        return {**TRADES.describe(self), **self.part_describe()}


@METHODS.register("part-m")
class PARTM(PixelReweighting, MART):
    """PART-M: MART (beta 6) with the Pixel-AG inner maximisation after burn-in."""

    name = "part-m"

    def __init__(self, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10, step_size: float = 2 / 255,
                 beta: float = 6.0, burn_in_epochs: int = 20, refresh_epochs: int = 1, cam_method: str = "gradcam",
                 cam_layer: str | None = None, mask_mode: str = "zscore", upsample: str = "torch_bicubic",
                 eps_ramp_epochs: float = 0.0, mask_alignment: str = "per_batch_snapshot") -> None:
        MART.__init__(self, "linf", eps, steps, step_size, beta, eps_ramp_epochs)
        self._part_init(eps_low, burn_in_epochs, refresh_epochs, cam_method, cam_layer, mask_mode, upsample,
                        mask_alignment)

    def describe(self):
        return {**MART.describe(self), **self.part_describe()}


__all__ = ["PART", "PARTT", "PARTM", "frozen_copy"]
