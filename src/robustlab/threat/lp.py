"""l_inf, l_2 and l_1 balls intersected with the input box (spec mng_ac.md section 1, baselines.md section 1).

A threat model owns everything norm-specific: random init inside the set, the steepest-ascent step,
the projection, membership and the distance. Attacks are optimisers written against this interface,
so there is no `if norm == ...` in attack code.

All methods work in input space: `x` is the clean batch (N, C, H, W) in the box, `x_adv` a candidate.
Budgets are tensors broadcastable to the input: a scalar, per sample (N,) or (N, 1, 1, 1), or (l_inf
only) per pixel (N, C, H, W) or (C, H, W). The box is [0, 1] (classifiers' inputs) unless given: detectors
take pixel-scale [0, 255] inputs (`LinfBall(8.0, box=(0, 255))`), and an unbounded box (-inf, inf) serves
inputs that are not images (the WPGD toy problem in the plane).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from robustlab import rng
from robustlab.errors import InputError
from robustlab.validation import check_choice, check_eps

NORMS = ("linf", "l2", "l1")
_TINY = 1e-12


def per_sample_norm(v: Tensor, p: float | str) -> Tensor:
    """Per-sample norm of a batch, flattening every dimension but the first."""
    flat = v.flatten(1)
    if p in ("linf", float("inf")):
        return flat.abs().amax(dim=1)
    if p in ("l2", 2):
        return flat.norm(p=2, dim=1)
    if p in ("l1", 1):
        return flat.abs().sum(dim=1)
    raise InputError(f"unknown norm {p!r}; valid: linf, l2, l1")


def _view(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample vector (N,) against x (N, C, H, W)."""
    return t.view(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class LpBall(ABC):
    """Base class: an l_p ball of radius `eps` around x, intersected with the box [lo, hi]^d (default [0, 1])."""

    eps: float | Tensor
    box: tuple[float, float] = (0.0, 1.0)
    norm: ClassVar[str] = ""
    per_pixel_ok: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_eps(self.eps)
        lo, hi = self.box
        if not lo < hi:
            raise InputError(f"the input box must have lo < hi, got {self.box}")
        if isinstance(self.eps, Tensor) and self.eps.dim() == 4 and self.eps.shape[1:].numel() > 1 and not self.per_pixel_ok:
            raise InputError(f"{self.norm} budgets are per sample; got a per-pixel eps of shape {tuple(self.eps.shape)}")

    # -- budgets -------------------------------------------------------------------------------
    def eps_like(self, x: Tensor) -> Tensor:
        """The budget as a tensor broadcastable to x: () / (N,1,1,1) / (N,C,H,W)."""
        eps = self.eps
        if not isinstance(eps, Tensor):
            return torch.as_tensor(float(eps), dtype=x.dtype, device=x.device)
        eps = eps.to(device=x.device, dtype=x.dtype)
        if eps.dim() == 1:
            if eps.shape[0] != x.shape[0]:
                raise InputError(f"per-sample eps has {eps.shape[0]} entries but the batch has {x.shape[0]} samples")
            return _view(eps, x)
        if eps.dim() == x.dim() - 1:  # per-pixel budget shared by all samples
            eps = eps.unsqueeze(0)
        if eps.dim() == x.dim():
            if eps.shape[0] not in (1, x.shape[0]) or any(a not in (1, b) for a, b in zip(eps.shape[1:], x.shape[1:])):
                raise InputError(f"eps of shape {tuple(eps.shape)} does not broadcast to the input {tuple(x.shape)}")
            return eps
        if eps.dim() == 0:
            return eps
        raise InputError(f"eps of shape {tuple(eps.shape)} does not broadcast to the input {tuple(x.shape)}")

    def eps_per_sample(self, x: Tensor) -> Tensor:
        """Per-sample scalar budget (N,): for per-pixel l_inf budgets, the largest entry of each sample."""
        eps = self.eps_like(x)
        return eps.expand_as(x).flatten(1).amax(1) if eps.dim() else eps.expand(x.shape[0])

    def subset(self, idx: Tensor) -> "LpBall":
        """The same threat model restricted to the samples `idx` (needed when attacking a subset)."""
        eps = self.eps
        if isinstance(eps, Tensor) and eps.dim() in (1, 4) and eps.shape[0] > 1:
            return type(self)(**{**self.__dict__, "eps": eps[idx]})
        return self

    # -- geometry ------------------------------------------------------------------------------
    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return per_sample_norm(x_adv - x, self.norm)

    def contains(self, x_adv: Tensor, x: Tensor, tol: float = 1e-5) -> Tensor:
        """Per-sample bool: inside the ball (relative+absolute tolerance) and inside the box."""
        lo, hi = self.box
        in_box = (x_adv.flatten(1).amin(1) >= lo - tol) & (x_adv.flatten(1).amax(1) <= hi + tol)
        if self.norm == "linf" and isinstance(self.eps, Tensor) and self.eps_like(x).dim() and self.eps_like(x).numel() > x.shape[0]:
            eps = self.eps_like(x)
            in_ball = ((x_adv - x).abs() <= eps * (1 + tol) + tol).flatten(1).all(1)
        else:
            eps = self.eps_per_sample(x)
            in_ball = self.distance(x_adv, x) <= eps * (1 + tol) + tol
        return in_box & in_ball

    @abstractmethod
    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Nearest point (or the reference codes' feasible point) of the ball ∩ box to x_adv."""

    @abstractmethod
    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random point inside the ball ∩ box around x."""

    @abstractmethod
    def ascent_direction(self, grad: Tensor, x_adv: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        """Steepest-ascent direction of unit size in this norm."""

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float | Tensor, x: Tensor) -> Tensor:
        """One projected steepest-ascent step: Proj(x_adv + step_size * direction(grad))."""
        return self.project(x_adv + step_size * self.ascent_direction(grad, x_adv, x), x)

    def clip(self, x_adv: Tensor) -> Tensor:
        """x_adv clamped to the box."""
        return x_adv.clamp(*self.box)


@dataclass(frozen=True)
class LinfBall(LpBall):
    """l_inf ball; the exact projection onto ball and box is coordinate-wise clamping."""

    norm: ClassVar[str] = "linf"
    per_pixel_ok: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        largest = float(self.eps.max()) if isinstance(self.eps, Tensor) and self.eps.numel() else self.eps
        if isinstance(largest, (int, float)) and largest > 1 and self.box == (0.0, 1.0):
            # inputs live in [0, 1]: an l_inf budget above 1 is almost always a pixel-unit budget (8 for 8/255)
            # suggest /255 only where the result is a plausible budget (8 -> 8/255); 1e6 is no pixel budget
            hint = (f", so eps={largest:g} is probably meant as {largest:g}/255 = {largest / 255:.4g} (write "
                    f"eps={largest:g}/255)" if largest <= 64 else "; an l_inf budget lies in (0, 1]")
            raise InputError(f"l_inf eps {largest:g} is larger than the [0, 1] input range; budgets are in the "
                             f"input's unit{hint}")

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        eps = self.eps_like(x)
        delta = torch.clamp(x_adv - x, min=-eps, max=eps)
        return self.clip(x + delta)

    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = rng.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.clip(x + (2 * u - 1) * self.eps_like(x))

    def ascent_direction(self, grad: Tensor, x_adv: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        return grad.sign()


@dataclass(frozen=True)
class L2Ball(LpBall):
    """l_2 ball. `l2_proj="scale_then_clip"` (default, the reference codes) or `"exact"` (bisection)."""

    l2_proj: Literal["scale_then_clip", "exact"] = "scale_then_clip"
    norm: ClassVar[str] = "l2"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.l2_proj, "l2_proj", ("scale_then_clip", "exact"))

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        eps = self.eps_like(x)
        delta = x_adv - x
        if self.l2_proj == "exact":
            return x + _exact_l2_box_projection(delta, x, eps, self.box)
        norm = _view(delta.flatten(1).norm(dim=1), x)
        factor = torch.clamp(eps / norm.clamp_min(_TINY), max=1.0)
        return self.clip(x + delta * factor)

    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = rng.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        n = n / _view(n.flatten(1).norm(dim=1).clamp_min(_TINY), x)
        r = rng.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        return self.clip(x + n * _view(r, x) * self.eps_like(x))

    def ascent_direction(self, grad: Tensor, x_adv: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        return grad / _view(grad.flatten(1).norm(dim=1).clamp_min(_TINY), grad)


def _exact_l2_box_projection(v: Tensor, x: Tensor, eps: Tensor, box: tuple[float, float] = (0.0, 1.0),
                              iters: int = 40) -> Tensor:
    """argmin ||d - v||_2 s.t. ||d||_2 <= eps, lo <= x + d <= hi: d = clamp(v/(1+lam), lo-x, hi-x), bisection on lam."""
    lo_box, hi_box = box[0] - x, box[1] - x
    clipped = torch.maximum(torch.minimum(v, hi_box), lo_box)
    eps_s = eps.expand(x.shape[0], *([1] * (x.dim() - 1))) if eps.dim() else eps
    inside = _view(clipped.flatten(1).norm(dim=1), x) <= eps_s
    lam_lo = torch.zeros_like(inside, dtype=v.dtype)
    lam_hi = torch.ones_like(lam_lo)
    for _ in range(60):  # grow the upper bracket until feasible
        d = torch.maximum(torch.minimum(v / (1 + lam_hi), hi_box), lo_box)
        bad = _view(d.flatten(1).norm(dim=1), x) > eps_s
        lam_hi = torch.where(bad, lam_hi * 2, lam_hi)
    for _ in range(iters):
        mid = (lam_lo + lam_hi) / 2
        d = torch.maximum(torch.minimum(v / (1 + mid), hi_box), lo_box)
        bad = _view(d.flatten(1).norm(dim=1), x) > eps_s
        lam_lo = torch.where(bad, mid, lam_lo)
        lam_hi = torch.where(bad, lam_hi, mid)
    d = torch.maximum(torch.minimum(v / (1 + lam_hi), hi_box), lo_box)
    return torch.where(inside, clipped, d)


def l1_threshold(v: Tensor, eps: Tensor) -> Tensor:
    """Per-sample soft-threshold theta of the l_1-ball projection (Duchi et al. 2008); 0 for samples inside.

    The projection of v is sign(v) * max(|v| - theta, 0). eps: () or (N,).
    """
    n = v.shape[0]
    u = v.flatten(1).abs()
    eps = eps.reshape(-1).expand(n) if eps.dim() else eps.expand(n)
    eps = eps.to(dtype=u.dtype)
    mu, _ = torch.sort(u, dim=1, descending=True)
    cumsum = mu.cumsum(1)
    j = torch.arange(1, u.shape[1] + 1, device=v.device, dtype=u.dtype)
    cond = mu - (cumsum - eps[:, None]) / j > 0
    rho = cond.sum(1).clamp_min(1)  # the condition holds on a prefix: count instead of argmax (ties)
    theta = (cumsum.gather(1, (rho - 1)[:, None]).squeeze(1) - eps) / rho.to(u.dtype)
    return torch.where(u.sum(1) > eps, theta, torch.zeros_like(theta))  # per sample: never touch samples inside


def project_l1_ball(v: Tensor, eps: Tensor) -> Tensor:
    """Exact Euclidean projection of each sample of v onto {||d||_1 <= eps} (Duchi et al. 2008).

    Per sample: samples already inside are returned unchanged (never "all or nothing"). eps: () or (N,).
    """
    flat = v.flatten(1)
    theta = l1_threshold(v, eps)
    w = (flat.abs() - theta[:, None]).clamp_min(0) * flat.sign()
    return torch.where((theta > 0)[:, None], w, flat).view_as(v)


@dataclass(frozen=True)
class L1Ball(LpBall):
    """l_1 ball with the SLIDE sparse step (Tramer & Boneh 2019), spec mng_ac.md 1.4-1.6.

    q: sparsity quantile of |grad| per sample (0.99 moves ~1% of coordinates per step).
    mask_saturated: zero the gradient where a pixel sits on a box face and the gradient pushes outward.
    """

    q: float = 0.99
    mask_saturated: bool = False
    norm: ClassVar[str] = "l1"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.q < 1.0:
            raise InputError(f"SLIDE quantile q must be in [0, 1), got {self.q}")

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        eps = self.eps_like(x)
        eps = eps.flatten() if eps.dim() else eps
        return self.clip(x + project_l1_ball(x_adv - x, eps))

    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Laplace direction (inverse-CDF sampling so the generator is honoured), scaled to radius r*eps.
        u = rng.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 0.5
        lap = -u.sign() * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))
        lap = lap / _view(lap.flatten(1).abs().sum(1).clamp_min(_TINY), x)
        r = rng.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        return self.clip(x + lap * _view(r, x) * self.eps_like(x))

    def ascent_direction(self, grad: Tensor, x_adv: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        g = grad
        if self.mask_saturated and x_adv is not None:
            lo, hi = self.box
            g = torch.where(((x_adv <= lo) & (g < 0)) | ((x_adv >= hi) & (g > 0)), torch.zeros_like(g), g)
        flat = g.flatten(1)
        a = flat.abs()
        t = _quantile_linear(a, self.q)
        e = torch.where((a >= t) & (a > 0), flat.sign(), torch.zeros_like(flat))
        e = e / e.abs().sum(1, keepdim=True).clamp_min(1.0)
        return e.view_as(g)


def _quantile_linear(a: Tensor, q: float) -> Tensor:
    """Per-row q-quantile with linear interpolation (numpy's default, what the reference SLIDE uses).

    Two `kthvalue` selections instead of `torch.quantile`, which sorts every row (2-3x slower here).
    """
    d = a.shape[1]
    pos = q * (d - 1)
    lo = math.floor(pos)
    frac = pos - lo
    v_lo = a.kthvalue(lo + 1, dim=1, keepdim=True).values
    if frac == 0 or lo + 1 >= d:
        return v_lo
    v_hi = a.kthvalue(lo + 2, dim=1, keepdim=True).values
    return v_lo + (v_hi - v_lo) * frac


_BALLS = {"linf": LinfBall, "l2": L2Ball, "l1": L1Ball}


def normalise_norm(norm: str) -> str:
    """'linf', 'l2' or 'l1' from any accepted spelling ('inf', 'Linf', 'L2', 'L1', 'l_inf', ...)."""
    key = str(norm).lower().replace("_", "")
    key = {"inf": "linf", "2": "l2", "1": "l1"}.get(key, key)
    if key not in _BALLS:
        raise InputError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return key


class ThreatViolation(RuntimeError):
    """An attack returned a point outside its threat model (a bug in the attack, never a result)."""


def check_within(x_adv: Tensor, x: Tensor, threat: LpBall | None, box: tuple[float, float], name: str,
                 what: str = "") -> None:
    """Every point of x_adv inside `threat` (ball and box) or, for an unbounded attack (threat None), inside `box`;
    else ThreatViolation naming the attack and how many points are out. Evaluators call it on every batch."""
    if threat is not None:
        ok = threat.contains(x_adv, x)
        where = what or f"its {threat.norm} ball"
    else:
        lo, hi = box
        tol = 1e-6 * max(1.0, hi - lo)
        ok = (x_adv.flatten(1).amin(1) >= lo - tol) & (x_adv.flatten(1).amax(1) <= hi + tol)
        where = what or f"the [{lo:g}, {hi:g}] box"
    if not bool(ok.all()):
        raise ThreatViolation(f"attack {name!r} returned {int((~ok).sum())} point(s) outside {where}; this is a bug "
                              "in the attack")


def make_threat(norm: str, eps: float | Tensor, **kwargs) -> LpBall:
    """Build a threat model by norm name ('linf', 'l2', 'l1'; 'inf', 'Linf', 'L2', 'L1' accepted)."""
    return _BALLS[normalise_norm(norm)](eps, **kwargs)


__all__ = ["LpBall", "LinfBall", "L2Ball", "L1Ball", "make_threat", "normalise_norm", "ThreatViolation", "check_within",
           "per_sample_norm", "project_l1_ball", "l1_threshold", "NORMS"]
