"""SAT and SAT + adversarial consistency (Madaan et al., ICML 2021; mng_ac.md 2-3): one threat model drawn per
minibatch, and the Jensen-Shannon consistency of the clean, adversarial and noise-augmented predictions, with the
noise fitted to the drawn norm's budget."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab import rng
from robustlab.errors import InputError
from robustlab.methods.base import LossMethod
from robustlab.methods.multi_norm import MultiNormAttacks, MultiNormMethod
from robustlab.registry import METHODS
from robustlab.threat.lp import NORMS, l1_threshold
from robustlab.types import LossOut, StepContext
from robustlab.utils import mix_seed
from robustlab.validation import check_choice, check_positive


def js_divergence(*logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence among K predictive distributions (mng_ac.md 3): mean_k KL(p_k || M) with
    M = clamp(mean_k p_k, 1e-7, 1); KL summed over classes, averaged over the batch. Nothing is detached."""
    logps = [F.log_softmax(lg, 1) for lg in logits]
    ps = [lp.exp() for lp in logps]
    total: Tensor = sum(ps)  # type: ignore[assignment]  # sum() of tensors is a tensor
    log_m = (total / len(ps)).clamp(1e-7, 1.0).log()
    kl: Tensor = sum((p * (lp - log_m)).sum(1).mean() for p, lp in zip(ps, logps))  # type: ignore[assignment]
    return kl / len(ps)


def fit_noise(x: Tensor, v: Tensor, norm: str, eps: float) -> Tensor:
    """x_aug from raw noise v for the sampled norm (mng_ac.md 4.2), differentiable in v.

    l_inf: clamp v to [-eps, eps]; l_1: project onto the l_1 sphere (threshold treated as a constant); l_2: scale
    v by the eta at which the box-clipped perturbation has l_2 norm eps (closed form, eta differentiable), or
    the smallest eta that saturates every moving coordinate when the box cannot hold eps. Then clip to [0, 1].
    """
    if norm == "linf":
        return (x + v.clamp(-eps, eps)).clamp(0, 1)
    if norm == "l1":
        theta = l1_threshold(v.detach(), torch.as_tensor(eps, dtype=v.dtype, device=v.device))
        flat = v.flatten(1)
        shrunk = torch.where((theta > 0)[:, None], flat.sign() * (flat.abs() - theta[:, None]).clamp_min(0), flat)
        return (x + shrunk.view_as(v)).clamp(0, 1)
    if norm == "l2":
        s = _l2_fit_scale(x, v, eps)
        return (x + s.clamp_min(1e-20).sqrt().view(-1, *([1] * (x.dim() - 1))) * v).clamp(0, 1)
    raise InputError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")


def _l2_fit_scale(x: Tensor, v: Tensor, eps: float) -> Tensor:
    """s = eta^2 with ||clip(x + eta v) - x||_2 = eps. N(s) = sum_{t_i <= s} r_i^2 + s sum_{t_i > s} v_i^2 is
    piecewise linear and non-decreasing in s, with breakpoints t_i = r_i^2 / v_i^2 (r_i the room to the box face
    that v_i points at)."""
    vf, xf = v.flatten(1), x.flatten(1)
    r2 = torch.where(vf >= 0, 1 - xf, xf).pow(2)
    v2 = vf.pow(2)
    moving = v2 > 0
    t = torch.where(moving, r2 / v2.clamp_min(1e-20), torch.full_like(v2, float("inf")))
    t_sorted, order = t.sort(1)
    r2s, v2s = r2.gather(1, order), v2.gather(1, order)
    r2s = torch.where(torch.isfinite(t_sorted), r2s, torch.zeros_like(r2s))  # non-moving coordinates never saturate
    cum_r2 = r2s.cumsum(1)
    tail_v2 = v2s.flip(1).cumsum(1).flip(1) - v2s  # sum over the coordinates after the breakpoint
    finite = torch.isfinite(t_sorted)
    n_at = torch.where(finite, cum_r2 + torch.where(finite, t_sorted, torch.zeros_like(t_sorted)) * tail_v2,
                       torch.full_like(cum_r2, float("inf")))
    target = eps * eps
    j = (n_at < target).sum(1)  # first breakpoint reaching eps^2 (N is non-decreasing: a prefix is below)
    n_finite = finite.sum(1)
    jc = j.clamp(max=t.shape[1] - 1)[:, None]
    before = torch.where(j > 0, cum_r2.gather(1, (j - 1).clamp_min(0)[:, None]).squeeze(1),
                         torch.zeros_like(j, dtype=v.dtype))
    rest = (tail_v2.gather(1, jc) + v2s.gather(1, jc)).squeeze(1)
    s_inside = (target - before) / rest.clamp_min(1e-20)
    last = t_sorted.gather(1, (n_finite - 1).clamp_min(0)[:, None]).squeeze(1)
    s_full = torch.where(n_finite > 0, last, torch.zeros_like(last))
    return torch.where(j < n_finite, s_inside, s_full)


class SATBase(MultiNormMethod):
    forwards_options_to = (MultiNormAttacks,)

    def __init__(self, norms=NORMS, sat_granularity: str = "batch", **attack_kwargs: Any) -> None:
        super().__init__(norms, **attack_kwargs)
        check_choice(sat_granularity, "sat_granularity", ("batch", "sample", "epoch"))
        self.sat_granularity = sat_granularity

    def draw(self, ctx: StepContext, n: int) -> Tensor:
        """Index into `norms` per sample (all equal unless sat_granularity="sample"), from the step's seeded
        generator (or, per epoch, from one seeded by the run's seed and the epoch)."""
        k = len(self.norms)
        if self.sat_granularity == "sample":
            return rng.randint(k, (n,), generator=ctx.generator, device=ctx.generator.device)
        gen = ctx.generator
        if self.sat_granularity == "epoch":
            gen = torch.Generator().manual_seed(mix_seed(ctx.seed, ctx.epoch, 4))
        draw = rng.randint(k, (1,), generator=gen, device=gen.device)
        return draw.to(ctx.generator.device).expand(n)

    def sat_adversarial(self, model, x: Tensor, y: Tensor, ctx: StepContext, keep_buffers: bool = False):
        """(x_adv, norm index per sample): one attack per sample, in the drawn norm."""
        draw = self.draw(ctx, x.shape[0])
        if self.sat_granularity != "sample":
            k = int(draw[0])
            return self.attacks.attack(model, x, y, self.norms[k], ctx, keep_buffers), draw
        x_adv = x.clone()
        for k, n in enumerate(self.norms):
            idx = (draw == k).nonzero().squeeze(1)
            if idx.numel():
                x_adv[idx] = self.attacks.attack(model, x[idx], y[idx], n, ctx, keep_buffers)
        return x_adv, draw

    def describe(self):
        return {**super().describe(), "sat_granularity": self.sat_granularity}


@METHODS.register("sat")
class SAT(SATBase, LossMethod):
    """SAT (Madaan et al., ICML 2021; mng_ac.md 2): one threat model drawn uniformly per minibatch
    from a seeded generator, one attack, CE on the adversarial batch only."""

    name = "sat"

    def loss(self, model, batch, ctx):
        x_adv, draw = self.sat_adversarial(model, batch.x, batch.y, ctx)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)


class ConsistencyBase(SATBase):
    """SAT plus the adversarial consistency term: beta * JS(p_clean, p_adv, p_aug) beside CE on x_adv, with x_aug the
    drawn norm's noise (SAT-AC: fitted Gaussian noise; MNG-AC: the meta noise generator's). Beta 12."""

    forwards_options_to = (MultiNormAttacks,)

    def __init__(self, norms=NORMS, beta: float = 12.0, sat_granularity: str = "batch", **attack_kwargs: Any) -> None:
        super().__init__(norms, sat_granularity, **attack_kwargs)
        check_positive(beta, "beta", allow_zero=True)
        self.beta = float(beta)

    def augmented(self, x: Tensor, draw: Tensor, ctx: StepContext) -> Tensor:
        z = rng.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        return self._fit(x, z, draw, self.attacks.ramp(ctx))

    def _fit(self, x: Tensor, v: Tensor, draw: Tensor, f: float = 1.0) -> Tensor:
        """Noise v fitted to each sample's drawn norm at the budget in force (f: the eps ramp's fraction)."""
        if self.sat_granularity != "sample":
            n = self.norms[int(draw[0])]
            return fit_noise(x, v, n, f * self.attacks.eps[n])
        out = x.clone()
        for k, n in enumerate(self.norms):
            idx = (draw == k).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = fit_noise(x[idx], v[idx], n, f * self.attacks.eps[n])
        return out

    def consistency_step(self, model, x, y, x_adv, x_aug):
        """CE on x_adv + beta * JS over three separate forwards (BatchNorm sees each view's own statistics)."""
        logits_c, logits_a, logits_g = model(x), model(x_adv), model(x_aug)
        ce = F.cross_entropy(logits_a, y)
        js = js_divergence(logits_c, logits_a, logits_g)
        return LossOut(ce + self.beta * js, {"ce_adv": ce.detach(), "js": js.detach()}, logits_a)


@METHODS.register("sat-ac")
class SATAC(ConsistencyBase, LossMethod):
    """SAT + adversarial consistency (Madaan et al., ICML 2021): CE(f(x_adv), y) + beta * JS(p_clean, p_adv, p_aug).

    mng_ac.md 3: x_aug is the drawn norm's budget applied to fresh Gaussian noise (the untrained generator's input);
    beta 12."""

    name = "sat-ac"

    def loss(self, model, batch, ctx):
        x, y = batch.x, batch.y
        x_adv, draw = self.sat_adversarial(model, x, y, ctx)
        with torch.no_grad():
            x_aug = self.augmented(x, draw, ctx)
        return self.consistency_step(model, x, y, x_adv, x_aug)
