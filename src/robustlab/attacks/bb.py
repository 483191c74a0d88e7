"""Brendel-Bethge attack (Brendel, Rauber, Kümmerer, Ustyuzhaninov and Bethge, "Accurate, reliable and fast robustness
evaluation", NeurIPS 2019, arXiv:1907.01003), l_inf and l_2: MNG-AC's evaluation runs foolbox's version of it in
its l_inf and l_2 groups (mng_ac.md 6.1), so its settings are foolbox 3's defaults.

A minimal-perturbation attack that walks along the decision boundary towards the clean image. It starts from an
adversarial point, binary-searches towards x to the boundary, then each step linearises the boundary at the iterate
(normal b: the gradient of the logit margin z_y - max_{j != y} z_j, averaged over steps with momentum; offset c: a
step that overshoots the boundary slightly) and solves, per image,

    min_delta ||x_k + delta - x||_p   s.t.   b.delta = c,   0 <= x_k + delta <= 1,   ||delta||_2 <= r

(r: a trust region, lr * d, halved lr_num_decay times over the run). Where the linearised boundary cannot be reached
inside the box and the trust region, the step goes as far towards it as they allow. The smallest adversarial
iterate seen is the result. The sub-problems of the whole batch are solved together (foolbox solves them image by
image in numba), the rows that are done leaving the batch.

Differences from foolbox's implementation (docs/deviations.md): the trust region is lr * d per image (foolbox's is
lr * d * batch size, so its steps grow with the batch); where the boundary is out of reach, the step goes towards it
(foolbox's steps along -b whatever the side); the start is the closest image of the batch the model classifies as
another class (foolbox's DatasetAttack over a pool of test images, MNG-AC's protocol), blended uniform noise where
there is none; so an image's result depends on the images that share its batch (an evaluation's batches are fixed
by its batch size, and shards and resumes keep them).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack, attack_mode, make_generator, restored_buffers, restrict_to_budget
from robustlab.errors import InputError
from robustlab.registry import ATTACKS
from robustlab.threat.lp import per_sample_norm
from robustlab.validation import check_choice, check_positive, check_positive_int

NORMS = ("linf", "l2")
INITS = ("batch", "noise")
NOISE_DRAWS = 100  # uniform-noise draws tried per image for a start (foolbox's blended-noise init tries 1,000)
BLEND_STEPS = 100  # blend factors tried between x and its noise start (the smallest adversarial one is the start)
PLANE_ITERATIONS = 100  # cap on the Newton/bisection steps of one plane projection (a handful are typical)
EPS_BISECTIONS = 21  # l_inf sub-problem: at most this many bisection steps on the radius (foolbox's cap)
ACTIVE_SET_ROUNDS = 20  # l_2 sub-problem: rounds of fixing the coordinates that hit the box (foolbox: 20)
TINY = 1e-12


def _rows(t: Tensor) -> Tensor:
    return t.unsqueeze(1)


def plane_min_l2(b: Tensor, c: Tensor, lo: Tensor, hi: Tensor, lam: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the delta of least l_2 norm with b.delta = c (to a relative 1e-4, foolbox's tolerance) and
    lo <= delta <= hi (lo <= hi), whether c can be reached in the box at all, and the multiplier found (a warm start
    for a nearby problem). The minimiser is delta(lam) = clip(lam * b / 2, lo, hi) for the lam with
    b.delta(lam) = c; b.delta(lam) is non-decreasing and piecewise linear in lam, so Newton steps on the
    coordinates inside their box find it, kept inside a shrinking bracket (bisection where a step would leave it)."""
    reach_lo = (b * torch.where(b > 0, lo, hi)).sum(1)
    reach_hi = (b * torch.where(b > 0, hi, lo)).sum(1)
    slack = 1e-9 * (reach_lo.abs() + reach_hi.abs())
    reachable = (c >= reach_lo - slack) & (c <= reach_hi + slack)
    if lam is None:
        lam = 2 * c / (b.pow(2).sum(1) + TINY)  # the answer without the box
    lam_, lam = lam, lam.clone()
    delta = torch.empty_like(b)
    rows = torch.arange(b.shape[0], device=b.device)  # the rows still iterating; the others leave the batch
    b_, lo_, hi_, c_ = b, lo, hi, c
    below = torch.full_like(c, -math.inf)  # the bracket: b.delta < c below it, > c above it
    above = torch.full_like(c, math.inf)
    g_below, g_above = torch.zeros_like(c), torch.zeros_like(c)  # b.delta at the bracket's ends
    for _ in range(PLANE_ITERATIONS):
        step = _rows(lam_) * b_ / 2
        d = torch.clamp(step, lo_, hi_)
        g = (b_ * d).sum(1)
        settled = ~reachable[rows] | ((g - c_).abs() <= 1e-4 * c_.abs() + TINY)
        delta[rows], lam[rows] = d, lam_
        keep = (~settled).nonzero().squeeze(1)  # one sync per iteration
        if keep.numel() == 0:
            break
        if keep.numel() < rows.numel():
            rows, b_, lo_, hi_, c_, lam_ = rows[keep], b_[keep], lo_[keep], hi_[keep], c_[keep], lam_[keep]
            step, d, g = step[keep], d[keep], g[keep]
            below, above, g_below, g_above = below[keep], above[keep], g_below[keep], g_above[keep]
        low = g < c_
        below, g_below = torch.where(low, lam_, below), torch.where(low, g, g_below)
        above, g_above = torch.where(low, above, lam_), torch.where(low, g_above, g)
        slope = (torch.where(d == step, b_, 0) * b_).sum(1) / 2  # over the coordinates inside their box
        newton = lam_ + (c_ - g) / slope.clamp_min(TINY)
        # a flat stretch (no coordinate inside its box) without a bracket yet: move out geometrically
        out = lam_ + torch.where(low, 1.0, -1.0) * (lam_.abs() + 1)
        guess = torch.where(slope > 0, newton, out)
        width = above - below
        bounded = torch.isfinite(width)
        # inside a bracket, a Newton step that would leave its inner part is replaced by the secant through its
        # ends (g is monotone and piecewise linear: the secant lands near the root), kept off the ends
        secant = below + (c_ - g_below) / (g_above - g_below).clamp_min(TINY) * width
        secant = torch.minimum(torch.maximum(secant, below + 0.01 * width), above - 0.01 * width)
        off = (guess <= below + 0.01 * width) | (guess >= above - 0.01 * width)
        guess = torch.where(bounded & off, secant, guess)
        lam_ = torch.where(~bounded & ((guess <= below) | (guess >= above)), out, guess)
    return delta, reachable, lam


def toward_plane(b: Tensor, c: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Per row, the step of l_2 norm <= r inside lo <= delta <= hi (lo <= 0 <= hi) that moves b.delta furthest
    towards c: delta(t) = clip(sign(c) * b * t, lo, hi) with the t where its norm reaches r (the corner where it
    never does). ||delta(t)||^2 is piecewise quadratic in t between the sorted saturation points."""
    sb = torch.where(_rows(c) >= 0, b, -b)
    mag = torch.where(sb > 0, hi, -lo)  # how far each coordinate can move along sign(c) * b
    abs_b = sb.abs()
    t_sat = torch.where(abs_b > 0, mag / abs_b.clamp_min(TINY), torch.full_like(mag, 1e150))
    t_sorted, order = t_sat.sort(1)
    m2 = torch.where(abs_b > 0, mag, torch.zeros_like(mag)).pow(2).gather(1, order)
    b2 = abs_b.pow(2).gather(1, order)
    saturated = m2.cumsum(1) - m2  # sum of m^2 over the coordinates saturated before each point
    free = b2.flip(1).cumsum(1).flip(1)  # sum of b^2 over the coordinates still moving at each point
    norm2 = saturated + t_sorted.pow(2) * free
    r2 = _rows(r.pow(2))
    k = (norm2 <= r2).sum(1, keepdim=True)  # the first point beyond the trust region
    corner = k.squeeze(1) == t_sorted.shape[1]
    kk = k.clamp(max=t_sorted.shape[1] - 1)
    t = ((r2 - saturated.gather(1, kk)) / free.gather(1, kk).clamp_min(TINY)).clamp_min(0).sqrt().squeeze(1)
    t = torch.where(corner, torch.full_like(t, 1e150), t)
    return torch.minimum(torch.maximum(_rows(t) * sb, lo), hi)


def l2_step(dx: Tensor, b: Tensor, c: Tensor, r: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """l_2 sub-problem: min ||dx - delta||_2 s.t. b.delta = c, lo <= delta <= hi, ||delta||_2 <= r, by an active set
    (the paper's l_2 solver): on the free coordinates the closest point of the plane to dx, shortened along the
    plane to the trust region (or only the plane step where that alone exceeds it); coordinates that leave the box
    are fixed at their bound and the rest solved again with what is left of c and r."""
    n = b.shape[0]
    free = torch.ones_like(b, dtype=torch.bool)
    running = torch.ones(n, dtype=torch.bool, device=b.device)
    delta = torch.zeros_like(b)
    ck, rk = c.clone(), r.clone()
    fixed_c, fixed_norm2 = torch.zeros_like(c), torch.zeros_like(c)
    for _ in range(ACTIVE_SET_ROUNDS):
        bf = torch.where(free, b, torch.zeros_like(b))
        bnorm2 = bf.pow(2).sum(1) + 1e-8
        along = (bf * dx).sum(1) / bnorm2
        plane = bf * _rows(ck / bnorm2)  # the shortest step onto the plane
        descent = torch.where(free, dx - bf * _rows(along), torch.zeros_like(dx))
        plane2 = plane.pow(2).sum(1)
        full = descent + plane
        shrink = (rk.pow(2) - plane2).clamp_min(0).sqrt() / (descent.pow(2).sum(1).sqrt() + 1e-8)
        cand = torch.where(_rows(plane2 > rk.pow(2)), plane,
                           torch.where(_rows(full.pow(2).sum(1) > rk.pow(2)), _rows(shrink) * descent + plane, full))
        update = free & _rows(running)
        delta = torch.where(update, cand, delta)
        low, high = update & (delta <= lo), update & (delta >= hi)
        delta = torch.where(low, lo, torch.where(high, hi, delta))
        hit = low | high
        fixed_norm2 = fixed_norm2 + torch.where(hit, delta.pow(2), torch.zeros_like(delta)).sum(1)
        fixed_c = fixed_c + torch.where(hit, b * delta, torch.zeros_like(delta)).sum(1)
        free &= ~hit
        running &= hit.any(1) & free.any(1)
        if not bool(running.any()):  # one sync per round, at most ACTIVE_SET_ROUNDS per step
            break
        rk = (r.pow(2) - fixed_norm2).clamp_min(0).sqrt()
        ck = c - fixed_c
    return delta


def linf_step(x0: Tensor, xk: Tensor, b: Tensor, c: Tensor, r: Tensor, box_step: Tensor, box_lam: Tensor) -> Tensor:
    """l_inf sub-problem (the paper's l_inf solver): the smallest radius eps around x0 in which the plane
    b.delta = c is reachable by a step of l_2 norm <= r, by bisection over eps to a width of 1e-6 (foolbox's); the
    step is the least-l_2 one inside that radius. box_step, box_lam: the least-l_2 step in the plain box (eps = 1,
    the fallback) and its multiplier. The bisection starts from [d - r, d + r], d = ||x_k - x0||_inf: no step
    within the trust region gets closer than d - r, and at d + r the box holds the whole trust region."""
    dist = (xk - x0).abs().amax(1)
    lo_eps = (dist - r).clamp(0, 1)
    hi_eps = (dist + r).clamp(0, 1)
    best, lam = box_step, box_lam
    for _ in range(EPS_BISECTIONS):
        if bool((hi_eps - lo_eps <= 1e-6).all()):  # one sync per bisection step
            break
        eps = _rows((lo_eps + hi_eps) / 2)
        lo = (x0 - eps).clamp(0, 1) - xk
        hi = (x0 + eps).clamp(0, 1) - xk
        step, reachable, found = plane_min_l2(b, c, torch.minimum(lo, hi), torch.maximum(lo, hi), lam)
        ok = reachable & (step.pow(2).sum(1) <= r.pow(2))
        best = torch.where(_rows(ok), step, best)
        lam = torch.where(ok, found, lam)  # warm start from the last feasible radius (as foolbox)
        hi_eps = torch.where(ok, eps.squeeze(1), hi_eps)
        lo_eps = torch.where(ok, lo_eps, eps.squeeze(1))
    return best


@ATTACKS.register("brendel-bethge")
class BrendelBethge(Attack):
    """Brendel-Bethge minimal-perturbation attack, l_inf or l_2. Defaults are foolbox 3's: 1,000 steps, trust
    region lr 1e-3 (times the image size) halved 20 times, momentum 0.8 on the boundary normal, overshoot 1.1, 10
    binary-search steps to the boundary. init="batch": the start is the closest image of the batch (in the
    attack's norm) the model classifies as another class, blended uniform noise where there is none; "noise": blended
    uniform noise for every image. With eps, a point beyond the budget is clipped into the ball and counts if it
    still fools the model (foolbox's judging of minimisation attacks)."""

    name = "brendel-bethge"
    minimal = True

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float | None = None, steps: int = 1000,
                 lr: float = 1e-3, lr_decay: float = 0.5, lr_num_decay: int = 20, momentum: float = 0.8,
                 overshoot: float = 1.1, binary_search_steps: int = 10, init: str = "batch", seed: int | None = 0,
                 bn_mode: str = "eval", precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        check_choice(norm, "norm", NORMS)
        check_choice(init, "init", INITS)
        check_positive_int(steps, "steps")
        check_positive_int(lr_num_decay, "lr_num_decay")
        check_positive_int(binary_search_steps, "binary_search_steps")
        check_positive(lr, "lr")
        check_positive(lr_decay, "lr_decay")
        check_positive(momentum, "momentum", allow_zero=True)
        check_positive(overshoot, "overshoot")
        if eps is not None:
            check_positive(eps, "eps", allow_zero=True)
        if lr_decay > 1:
            raise InputError(f"lr_decay must be a factor in (0, 1], got {lr_decay!r}")
        if momentum >= 1:
            raise InputError(f"momentum must be a weight in [0, 1), got {momentum!r}")
        if not 1 <= overshoot < 2:
            raise InputError(f"overshoot must be a factor in [1, 2), got {overshoot!r}")
        self._norm, self.eps_value, self.steps, self.lr = norm, eps, steps, lr
        self.lr_decay, self.lr_num_decay, self.momentum, self.overshoot = lr_decay, lr_num_decay, momentum, overshoot
        self.binary_search_steps, self.init = binary_search_steps, init

    @property
    def norm(self) -> str:
        return self._norm

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": self._norm, "eps": self.eps_value,
                "steps": self.steps, "lr": self.lr, "init": self.init}

    # the start -----------------------------------------------------------------------------------
    def _fooled(self, counter, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return counter.logits(x).argmax(1) != y

    def _noise_start(self, counter, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Per image, uniform noise the model misclassifies (up to NOISE_DRAWS draws), then the smallest blend
        (1 - a) x + a noise of BLEND_STEPS that still fools it (foolbox's blended uniform noise)."""
        n = x.shape[0]
        noise = torch.zeros_like(x)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(NOISE_DRAWS):
            draw = rng.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            idx = (~found).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            hit = self._fooled(counter, draw[idx], y[idx])
            noise[idx[hit]] = draw[idx[hit]]
            found[idx[hit]] = True
        start = noise.clone()
        settled = ~found
        for k in range(1, BLEND_STEPS + 1):
            idx = (~settled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            a = k / BLEND_STEPS
            cand = (1 - a) * x[idx] + a * noise[idx]
            hit = self._fooled(counter, cand, y[idx])
            start[idx[hit]] = cand[hit]
            settled[idx[hit]] = True
        return start, found

    def starting_points(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The adversarial points `run` starts its walk from, and per image whether one was found (to give another
        implementation the same starts: foolbox's `starting_points`)."""
        y, _ = self.prepare(x, y, None)
        keep = restored_buffers(self.model) if self.bn_mode == "train" else contextlib.nullcontext()
        with keep, attack_mode(self.model, self.bn_mode):
            counter = self.make_counter(y)
            with torch.no_grad():
                pred = counter.logits(x).argmax(1)
            return self._start(counter, x.detach(), y, pred, make_generator(x.device, self.seed))

    def _start(self, counter, x: Tensor, y: Tensor, pred: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """An adversarial start per image and whether one was found."""
        start = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.init == "batch" and x.shape[0] > 1:
            flat = x.flatten(1)
            dist = torch.cdist(flat, flat, p=float("inf") if self._norm == "linf" else 2.0)
            dist = dist.masked_fill(pred[None, :] == y[:, None], float("inf"))  # image j must fool image i's label
            nearest = dist.min(1)
            found = torch.isfinite(nearest.values)
            start = torch.where(found.view(-1, *([1] * (x.dim() - 1))), x[nearest.indices], start)
        missing = (~found).nonzero().squeeze(1)
        if missing.numel():
            noise, hit = self._noise_start(counter, x[missing], y[missing], gen)
            start[missing[hit]] = noise[hit]
            found[missing[hit]] = True
        return start, found

    def _between(self, x: Tensor, x1: Tensor, a: Tensor) -> Tensor:
        """The point a of the way from x to x1 along the norm's path (l_2: the segment; l_inf: x1 - x clipped
        to a times the box's width)."""
        a = a.view(-1, *([1] * (x.dim() - 1)))
        if self._norm == "l2":
            return a * x1 + (1 - a) * x
        return x + torch.maximum(torch.minimum(x1 - x, a), -a)

    # the walk along the boundary ---------------------------------------------------------------------
    def _solve(self, x0: Tensor, xk: Tensor, b: Tensor, c: Tensor, r: Tensor) -> Tensor:
        lo, hi = (-xk).clamp(max=0), (1 - xk).clamp(min=0)
        step, reachable, lam = plane_min_l2(b, c, lo, hi)
        solvable = reachable & (step.pow(2).sum(1) <= r.pow(2))
        s, u = solvable.nonzero().squeeze(1), (~solvable).nonzero().squeeze(1)  # one sync per step
        if s.numel():
            step[s] = (l2_step(x0[s] - xk[s], b[s], c[s], r[s], lo[s], hi[s]) if self._norm == "l2" else
                       linf_step(x0[s], xk[s], b[s], c[s], r[s], step[s], lam[s]))
        if u.numel():  # the plane is out of reach: as far towards it as the box and the trust region allow
            step[u] = toward_plane(b[u], c[u], r[u], lo[u], hi[u])
        return step

    def _margin_and_grad(self, counter, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """z_y - max_{j != y} z_j (negative: fooled) and its input gradient."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = counter.logits(x)
            z_y = z.gather(1, y[:, None]).squeeze(1)
            margin = z_y - z.scatter(1, y[:, None], float("-inf")).amax(1)
            g = counter.grad(margin.sum(), x)
        return margin.detach(), g.detach()

    def _run(self, counter, x, y, target, gen):
        n = x.shape[0]
        with torch.no_grad():
            pred = counter.logits(x).argmax(1)
        wrong = pred != y  # already misclassified: x itself, at distance 0
        best = x.clone()
        best_norm = torch.where(wrong, torch.zeros(n, device=x.device, dtype=x.dtype),
                                torch.full((n,), float("inf"), device=x.device, dtype=x.dtype))
        start, found = self._start(counter, x, y, pred, gen)
        idx = (found & ~wrong).nonzero().squeeze(1)
        if idx.numel():
            adv, norms = self._walk(counter, x[idx], y[idx], start[idx])
            best[idx], best_norm[idx] = adv, norms
        return restrict_to_budget(counter, x, best, y, best_norm, self.eps_value, self._norm)

    def _walk(self, counter, x: Tensor, y: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """Binary search from x1 towards x, then the boundary walk; the closest adversarial point seen and its
        norm."""
        n, d = x.shape[0], x[0].numel()
        lo = torch.zeros(n, device=x.device, dtype=x.dtype)
        hi = torch.ones_like(lo)
        for _ in range(self.binary_search_steps):
            mid = (lo + hi) / 2
            fooled = self._fooled(counter, self._between(x, x1, mid), y)
            lo, hi = torch.where(fooled, lo, mid), torch.where(fooled, mid, hi)
        best, best_norm = x1.clone(), per_sample_norm(x1 - x, self._norm)
        xk = self._between(x, x1, hi)
        x0 = x.flatten(1).double()
        lr = torch.full((n,), self.lr, device=x.device, dtype=torch.float64)
        decay_every = max(1, self.steps // self.lr_num_decay)
        normal = None
        for it in range(1, self.steps + 1):
            margin, g = self._margin_and_grad(counter, xk, y)
            dist = per_sample_norm(xk - x, self._norm)
            closer = (margin < 0) & (dist < best_norm)
            best = torch.where(closer.view(-1, *([1] * (x.dim() - 1))), xk, best)
            best_norm = torch.where(closer, dist, best_norm)
            g = g.flatten(1).double()
            normal = g if normal is None else (1 - self.momentum) * g + self.momentum * normal
            if (it + 1) % decay_every == 0:
                lr = lr * self.lr_decay
            m = margin.double()
            c = torch.where(m > 0, -self.overshoot * m, -(2 - self.overshoot) * m)  # just past the boundary
            step = self._solve(x0, xk.flatten(1).double(), normal, c, lr * d)
            xk = (xk + step.to(x.dtype).view_as(x)).clamp(0, 1)
        return best, best_norm
