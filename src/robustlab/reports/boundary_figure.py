"""MNG-AC's decision-boundary visualisation: each model's predictions and loss on a 2-D slice of input space
around a test image, spanned by that model's adversarial direction and a random direction (PNG + the grids).

For image x, u = (x_adv - x) / ||x_adv - x||_2 from the model's own adversarial example (the caller runs the attack:
`robustlab boundary-figure` through `robustlab.evaluate`, whose checks it passes), v a seeded Gaussian direction
made orthogonal to u and scaled to unit l_2 norm; the grid is x + a u + b v for a, b in [-span, span], clipped
to [0, 1]. A model whose boundary lies farther from x (a larger region of the true class around the centre)
is more robust along these directions.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab import rng
from robustlab.outputs import atomic_save_figure, atomic_write_text


@torch.no_grad()
def boundary_slices(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, *, span: float, grid: int = 41,
                    seed: int = 0) -> dict[str, Tensor]:
    """Per image: predicted class and CE loss on a grid x grid slice (a along u = x_adv - x, b along v)."""
    model.eval()
    u = (x_adv.to(x) - x).flatten(1)
    # a sample the attack did not move gets a random first direction instead
    g = torch.Generator().manual_seed(seed)
    rnd = rng.randn(u.shape, generator=g).to(x)
    u = torch.where(u.norm(dim=1, keepdim=True) > 1e-12, u, rnd)
    u = u / u.norm(dim=1, keepdim=True)
    v = rng.randn(u.shape, generator=g).to(x)
    v = v - (v * u).sum(1, keepdim=True) * u
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = torch.linspace(-span, span, grid, device=x.device, dtype=x.dtype)
    a, b = torch.meshgrid(t, t, indexing="xy")  # rows: b (v axis), columns: a (u axis)
    preds, losses = [], []
    for i in range(x.shape[0]):
        pts = x[i].flatten()[None] + a.reshape(-1, 1) * u[i] + b.reshape(-1, 1) * v[i]
        pts = pts.clamp(0, 1).view(-1, *x.shape[1:])
        logits = model(pts)
        preds.append(logits.argmax(1).view(grid, grid))
        losses.append(F.cross_entropy(logits, y[i].expand(pts.shape[0]), reduction="none").view(grid, grid))
    return {"pred": torch.stack(preds).cpu(), "loss": torch.stack(losses).cpu(), "axis": t.cpu()}


def boundary_figure(models: dict[str, nn.Module], x: Tensor, y: Tensor, adversarials: dict[str, Tensor],
                    path: str | Path, *, attack: str, span: float, grid: int = 41, seed: int = 0) -> Path:
    """One row per image, one column per model: predicted class regions (true class outlined) with loss contours,
    around x along each model's own adversarial example (`adversarials[name]`; `attack` names what made them).
    Also writes the grids as <path>.json (the numbers behind the picture)."""
    import json

    import numpy as np

    from robustlab.reports.plots import pyplot

    slices = {name: boundary_slices(m, x, y, adversarials[name], span=span, grid=grid, seed=seed)
              for name, m in models.items()}
    plt = pyplot()
    n, k = x.shape[0], len(models)
    fig, axes = plt.subplots(n, k, figsize=(3 * k, 3 * n), squeeze=False)
    ext = [-span, span, -span, span]
    for j, (name, s) in enumerate(slices.items()):
        for i in range(n):
            ax = axes[i, j]
            pred = s["pred"][i].numpy()
            ax.imshow(pred, origin="lower", extent=ext, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
            ax.contour(pred == int(y[i]), levels=[0.5], colors="k", linewidths=1.5, extent=ext, origin="lower")
            ax.contour(np.log1p(s["loss"][i].numpy()), levels=6, colors="w", linewidths=0.5, extent=ext, origin="lower")
            ax.plot([0], [0], "k+", ms=8)
            ax.set_xticks([-span, 0, span])
            ax.set_yticks([-span, 0, span])
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"label {int(y[i])}: random dir.", fontsize=7)
            if i == n - 1:
                ax.set_xlabel("adversarial direction (l2)", fontsize=7)
    fig.suptitle(f"predicted class near each test image; black: true-class boundary\n{attack}", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)
    true_frac = {name: [(s["pred"][i] == int(y[i])).float().mean().item() for i in range(n)] for name, s in slices.items()}
    atomic_write_text(path.with_suffix(".json"), json.dumps({
        "attack": attack, "span": span, "grid": grid, "seed": seed, "labels": y.tolist(),
        "true_class_fraction": true_frac,
        "pred": {name: s["pred"].tolist() for name, s in slices.items()}}, separators=(",", ":")))
    return path


__all__ = ["boundary_slices", "boundary_figure"]
