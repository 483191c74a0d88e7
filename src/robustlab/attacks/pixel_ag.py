"""Pixel-AG (PART's inner attack, Zhang et al., ICML 2024; spec part.md 3-4) and the CAM budget map it attacks in.

A class activation map of the model for each image's predicted class, bicubic-upsampled and squared, marks the
important pixels (z-score > 1 per image, or the official code's colormap route); the budget map is eps there and
eps_low elsewhere, and Pixel-AG is l_inf PGD in that per-element box. PART's methods (robustlab.methods.part) train
against it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack
from robustlab.attacks.cam import CAM_METHODS, class_activation_maps
from robustlab.attacks.pgd import pgd
from robustlab.errors import InputError, InputTypeError
from robustlab.losses import ce_loss
from robustlab.registry import ATTACKS
from robustlab.threat import LinfBall
from robustlab.types import AttackOut
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
    raise InputError(f"no default CAM layer for model {name or type(model).__name__!r}; set cam_layer to a module "
                     f"name (defaults exist for {', '.join(sorted(DEFAULT_CAM_LAYERS))})")


def check_budgets(eps: float, eps_low: float) -> None:
    check_eps(eps)
    check_eps(eps_low, "eps_low")
    if eps_low > eps:
        raise InputError(f"eps_low ({eps_low}) must not exceed eps ({eps}): unimportant pixels get the smaller budget")


def upsample_maps(cam: Tensor, size: tuple[int, int], mode: str = "torch_bicubic") -> Tensor:
    """(B, h, w) -> (B, H, W) bicubic. torch (a = -0.75) by default; `pil_bicubic` is the official code's
    PIL float-image resize (a = -0.5). Values may leave [0, 1] slightly and are kept."""
    check_choice(mode, "upsample mode", UPSAMPLE)
    if mode == "torch_bicubic":
        return F.interpolate(cam[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]
    import numpy as np
    from PIL import Image

    out = [np.asarray(Image.fromarray(m.cpu().numpy().astype(np.float32), mode="F").resize(
        (size[1], size[0]), Image.Resampling.BICUBIC)) for m in cam]
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
        raise InputError(f"mask_mode 'official_jet' builds an RGB colormap and needs 3-channel images, got {c}")
    rgb = _jet(v)
    flat = rgb.flatten(1)
    mu, sd = flat.mean(1), flat.std(1, unbiased=False)
    z = (rgb - mu.view(-1, 1, 1, 1)) / sd.clamp_min(1e-12).view(-1, 1, 1, 1)
    return (z > 1) & (sd > 0).view(-1, 1, 1, 1)


def budget_map(mask: Tensor, eps: float, eps_low: float) -> Tensor:
    """E = eps on important elements, eps_low elsewhere (float, the mask's shape)."""
    check_budgets(eps, eps_low)
    if mask.dtype != torch.bool:
        raise InputTypeError(f"the mask must be a boolean tensor, got {mask.dtype}")
    return torch.where(mask, torch.tensor(float(eps)), torch.tensor(float(eps_low))).to(torch.float32)


def part_budget(model: nn.Module, x: Tensor, eps: float, eps_low: float, *, layer: str | None = None,
                cam_method: str = "gradcam", mask_mode: str = "zscore", upsample: str = "torch_bicubic") -> Tensor:
    """The whole pipeline: CAM of the predicted class -> mask -> budget map of x's shape."""
    cam = class_activation_maps(model, x, layer or default_cam_layer(model), cam_method)
    c, h, w = x.shape[1:]
    return budget_map(importance_mask(cam, (c, h, w), mask_mode, upsample), eps, eps_low).to(x)


def check_budget_shape(budget: Tensor, x: Tensor) -> None:
    if budget.shape != x.shape and budget.shape != x.shape[1:]:
        raise InputError(f"the budget map has shape {tuple(budget.shape)}; it must match the images "
                         f"{tuple(x.shape)} (or one image, {tuple(x.shape[1:])})")


PIXEL_AG_STARTS = ("uniform_eps", "budget")


def uniform_eps_start(eps: float) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """Pixel-AG's random start in the official code (part.md 4.1, 12.6): x + U(-eps, eps) element-wise with the
    *scalar* eps, not the budget map, and no clipping before the first gradient (the first step projects)."""

    def start(x: Tensor, generator: torch.Generator | None) -> Tensor:
        u = rng.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2 * u - 1) * eps
    return start


@ATTACKS.register("pixel-ag")
class PixelAG(Attack):
    """Pixel-AG (PART's inner attack): l_inf PGD in a per-element box |delta| <= E (CAM budget map or given).

    E is a fixed `budget` map (one image's shape or the batch's) or, by default, PART's CAM budget map of the
    attacked model (eps on important elements, eps_low elsewhere). start="uniform_eps" (default, the spec and the
    official code) starts at x + U(-eps, eps) with the scalar eps, unclipped; start="budget" starts uniformly in
    the per-element box, clipped to [0, 1], as robustlab's PGD does (with eps_low = eps it is then PGD exactly)."""

    name = "pixel-ag"

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, eps_low: float = 7 / 255, steps: int = 10,
                 step_size: float = 2 / 255, random_start: bool = True, start: str = "uniform_eps",
                 budget: Tensor | None = None, cam_layer: str | None = None, cam_method: str = "gradcam",
                 mask_mode: str = "zscore", seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        check_budgets(eps, eps_low)
        check_positive_int(steps, "steps")
        check_positive(step_size, "step_size", allow_zero=True)
        check_choice(start, "Pixel-AG start", PIXEL_AG_STARTS)
        check_choice(cam_method, "CAM method", CAM_METHODS)
        check_choice(mask_mode, "mask_mode", MASK_MODES)
        if budget is not None:
            check_eps(budget, "budget")
        self.eps_value, self.eps_low, self.steps, self.step_size = float(eps), float(eps_low), steps, float(step_size)
        self.random_start, self.start, self.budget = random_start, start, budget
        self.cam_layer, self.cam_method, self.mask_mode = cam_layer, cam_method, mask_mode
        self.threat = LinfBall(float(eps))  # the envelope: every E <= eps

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": "linf", "eps": self.eps_value, "eps_low": self.eps_low,
                "steps": self.steps, "step_size": self.step_size, "start": self.start}

    def budget_for(self, x: Tensor) -> Tensor:
        if self.budget is not None:
            check_budget_shape(self.budget, x)
            return self.budget.to(x)
        return part_budget(self.model, x, self.eps_value, self.eps_low, layer=self.cam_layer,
                           cam_method=self.cam_method, mask_mode=self.mask_mode)

    def _run(self, counter, x, y, target, gen):
        threat = LinfBall(self.budget_for(x))
        init = uniform_eps_start(self.eps_value) if self.start == "uniform_eps" else None
        out = pgd(counter, x, y, threat=threat, loss_fn=ce_loss, steps=self.steps, step_size=self.step_size,
                  random_start=self.random_start, generator=gen, init=init)
        return AttackOut(out.x_adv, None, threat=threat)


__all__ = ["PixelAG", "importance_mask", "budget_map", "part_budget", "upsample_maps", "default_cam_layer",
           "check_budgets", "uniform_eps_start", "DEFAULT_CAM_LAYERS", "MASK_MODES", "UPSAMPLE", "PIXEL_AG_STARTS"]
