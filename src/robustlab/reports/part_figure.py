"""The PART seed's illustration: for a few images, the CAM, the importance mask, the budget map, and the
perturbations PGD finds against an AT model and Pixel-AG finds against a PART model, side by side (PNG)."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from robustlab.outputs import atomic_save_figure


def part_maps(part_model: nn.Module, x: Tensor, *, eps: float, eps_low: float, layer: str | None = None,
              cam_method: str = "gradcam", mask_mode: str = "zscore") -> dict[str, Tensor]:
    """The PART model's CAM (upsampled to the image), importance mask and Pixel-AG budget map for x."""
    from robustlab.attacks.cam import class_activation_maps
    from robustlab.attacks.pixel_ag import budget_map, default_cam_layer, importance_mask, upsample_maps

    part_model.eval()
    layer = layer or default_cam_layer(part_model)
    cam = class_activation_maps(part_model, x, layer, cam_method)
    c, h, w = x.shape[1:]
    mask = importance_mask(cam, (c, h, w), mask_mode)
    return {"cam": upsample_maps(cam, (h, w)).clamp(0, 1), "mask": mask, "budget": budget_map(mask, eps, eps_low).to(x)}


def part_figure(x: Tensor, maps: dict[str, Tensor], at_adv: Tensor, part_adv: Tensor, path: str | Path, *, eps: float,
                eps_low: float, cam_method: str = "gradcam") -> Path:
    """One row per image: image | CAM (PART model) | mask | budget map | AT perturbation | PART perturbation, from
    `part_maps` and the adversarial images the caller made (PGD against the AT model, Pixel-AG in the budget map
    against the PART model: `robustlab part-figure` runs both through `robustlab.evaluate`)."""
    from robustlab.reports.plots import pyplot

    up, mask, budget = maps["cam"], maps["mask"], maps["budget"]
    at_adv, part_adv = at_adv.to(x), part_adv.to(x)
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
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path
