"""The PART seed's illustration: for a few images, the CAM, the importance mask, the budget map, and the
perturbations PGD finds against an AT model and Pixel-AG finds against a PART model, side by side (PNG)."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn


def part_figure(part_model: nn.Module, at_model: nn.Module, x: Tensor, y: Tensor, path: str | Path, *, eps: float,
                eps_low: float, step_size: float, steps: int = 20, layer: str | None = None,
                cam_method: str = "gradcam", mask_mode: str = "zscore") -> Path:
    """One row per image: image | CAM (PART model) | mask | budget map | AT perturbation | PART perturbation."""
    from robustlab.attacks import create_attack
    from robustlab.attacks.cam import class_activation_maps
    from robustlab.attacks.pixel_ag import PixelAG, budget_map, default_cam_layer, importance_mask, upsample_maps
    from robustlab.reports.plots import pyplot

    part_model.eval()
    at_model.eval()
    layer = layer or default_cam_layer(part_model)
    cam = class_activation_maps(part_model, x, layer, cam_method)
    c, h, w = x.shape[1:]
    mask = importance_mask(cam, (c, h, w), mask_mode)
    budget = budget_map(mask, eps, eps_low).to(x)
    at_adv = create_attack("pgd", at_model, norm="linf", eps=eps, steps=steps, step_size=step_size)(x, y)
    part_adv = PixelAG(part_model, budget=budget, steps=steps, step_size=step_size)(x, y)
    up = upsample_maps(cam, (h, w)).clamp(0, 1)
    plt = pyplot()
    cols = ["image", f"CAM ({cam_method})", "mask (important)", f"budget ({eps_low:.3g} / {eps:.3g})",
            "AT: PGD perturbation", "PART: Pixel-AG perturbation"]
    n = x.shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(2 * len(cols), 2 * n), squeeze=False)

    def img(t: Tensor):
        t = t.detach().cpu()
        return t.permute(1, 2, 0).numpy() if t.shape[0] == 3 else t[0].numpy()

    for i in range(n):
        panels = [(img(x[i]), "gray", 0, 1), (up[i].cpu().numpy(), "jet", 0, 1),
                  (mask[i, 0].float().cpu().numpy(), "gray", 0, 1), (budget[i, 0].cpu().numpy(), "viridis", 0, eps),
                  (img(at_adv[i] - x[i]).mean(-1) if x.shape[1] == 3 else img(at_adv[i] - x[i]), "RdBu", -eps, eps),
                  (img(part_adv[i] - x[i]).mean(-1) if x.shape[1] == 3 else img(part_adv[i] - x[i]), "RdBu", -eps, eps)]
        for j, (arr, cmap, lo, hi) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(arr, cmap=cmap if not (j == 0 and x.shape[1] == 3) else None, vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
