"""The visual label metric (spec wpgd.md 1.1): D[i, j] = mean minimal l_2 distance from correctly classified images
of class i to the region of class j under a trained standard model, measured with targeted DeepFool (exact for a
linear model), symmetrised and normalised. Lives above `attacks/` because it runs one; the other label metrics are
in `metric.py`."""
from __future__ import annotations

import warnings
from typing import cast

import torch
from torch import Tensor, nn

from robustlab.attacks.deepfool import DeepFool
from robustlab.errors import MetricError
from robustlab.label_metrics.metric import check_metric, normalize_metric


def linear_pair_distances(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """Exact l_2 distance from each x to every pairwise boundary z_i = z_j of a linear model z = W x + b:
    |(w_i - w_j).x + b_i - b_j| / ||w_i - w_j||_2, shape (N, K, K) (the box is ignored)."""
    z = x.flatten(1).double() @ weight.double().T + bias.double()
    dw = weight.double()[:, None, :] - weight.double()[None, :, :]
    norm = dw.norm(dim=2).clamp_min(1e-12)
    return (z[:, :, None] - z[:, None, :]).abs() / norm


def targeted_deepfool(model: nn.Module, x: Tensor, source: Tensor, target: Tensor, steps: int = 50,
                      overshoot: float = 0.02) -> tuple[Tensor, Tensor]:
    """Minimal l_2 perturbation moving x (of class `source`) to `target` (wpgd.md 1.1): the shared DeepFool in its
    targeted mode (linearise z_t - z_s, step (|f| / ||w|| + 1e-4) w / ||w|| as the DeepFool code, overshoot, box
    clip). Returns (||x_adv - x||_2, success)."""
    out = DeepFool(model, norm="l2", steps=steps, overshoot=overshoot, num_classes=2).run(x, source, target=target)
    return (out.x_adv - x).flatten(1).norm(dim=1), cast(Tensor, out.success)


@torch.no_grad()
def visual_metric(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, *, method: str = "deepfool",
                  n_per_class: int = 1000, normalize: str | None = "max") -> tuple[Tensor, dict]:
    """D[i, j] = mean minimal l_2 distance from correctly classified images of class i to the j region
    (targeted DeepFool; `linear_exact` for a model whose only layer is a Linear on the flattened image);
    symmetrised, zero diagonal, normalised. Returns (metric, {"failures": K x K counts, "counts": per class})."""
    if method not in ("deepfool", "linear_exact", "linearized"):
        raise MetricError(f"unknown visual-metric method {method!r}; valid: deepfool, linear_exact, linearized")
    model.eval()
    k = num_classes
    d = torch.zeros(k, k, dtype=torch.float64)
    fails = torch.zeros(k, k, dtype=torch.long)
    counts = []
    pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, x.shape[0], 500)])
    linear = None
    if method == "linear_exact":
        linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if len(linear) != 1:
            raise MetricError("linear_exact needs a model with exactly one Linear layer (z = W x + b)")
    for i in range(k):
        xi = x[(y == i) & (pred == i)][:n_per_class]
        counts.append(int(xi.shape[0]))
        if xi.shape[0] == 0:
            raise MetricError(f"no correctly classified test image of class {i}: the visual metric needs some")
        if linear is not None:
            d[i] = linear_pair_distances(linear[0].weight, linear[0].bias, xi)[:, i, :].mean(0)
            continue
        for j in range(k):
            if j == i:
                continue
            src = torch.full((xi.shape[0],), i, dtype=torch.long, device=x.device)
            tgt = torch.full_like(src, j)
            if method == "linearized":
                with torch.enable_grad():
                    xg = xi.clone().requires_grad_(True)
                    z = model(xg)
                    (g,) = torch.autograd.grad((z[:, j] - z[:, i]).sum(), xg)
                dist = (z[:, i] - z[:, j]).detach().abs() / g.flatten(1).norm(dim=1).clamp_min(1e-12)
                ok = torch.ones_like(dist, dtype=torch.bool)
            else:
                with torch.enable_grad():
                    dist, ok = targeted_deepfool(model, xi, src, tgt)
            fails[i, j] = int((~ok).sum())
            d[i, j] = dist[ok].double().mean() if ok.any() else float("nan")
    if torch.isnan(d).any():
        warnings.warn("targeted DeepFool failed for every image of some class pair; those pairs get the largest "
                      "distance", RuntimeWarning, stacklevel=2)
        d = torch.where(torch.isnan(d), d[~torch.isnan(d)].max(), d)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    return normalize_metric(check_metric(d, name="visual metric"), normalize), {"failures": fails.tolist(),
                                                                                  "counts": counts}


__all__ = ["linear_pair_distances", "targeted_deepfool", "visual_metric"]
