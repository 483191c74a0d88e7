"""PART: pixel-reweighted adversarial training (Zhang et al., ICML 2024; spec part.md).

Standard AT gives every input element the same l_inf budget eps. PART computes a class activation map
of the model for each training image's predicted class, keeps the pixels whose squared, upsampled map
stands out (z-score > 1) as important, and attacks inside a per-element box: eps on important elements,
eps_low elsewhere (Pixel-AG). The outer loss is the base method's: AT (`part`), TRADES (`part-t`) or
MART (`part-m`). The first `burn_in_epochs` train the base method with the uniform budget (CAMs of an
untrained model mean nothing); afterwards the masks come from a frozen snapshot of the model (the
"mask model"), refreshed after burn-in and then every `refresh_epochs` (the seed's s) epochs, applied to
each batch's own (augmented) images. That per-batch alignment fixes the official code's misalignment
(part.md 8).

Pipeline (part.md 3): CAM (B, h, w) in [0, 1] -> bicubic upsampling to H x W -> square -> mask
(`zscore`: v > mean + std per image, the same for every channel; `official_jet`: the official code's
route through matplotlib's jet colormap, per channel) -> budget map E = where(mask, eps, eps_low).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.attacks.base import Attack, AttackOut
from robustlab.attacks.pgd import pgd
from robustlab.cam import CAM_METHODS, class_activation_maps
from robustlab.losses import ce_loss
from robustlab.methods.baselines import MART, PGDAT, TRADES
from robustlab.methods.base import StepContext
from robustlab.registry import ATTACKS, METHODS
from robustlab.threat import LinfBall
from robustlab.validation import check_choice, check_eps, check_positive, check_positive_int

MASK_MODES = ("zscore", "official_jet")
UPSAMPLE = ("torch_bicubic", "pil_bicubic")
# The layer whose CAM drives the mask, per registered architecture (part.md 3.2; the mnist5k ones by analogy:
# the last convolution's ReLU output before pooling).
DEFAULT_CAM_LAYERS = {"resnet18": "body.layers", "preact-resnet18": "body.layers", "wrn": "body.layers",
                      "small-cnn": "body.8", "lenet5": "body.4"}


def default_cam_layer(model: nn.Module) -> str:
    name = getattr(model, "config", {}).get("name") if isinstance(getattr(model, "config", None), dict) else None
    if name in DEFAULT_CAM_LAYERS:
        return DEFAULT_CAM_LAYERS[name]
    raise ValueError(f"no default CAM layer for model {name or type(model).__name__!r}; set cam_layer to a module "
                     f"name (defaults exist for {', '.join(sorted(DEFAULT_CAM_LAYERS))})")


def check_budgets(eps: float, eps_low: float) -> None:
    check_eps(eps)
    check_eps(eps_low, "eps_low")
    if eps_low > eps:
        raise ValueError(f"eps_low ({eps_low}) must not exceed eps ({eps}): unimportant pixels get the smaller budget")


def upsample_maps(cam: Tensor, size: tuple[int, int], mode: str = "torch_bicubic") -> Tensor:
    """(B, h, w) -> (B, H, W) bicubic. torch (a = -0.75) by default; `pil_bicubic` is the official code's
    PIL float-image resize (a = -0.5). Values may leave [0, 1] slightly and are kept."""
    check_choice(mode, "upsample mode", UPSAMPLE)
    if mode == "torch_bicubic":
        return F.interpolate(cam[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]
    import numpy as np
    from PIL import Image

    out = [np.asarray(Image.fromarray(m.cpu().numpy().astype(np.float32), mode="F").resize(
        (size[1], size[0]), Image.BICUBIC)) for m in cam]
    return torch.from_numpy(np.stack(out)).to(cam.device, cam.dtype)


def _jet(v: Tensor) -> Tensor:
    """matplotlib's 256-entry jet lookup on v clipped to [0, 1]: (B, H, W) -> (B, 3, H, W)."""
    from matplotlib import colormaps

    lut = torch.tensor(colormaps["jet"](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=v.dtype, device=v.device)
    idx = (v.clamp(0, 1) * 256).floor().clamp(max=255).long()  # matplotlib: int(x * N), x = 1 -> the last entry
    return lut[idx].permute(0, 3, 1, 2)


def importance_mask(cam: Tensor, shape: tuple[int, int, int], mode: str = "zscore",
                    upsample: str = "torch_bicubic") -> Tensor:
    """Boolean (B, C, H, W) mask of the important elements from (B, h, w) CAMs (part.md 3.4-3.5)."""
    check_choice(mode, "mask_mode", MASK_MODES)
    c, h, w = shape
    v = upsample_maps(cam, (h, w), upsample).pow(2)
    if mode == "zscore":
        flat = v.flatten(1)
        mu, sd = flat.mean(1), flat.std(1, unbiased=False)
        imp = (flat > (mu + sd)[:, None]) & (sd > 0)[:, None]
        return imp.view(-1, 1, h, w).expand(-1, c, h, w)
    if c != 3:
        raise ValueError(f"mask_mode 'official_jet' builds an RGB colormap and needs 3-channel images, got {c}")
    rgb = _jet(v)
    flat = rgb.flatten(1)
    mu, sd = flat.mean(1), flat.std(1, unbiased=False)
    z = (rgb - mu.view(-1, 1, 1, 1)) / sd.clamp_min(1e-12).view(-1, 1, 1, 1)
    return (z > 1) & (sd > 0).view(-1, 1, 1, 1)


def budget_map(mask: Tensor, eps: float, eps_low: float) -> Tensor:
    """E = eps on important elements, eps_low elsewhere (float, the mask's shape)."""
    check_budgets(eps, eps_low)
    if mask.dtype != torch.bool:
        raise TypeError(f"the mask must be a boolean tensor, got {mask.dtype}")
    return torch.where(mask, torch.tensor(float(eps)), torch.tensor(float(eps_low))).to(torch.float32)


def part_budget(model: nn.Module, x: Tensor, eps: float, eps_low: float, *, layer: str | None = None,
                cam_method: str = "gradcam", mask_mode: str = "zscore", upsample: str = "torch_bicubic") -> Tensor:
    """The whole pipeline: CAM of the predicted class -> mask -> budget map of x's shape."""
    cam = class_activation_maps(model, x, layer or default_cam_layer(model), cam_method)
    return budget_map(importance_mask(cam, tuple(x.shape[1:]), mask_mode, upsample), eps, eps_low).to(x)


def check_budget_shape(budget: Tensor, x: Tensor) -> None:
    if budget.shape != x.shape and budget.shape != x.shape[1:]:
        raise ValueError(f"the budget map has shape {tuple(budget.shape)}; it must match the images "
                         f"{tuple(x.shape)} (or one image, {tuple(x.shape[1:])})")


@ATTACKS.register("pixel-ag")
class PixelAG(Attack):
    """Pixel-AG (PART's inner attack): l_inf PGD in a per-element box |delta| <= E (CAM budget map or given).

    E is a fixed `budget` map (one image's shape or the batch's) or, by default, PART's CAM budget map of the
    attacked model (eps on important elements, eps_low elsewhere). With eps_low = eps it is PGD exactly."""

    name = "pixel-ag"

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10,
                 step_size: float = 2 / 255, random_start: bool = True, budget: Tensor | None = None,
                 cam_layer: str | None = None, cam_method: str = "gradcam", mask_mode: str = "zscore",
                 seed: int | None = 0, bn_mode: str = "eval") -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode)  # type: ignore[arg-type]
        check_budgets(eps, eps_low)
        check_positive_int(steps, "steps")
        check_positive(step_size, "step_size", allow_zero=True)
        check_choice(cam_method, "CAM method", CAM_METHODS)
        check_choice(mask_mode, "mask_mode", MASK_MODES)
        if budget is not None:
            check_eps(budget, "budget")
        self.eps_value, self.eps_low, self.steps, self.step_size = float(eps), float(eps_low), steps, float(step_size)
        self.random_start, self.budget = random_start, budget
        self.cam_layer, self.cam_method, self.mask_mode = cam_layer, cam_method, mask_mode
        self.threat = LinfBall(float(eps))  # the envelope: every E <= eps

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, "norm": "linf", "eps": self.eps_value, "eps_low": self.eps_low,
                "steps": self.steps, "step_size": self.step_size}

    def budget_for(self, x: Tensor) -> Tensor:
        if self.budget is not None:
            check_budget_shape(self.budget, x)
            return self.budget.to(x)
        return part_budget(self.model, x, self.eps_value, self.eps_low, layer=self.cam_layer,
                           cam_method=self.cam_method, mask_mode=self.mask_mode)

    def _run(self, counter, x, y, target, gen):
        threat = LinfBall(self.budget_for(x))
        out = pgd(counter, x, y, threat=threat, loss_fn=ce_loss, steps=self.steps, step_size=self.step_size,
                  random_start=self.random_start, generator=gen)
        return AttackOut(out.x_adv, None)


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


class PixelReweighting:
    """Mixin over a PGD-family method: the per-element budget after burn-in, and the mask model's refreshes."""

    def _part_init(self, eps_low: float, burn_in_epochs: int, refresh_epochs: int, cam_method: str,
                   cam_layer: str | None, mask_mode: str, upsample: str) -> None:
        check_budgets(self.eps, eps_low)  # type: ignore[attr-defined]
        check_positive_int(burn_in_epochs, "burn_in_epochs", minimum=0)
        check_positive_int(refresh_epochs, "refresh_epochs")
        check_choice(cam_method, "CAM method", CAM_METHODS)
        check_choice(mask_mode, "mask_mode", MASK_MODES)
        check_choice(upsample, "upsample mode", UPSAMPLE)
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
        budget = part_budget(self.mask_model, x, self.eps, self.eps_low, layer=layer,  # type: ignore[attr-defined]
                             cam_method=self.cam_method, mask_mode=self.mask_mode, upsample=self.upsample)
        return LinfBall(budget), 1.0

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
                "upsample": self.upsample}


@METHODS.register("part")
class PART(PixelReweighting, PGDAT):
    """PART (Zhang et al. 2024): PGD-AT with Pixel-AG (8/255 on CAM-important pixels, 7/255 elsewhere).

    Step 2/255, 10 steps, after 20 burn-in epochs of PGD-AT; masks refreshed every `refresh_epochs` (s)."""

    name = "part"

    def __init__(self, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10, step_size: float = 2 / 255,
                 burn_in_epochs: int = 20, refresh_epochs: int = 1, cam_method: str = "gradcam",
                 cam_layer: str | None = None, mask_mode: str = "zscore", upsample: str = "torch_bicubic",
                 random_start: bool = True, eps_ramp_epochs: float = 0.0) -> None:
        PGDAT.__init__(self, "linf", eps, steps, step_size, random_start, eps_ramp_epochs)
        self._part_init(eps_low, burn_in_epochs, refresh_epochs, cam_method, cam_layer, mask_mode, upsample)

    def describe(self):
        return {**PGDAT.describe(self), **self.part_describe()}


@METHODS.register("part-t")
class PARTT(PixelReweighting, TRADES):
    """PART-T: TRADES (beta 6) with the Pixel-AG inner maximisation of the KL term after burn-in."""

    name = "part-t"

    def __init__(self, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10, step_size: float = 2 / 255,
                 beta: float = 6.0, burn_in_epochs: int = 20, refresh_epochs: int = 1, cam_method: str = "gradcam",
                 cam_layer: str | None = None, mask_mode: str = "zscore", upsample: str = "torch_bicubic",
                 eps_ramp_epochs: float = 0.0) -> None:
        TRADES.__init__(self, "linf", eps, steps, step_size, beta, eps_ramp_epochs)
        self._part_init(eps_low, burn_in_epochs, refresh_epochs, cam_method, cam_layer, mask_mode, upsample)

    def describe(self):
        return {**TRADES.describe(self), **self.part_describe()}


@METHODS.register("part-m")
class PARTM(PixelReweighting, MART):
    """PART-M: MART (beta 6) with the Pixel-AG inner maximisation after burn-in."""

    name = "part-m"

    def __init__(self, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10, step_size: float = 2 / 255,
                 beta: float = 6.0, burn_in_epochs: int = 20, refresh_epochs: int = 1, cam_method: str = "gradcam",
                 cam_layer: str | None = None, mask_mode: str = "zscore", upsample: str = "torch_bicubic",
                 eps_ramp_epochs: float = 0.0) -> None:
        MART.__init__(self, "linf", eps, steps, step_size, beta, eps_ramp_epochs)
        self._part_init(eps_low, burn_in_epochs, refresh_epochs, cam_method, cam_layer, mask_mode, upsample)

    def describe(self):
        return {**MART.describe(self), **self.part_describe()}


__all__ = ["PART", "PARTT", "PARTM", "PixelAG", "importance_mask", "budget_map", "part_budget", "upsample_maps",
           "DEFAULT_CAM_LAYERS"]
