"""Square attack (Andriushchenko et al., ECCV 2020, arXiv:1912.00049): score-based random search, l_inf / l_2.

Uses only the model's outputs (never gradients). Margin loss z_y - max_{j!=y} z_j; a candidate replaces
the current point when the loss decreases; a sample stops once misclassified (baselines.md 2.7).
The square-size schedule follows AutoAttack (no rescaling for 5000 queries). Only the samples not
yet fooled are queried, which needs one host sync per iteration (the standard trade for a
black-box attack whose cost is dominated by queries on still-robust points).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack
from robustlab.errors import InputError
from robustlab.losses.classification import margin
from robustlab.registry import ATTACKS
from robustlab.threat import make_threat
from robustlab.types import AttackOut
from robustlab.validation import check_positive, check_positive_int


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = False) -> float:
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _rand_sign(shape, gen, device, dtype) -> Tensor:
    return rng.randint(0, 2, shape, generator=gen, device=device).to(dtype) * 2 - 1


def _randint(low: int, high: int, gen: torch.Generator, device) -> int:
    return int(rng.randint(low, high, (1,), generator=gen, device=device).item())


def _eta_rectangles(x: int, y: int, device, dtype) -> Tensor:
    delta = torch.zeros(x, y, device=device, dtype=dtype)
    x_c, y_c = x // 2 + 1, y // 2 + 1
    c0, c1 = x_c - 1, y_c - 1
    for counter in range(max(x_c, y_c)):
        delta[max(c0, 0):min(c0 + 2 * counter + 1, x), max(0, c1):min(c1 + 2 * counter + 1, y)] += 1.0 / (counter + 1) ** 2
        c0 -= 1
        c1 -= 1
    return delta / delta.pow(2).sum().sqrt()


def _meta_pseudo_gaussian(s: int, gen, device, dtype) -> Tensor:
    delta = torch.zeros(s, s, device=device, dtype=dtype)
    delta[: s // 2] = _eta_rectangles(s // 2, s, device, dtype)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s, device, dtype)
    delta = delta / delta.pow(2).sum().sqrt()
    if rng.rand((), generator=gen, device=device).item() > 0.5:
        delta = delta.t()
    return delta


@ATTACKS.register("square")
class Square(Attack):
    """Square attack, l_inf or l_2; n_queries=5000, p_init=0.8 as in AutoAttack."""

    name = "square"

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255, n_queries: int = 5000,
                 p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = False, compact: bool = True,
                 seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        if str(norm).lower() not in ("linf", "l2", "inf"):
            raise InputError(f"Square supports norms linf and l2, got {norm!r}")
        check_positive_int(n_queries, "n_queries")
        check_positive_int(restarts, "restarts")
        check_positive(p_init, "p_init")
        self.threat = make_threat(norm, eps)
        self.n_queries, self.p_init, self.restarts, self.rescale = n_queries, p_init, restarts, rescale_schedule
        # query only the samples not yet fooled (False: every sample, every iteration; the same fooled set, since
        # the random draws of an iteration do not depend on which samples are still in the batch)
        self.compact = bool(compact)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_queries": self.n_queries, "p_init": self.p_init, "compact": self.compact}

    def _run(self, counter, x, y, target, gen):
        with torch.no_grad():
            robust = counter.logits(x).argmax(1) == y
            x_adv = x.clone()
            for _ in range(self.restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                eps = float(self.threat.eps_per_sample(x).max())
                run = self._linf if self.threat.norm == "linf" else self._l2
                adv, fooled = run(counter, x[idx], y[idx], eps, gen)
                x_adv[idx] = torch.where(fooled.view(-1, 1, 1, 1), adv, x_adv[idx])
                robust[idx] = ~fooled
        return AttackOut(x_adv, ~robust)

    def _working(self, margin_min: Tensor) -> Tensor:
        """Indices of the samples queried this iteration (empty when every sample is fooled)."""
        left = margin_min > 0
        if not bool(left.any()):
            return left.nonzero().squeeze(1)
        return left.nonzero().squeeze(1) if self.compact else torch.arange(left.shape[0], device=left.device)

    def _linf(self, counter, x, y, eps, gen):
        n, c, h, w = x.shape
        x_best = (x + eps * _rand_sign((n, c, 1, w), gen, x.device, x.dtype)).clamp(0, 1)
        margin_min = margin(counter.logits(x_best), y)
        loss_min = margin_min.clone()
        for i in range(self.n_queries):
            idx = self._working(margin_min)
            if idx.numel() == 0:
                break
            x_curr, x_best_curr, y_curr = x[idx], x_best[idx], y[idx]
            p = p_selection(self.p_init, i, self.n_queries, self.rescale)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w))
            vh, vw = _randint(0, h - s + 1, gen, x.device), _randint(0, w - s + 1, gen, x.device)
            new = torch.zeros(c, h, w, device=x.device, dtype=x.dtype)
            new[:, vh:vh + s, vw:vw + s] = 2.0 * eps * _rand_sign((c, 1, 1), gen, x.device, x.dtype)
            x_new = torch.min(torch.max(x_best_curr + new, x_curr - eps), x_curr + eps).clamp(0, 1)
            m = margin(counter.logits(x_new), y_curr)
            improved = (m < loss_min[idx]) | (m <= 0)
            loss_min[idx] = torch.where(improved, m, loss_min[idx])
            margin_min[idx] = torch.where(improved, m, margin_min[idx])
            x_best[idx] = torch.where(improved.view(-1, 1, 1, 1), x_new, x_best_curr)
        return x_best, margin_min <= 0

    def _l2(self, counter, x, y, eps, gen):
        n, c, h, w = x.shape
        dev, dt = x.device, x.dtype

        def normalize(d: Tensor) -> Tensor:
            return d / (d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)

        delta = torch.zeros_like(x)
        s = max(h // 5, 1)
        sp = (h - s * 5) // 2 if h >= 5 else 0
        vh = sp
        for _ in range(h // s):
            vw = sp
            for _ in range(w // s):
                if vh + s <= h and vw + s <= w:
                    delta[:, :, vh:vh + s, vw:vw + s] += (_meta_pseudo_gaussian(s, gen, dev, dt).view(1, 1, s, s)
                                                          * _rand_sign((n, c, 1, 1), gen, dev, dt))
                vw += s
            vh += s
        x_best = (x + normalize(delta) * eps).clamp(0, 1)
        margin_min = margin(counter.logits(x_best), y)
        loss_min = margin_min.clone()
        for i in range(self.n_queries):
            idx = self._working(margin_min)
            if idx.numel() == 0:
                break
            x_curr, x_best_curr, y_curr = x[idx], x_best[idx], y[idx]
            delta_curr = x_best_curr - x_curr
            p = p_selection(self.p_init, i, self.n_queries, self.rescale)
            s = max(int(round(math.sqrt(p * h * w))), 3)
            if s % 2 == 0:
                s += 1
            s = min(s, min(h, w))
            vh, vw = _randint(0, h - s + 1, gen, dev), _randint(0, w - s + 1, gen, dev)
            vh2, vw2 = _randint(0, h - s + 1, gen, dev), _randint(0, w - s + 1, gen, dev)
            mask1 = torch.zeros_like(x_curr)
            mask1[:, :, vh:vh + s, vw:vw + s] = 1.0
            mask2 = torch.zeros_like(x_curr)
            mask2[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.0
            norms_window_1 = delta_curr[:, :, vh:vh + s, vw:vw + s].pow(2).sum((-2, -1), keepdim=True).sqrt()
            norms_image = delta_curr.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            mask_image = torch.max(mask1, mask2)
            norms_windows = (delta_curr * mask_image).pow(2).sum((-2, -1), keepdim=True).sqrt()
            # signs drawn for the whole batch, so the stream does not depend on which samples are left
            new = (_meta_pseudo_gaussian(s, gen, dev, dt).view(1, 1, s, s) * _rand_sign((n, c, 1, 1), gen, dev, dt)[idx])
            new = new + delta_curr[:, :, vh:vh + s, vw:vw + s] / (1e-12 + norms_window_1)
            new = new / new.pow(2).sum((-2, -1), keepdim=True).sqrt().clamp_min(1e-12)
            new = new * (torch.clamp(eps ** 2 - norms_image ** 2, min=0) / c + norms_windows ** 2).sqrt()
            delta_curr = delta_curr.clone()
            delta_curr[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
            delta_curr[:, :, vh:vh + s, vw:vw + s] = new
            x_new = (x_curr + normalize(delta_curr) * eps).clamp(0, 1)
            m = margin(counter.logits(x_new), y_curr)
            improved = m < loss_min[idx]
            loss_min[idx] = torch.where(improved, m, loss_min[idx])
            margin_min[idx] = torch.where(improved, m, margin_min[idx])
            x_best[idx] = torch.where(improved.view(-1, 1, 1, 1), x_new, x_best_curr)
        return x_best, margin_min <= 0
