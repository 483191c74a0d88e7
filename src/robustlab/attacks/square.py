"""Square attack (Andriushchenko et al., ECCV 2020, arXiv:1912.00049): score-based random search, l_inf / l_2.

Uses only the model's outputs (never gradients). Margin loss z_y - max_{j!=y} z_j; a candidate replaces
the current point when the loss decreases; a sample stops once misclassified (baselines.md 2.7).
The square-size schedule follows AutoAttack (no rescaling for 5000 queries). Only the samples not
yet fooled are queried: the working batch is re-gathered at checks (every query for the first 100,
then every 10th), the only host syncs of the loop; the positions of all queries are drawn at the start.
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


def _draws(n_queries: int, k: int, gen: torch.Generator, device) -> list[list[float]]:
    """Every iteration's k uniforms in [0, 1) (square positions, orientations), drawn on the device in one go and
    brought to the host with one sync, instead of k syncs per iteration."""
    return rng.rand((n_queries, k), generator=gen, device=device, dtype=torch.float64).cpu().tolist()


def _pick(u: float, n: int) -> int:
    """A uniform integer in [0, n) from a uniform u in [0, 1)."""
    return min(int(u * n), n - 1)


def _eta_rectangles(x: int, y: int, device, dtype) -> Tensor:
    delta = torch.zeros(x, y, device=device, dtype=dtype)
    x_c, y_c = x // 2 + 1, y // 2 + 1
    c0, c1 = x_c - 1, y_c - 1
    for counter in range(max(x_c, y_c)):
        delta[max(c0, 0):min(c0 + 2 * counter + 1, x), max(0, c1):min(c1 + 2 * counter + 1, y)] += 1.0 / (counter + 1) ** 2
        c0 -= 1
        c1 -= 1
    return delta / delta.pow(2).sum().sqrt()


def _meta_pseudo_gaussian(s: int, device, dtype) -> Tensor:
    """The s x s pseudo-Gaussian square (its transpose is the other orientation)."""
    delta = torch.zeros(s, s, device=device, dtype=dtype)
    delta[: s // 2] = _eta_rectangles(s // 2, s, device, dtype)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s, device, dtype)
    return delta / delta.pow(2).sum().sqrt()


class _Squares:
    """The pseudo-Gaussian squares by size, built once per run (the schedule reuses a handful of sizes)."""

    def __init__(self, device, dtype) -> None:
        self.device, self.dtype = device, dtype
        self.built: dict[int, Tensor] = {}

    def __call__(self, s: int, u: float) -> Tensor:
        """The square of side s, transposed when the uniform u > 0.5 (as the reference's coin)."""
        if s not in self.built:
            self.built[s] = _meta_pseudo_gaussian(s, self.device, self.dtype)
        return self.built[s].t() if u > 0.5 else self.built[s]


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
        """Indices of the samples queried from now on (empty when every sample is fooled; one host sync)."""
        left = (margin_min > 0).nonzero().squeeze(1)
        if left.numel() == 0 or self.compact:
            return left
        return torch.arange(margin_min.shape[0], device=margin_min.device)

    def _checks(self) -> set[int]:
        """The iterations before which fooled samples leave the working batch: every one of the first 100 (most
        samples fall early), then every 10th. A fooled sample stays fooled (a candidate replaces it only with a
        lower margin, or, l_inf, another fooling point), so a later check changes which passes run, not which
        samples are fooled; between checks the loop runs without a host sync."""
        return set(range(min(100, self.n_queries))) | set(range(0, self.n_queries, 10))

    def _linf(self, counter, x, y, eps, gen):
        n, c, h, w = x.shape
        x_best = (x + eps * _rand_sign((n, c, 1, w), gen, x.device, x.dtype)).clamp(0, 1)
        margin_min = margin(counter.logits(x_best), y)
        loss_min = margin_min.clone()
        draws = _draws(self.n_queries, 2, gen, x.device)
        # the working batch: the samples queried (idx) and their state (_w), written back at every check
        idx = torch.arange(n, device=x.device)
        x_w, xb_w, y_w, l_w, m_w = x, x_best.clone(), y, loss_min.clone(), margin_min.clone()
        checks = self._checks()
        for i in range(self.n_queries):
            if i in checks:  # write the working batch back, then gather the samples still robust
                margin_min[idx], loss_min[idx], x_best[idx] = m_w, l_w, xb_w
                idx = self._working(margin_min)
                if idx.numel() == 0:
                    break
                x_w, xb_w, y_w, l_w, m_w = x[idx], x_best[idx], y[idx], loss_min[idx], margin_min[idx]
            p = p_selection(self.p_init, i, self.n_queries, self.rescale)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w))
            vh, vw = _pick(draws[i][0], h - s + 1), _pick(draws[i][1], w - s + 1)
            new = torch.zeros(c, h, w, device=x.device, dtype=x.dtype)
            new[:, vh:vh + s, vw:vw + s] = 2.0 * eps * _rand_sign((c, 1, 1), gen, x.device, x.dtype)
            x_new = torch.min(torch.max(xb_w + new, x_w - eps), x_w + eps).clamp(0, 1)
            m = margin(counter.logits(x_new), y_w)
            improved = (m < l_w) | (m <= 0)
            l_w, m_w = torch.where(improved, m, l_w), torch.where(improved, m, m_w)
            xb_w = torch.where(improved.view(-1, 1, 1, 1), x_new, xb_w)
        else:
            margin_min[idx], loss_min[idx], x_best[idx] = m_w, l_w, xb_w
        return x_best, margin_min <= 0

    def _l2(self, counter, x, y, eps, gen):
        n, c, h, w = x.shape
        dev, dt = x.device, x.dtype

        def normalize(d: Tensor) -> Tensor:
            return d / (d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)

        squares = _Squares(dev, dt)
        delta = torch.zeros_like(x)
        s = max(h // 5, 1)
        sp = (h - s * 5) // 2 if h >= 5 else 0
        vh = sp
        for _ in range(h // s):
            vw = sp
            for _ in range(w // s):
                if vh + s <= h and vw + s <= w:
                    coin = float(rng.rand((), generator=gen, device=dev))
                    delta[:, :, vh:vh + s, vw:vw + s] += (squares(s, coin).view(1, 1, s, s)
                                                          * _rand_sign((n, c, 1, 1), gen, dev, dt))
                vw += s
            vh += s
        x_best = (x + normalize(delta) * eps).clamp(0, 1)
        margin_min = margin(counter.logits(x_best), y)
        loss_min = margin_min.clone()
        draws = _draws(self.n_queries, 5, gen, dev)
        idx = torch.arange(n, device=dev)  # the working batch, as in _linf
        x_w, xb_w, y_w, l_w, m_w = x, x_best.clone(), y, loss_min.clone(), margin_min.clone()
        checks = self._checks()
        for i in range(self.n_queries):
            if i in checks:
                margin_min[idx], loss_min[idx], x_best[idx] = m_w, l_w, xb_w
                idx = self._working(margin_min)
                if idx.numel() == 0:
                    break
                x_w, xb_w, y_w, l_w, m_w = x[idx], x_best[idx], y[idx], loss_min[idx], margin_min[idx]
            delta_curr = xb_w - x_w
            p = p_selection(self.p_init, i, self.n_queries, self.rescale)
            s = max(int(round(math.sqrt(p * h * w))), 3)
            if s % 2 == 0:
                s += 1
            s = min(s, min(h, w))
            vh, vw, vh2, vw2 = (_pick(u, k) for u, k in zip(draws[i], (h - s + 1, w - s + 1) * 2))
            mask1 = torch.zeros_like(x_w)
            mask1[:, :, vh:vh + s, vw:vw + s] = 1.0
            mask2 = torch.zeros_like(x_w)
            mask2[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.0
            norms_window_1 = delta_curr[:, :, vh:vh + s, vw:vw + s].pow(2).sum((-2, -1), keepdim=True).sqrt()
            norms_image = delta_curr.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            mask_image = torch.max(mask1, mask2)
            norms_windows = (delta_curr * mask_image).pow(2).sum((-2, -1), keepdim=True).sqrt()
            # signs drawn for the whole batch, so the stream does not depend on which samples are left
            new = squares(s, draws[i][4]).view(1, 1, s, s) * _rand_sign((n, c, 1, 1), gen, dev, dt)[idx]
            new = new + delta_curr[:, :, vh:vh + s, vw:vw + s] / (1e-12 + norms_window_1)
            new = new / new.pow(2).sum((-2, -1), keepdim=True).sqrt().clamp_min(1e-12)
            new = new * (torch.clamp(eps ** 2 - norms_image ** 2, min=0) / c + norms_windows ** 2).sqrt()
            delta_curr = delta_curr.clone()
            delta_curr[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
            delta_curr[:, :, vh:vh + s, vw:vw + s] = new
            x_new = (x_w + normalize(delta_curr) * eps).clamp(0, 1)
            m = margin(counter.logits(x_new), y_w)
            improved = m < l_w
            l_w, m_w = torch.where(improved, m, l_w), torch.where(improved, m, m_w)
            xb_w = torch.where(improved.view(-1, 1, 1, 1), x_new, xb_w)
        else:
            margin_min[idx], loss_min[idx], x_best[idx] = m_w, l_w, xb_w
        return x_best, margin_min <= 0
