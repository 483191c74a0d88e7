"""Robustness against several l_p threat models at once (spec mng_ac.md): single-norm PGD training per norm
(adv-inf, adv-l1, adv-l2), TRADES_inf, Tramer & Boneh's Adv_avg / Adv_max, MSD (Maini et al. 2020), and
MNG-AC's three parts (Madaan et al. 2021): SAT (one threat model drawn per minibatch), the adversarial
consistency loss (Jensen-Shannon divergence of the clean, adversarial and noise-augmented predictions) and
the meta noise generator (a one-step lookahead meta update of a small stochastic generator).

Defaults are the official code's CIFAR-10/SVHN training settings (mng_ac.md 1.8): l_inf 8/255 (10 steps of
1/255), l_2 128/255 (10 steps of 30/255), l_1 2000/255 (20 SLIDE steps of 1.0, q = 0.99). Training attacks run
with BatchNorm in train mode (`attack_bn_mode="train"`, the official scripts; mng_ac.md 1.7).
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from robustlab.attacks.base import PassCounter, attack_mode, check_bn_mode, restored_buffers
from robustlab.attacks.pgd import pgd
from robustlab.errors import InputError
from robustlab.losses import ce_loss
from robustlab.methods.base import LossOut, Method, StepContext, load_optimizer_state, optimizer_state_tensors
from robustlab.methods.baselines import PGDAT, TRADES, _attack_passes
from robustlab.registry import METHODS
from robustlab.threat import LpBall, make_threat
from robustlab.threat.lp import NORMS, l1_threshold
from robustlab.utils import mix_seed
from robustlab.validation import check_choice, check_eps, check_positive, check_positive_int, reject_inapplicable

# (eps, steps, step size) of the training attacks, CIFAR-10 / SVHN (mng_ac.md 1.8)
TRAIN_SETTINGS = {"linf": (8 / 255, 10, 1 / 255), "l2": (128 / 255, 10, 30 / 255), "l1": (2000 / 255, 20, 1.0)}


def check_norms(norms) -> tuple[str, ...]:
    """A non-empty tuple of distinct known norm names."""
    if isinstance(norms, str):
        norms = (norms,)
    norms = tuple(norms)
    if not norms:
        raise InputError(f"the set of threat models is empty; give one or more of {', '.join(NORMS)}")
    for n in norms:
        if n not in NORMS:
            raise InputError(f"unknown norm {n!r}; valid norms: {', '.join(NORMS)}")
    if len(set(norms)) != len(norms):
        raise InputError(f"repeated norm in {norms!r}")
    return norms


class MultiNormAttacks:
    """The per-norm training attacks (PGD; SLIDE for l_1) a multi-perturbation method runs."""

    def __init__(self, norms=NORMS, eps_linf: float = 8 / 255, eps_l2: float = 128 / 255, eps_l1: float = 2000 / 255,
                 steps_linf: int = 10, steps_l2: int = 10, steps_l1: int = 20, step_size_linf: float = 1 / 255,
                 step_size_l2: float = 30 / 255, step_size_l1: float = 1.0, q: float = 0.99,
                 random_start: bool = True, attack_bn_mode: str = "train", eps_ramp_epochs: float = 0.0) -> None:
        self.norms = check_norms(norms)
        check_positive(eps_ramp_epochs, "eps_ramp_epochs", allow_zero=True)
        self.eps_ramp_epochs, self.q = float(eps_ramp_epochs), q
        bn_mode = check_bn_mode(attack_bn_mode, "attack_bn_mode")
        eps = {"linf": eps_linf, "l2": eps_l2, "l1": eps_l1}
        steps = {"linf": steps_linf, "l2": steps_l2, "l1": steps_l1}
        sizes = {"linf": step_size_linf, "l2": step_size_l2, "l1": step_size_l1}
        for n in NORMS:
            check_eps(eps[n], f"eps_{n}")
            if eps[n] <= 0:
                raise InputError(f"eps_{n} must be > 0, got {eps[n]}")
            check_positive_int(steps[n], f"steps_{n}")
            check_positive(sizes[n], f"step_size_{n}")
        defaults = inspect.signature(MultiNormAttacks.__init__).parameters
        for n in NORMS:
            if n not in self.norms:
                reject_inapplicable({f"{k}_{n}": (v[n], defaults[f"{k}_{n}"].default)
                                     for k, v in (("eps", eps), ("steps", steps), ("step_size", sizes))},
                                    f"{n!r} is not among the trained norms {self.norms}")
        if "l1" not in self.norms:
            reject_inapplicable({"q": (q, defaults["q"].default)}, "SLIDE's q applies to the l1 norm only")
        self.eps = {n: float(eps[n]) for n in self.norms}
        self.steps = {n: int(steps[n]) for n in self.norms}
        self.step_size = {n: float(sizes[n]) for n in self.norms}
        self.threats: dict[str, LpBall] = {n: make_threat(n, eps[n], **({"q": q} if n == "l1" else {}))
                                           for n in self.norms}
        self.random_start, self.attack_bn_mode = random_start, bn_mode

    def describe(self) -> dict[str, Any]:
        return {"norms": list(self.norms), "eps": self.eps, "steps": self.steps, "step_size": self.step_size,
                "attack_bn_mode": self.attack_bn_mode, "eps_ramp_epochs": self.eps_ramp_epochs}

    def ramp(self, ctx: StepContext) -> float:
        """Fraction of every budget (and step size) in force: grows linearly to 1 over eps_ramp_epochs (the usual
        remedy for MNIST-scale budgets stalling at chance accuracy, as for pgd-at)."""
        return 1.0 if self.eps_ramp_epochs <= 0 else min(1.0, (ctx.progress + 1e-9) / self.eps_ramp_epochs)

    def threat(self, norm: str, f: float) -> LpBall:
        if f == 1.0:
            return self.threats[norm]
        return make_threat(norm, self.eps[norm] * f, **({"q": self.q} if norm == "l1" else {}))

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, norm: str, ctx: StepContext,
               keep_buffers: bool = False) -> Tensor:
        """x_adv for one norm (detached). keep_buffers: train-mode BN without touching the running statistics."""
        net = ctx.attacked(model)
        f = self.ramp(ctx)
        with attack_mode(net, bn_mode=self.attack_bn_mode), (restored_buffers(net) if keep_buffers else nullcontext()):
            counter = PassCounter(net)
            out = pgd(counter, x, y, threat=self.threat(norm, f), loss_fn=ce_loss, steps=self.steps[norm],
                      step_size=f * self.step_size[norm], random_start=self.random_start, generator=ctx.generator)
        _attack_passes(ctx, counter)
        return out.x_adv.detach()


class _MultiNormMethod(Method):
    """Base of the methods that train against several threat models (norms: any non-empty subset)."""

    norm = "linf"
    forwards_options_to = (MultiNormAttacks,)

    def __init__(self, norms=NORMS, **attack_kwargs: Any) -> None:
        self.attacks = MultiNormAttacks(norms, **attack_kwargs)
        self.norms = self.attacks.norms
        self.norm = self.norms[0]
        self.eps = self.attacks.eps[self.norm]  # the default evaluation attack's threat model

    def describe(self) -> dict[str, Any]:
        return {**self.attacks.describe(), **{k: v for k, v in super().describe().items() if k not in ("norm", "eps")}}


class _SingleNorm(PGDAT):
    """PGD adversarial training against one norm with MNG-AC's training attack for it (TRAIN_SETTINGS); the attack
    runs with BatchNorm in train mode as in the official scripts."""

    single_norm: ClassVar[str] = "linf"

    def __init__(self, eps: float | None = None, steps: int | None = None, step_size: float | None = None,
                 random_start: bool = True, eps_ramp_epochs: float = 0.0, q: float = 0.99,
                 attack_bn_mode: str = "train") -> None:
        d_eps, d_steps, d_step = TRAIN_SETTINGS[self.single_norm]
        super().__init__(self.single_norm, d_eps if eps is None else eps, d_steps if steps is None else steps,
                         d_step if step_size is None else step_size, random_start, eps_ramp_epochs)
        if self.single_norm != "l1":
            reject_inapplicable({"q": (q, 0.99)}, "SLIDE's q applies to adv-l1 only")
        self.attack_bn_mode, self.q = check_bn_mode(attack_bn_mode, "attack_bn_mode"), q
        if self.single_norm == "l1":
            self.threat = make_threat("l1", self.eps, q=q)

    def ramped(self, ctx):
        threat, f = super().ramped(ctx)
        if self.single_norm == "l1" and f != 1.0:
            threat = make_threat("l1", self.eps * f, q=self.q)
        return threat, f


@METHODS.register("adv-inf")
class AdvInf(_SingleNorm):
    """Adv_inf (Madry et al. 2018, MNG-AC's baseline): PGD training against l_inf alone, eps 8/255, 10 x 1/255.

    mng_ac.md 5."""

    name = "adv-inf"
    single_norm = "linf"


@METHODS.register("adv-l2")
class AdvL2(_SingleNorm):
    """Adv_2 (Madry et al. 2018, MNG-AC's baseline): PGD training against l_2 alone, eps 128/255, 10 x 30/255.

    mng_ac.md 5."""

    name = "adv-l2"
    single_norm = "l2"


@METHODS.register("adv-l1")
class AdvL1(_SingleNorm):
    """Adv_1 (Tramer & Boneh 2019, MNG-AC's baseline): SLIDE training against l_1 alone, eps 2000/255, 20 x 1.0.

    q = 0.99; mng_ac.md 5."""

    name = "adv-l1"
    single_norm = "l1"


@METHODS.register("trades-inf")
class TRADESInf(TRADES):
    """TRADES_inf (Zhang et al. 2019) as MNG-AC's baseline: l_inf, eps 0.031, 10 steps of 0.007, beta 6."""

    name = "trades-inf"

    def __init__(self, eps: float = 0.031, steps: int = 10, step_size: float = 0.007, beta: float = 6.0,
                 eps_ramp_epochs: float = 0.0) -> None:
        super().__init__("linf", eps, steps, step_size, beta, eps_ramp_epochs)


@METHODS.register("adv-avg")
class AdvAvg(_MultiNormMethod):
    """Adv_avg (Tramer & Boneh 2019): every threat model's attack on each batch, loss = mean of their CE losses
    (one forward over the concatenated adversarial batches)."""

    name = "adv-avg"

    def loss(self, model, batch, ctx):
        advs = [self.attacks.attack(model, batch.x, batch.y, n, ctx) for n in self.norms]
        logits = model(torch.cat(advs)).chunk(len(advs))
        ces = [F.cross_entropy(lg, batch.y) for lg in logits]
        loss = torch.stack(ces).mean()
        return LossOut(loss, {f"ce_{n}": c.detach() for n, c in zip(self.norms, ces)}, logits[0])


@METHODS.register("adv-max")
class AdvMax(_MultiNormMethod):
    """Adv_max (Tramer & Boneh 2019): every threat model's attack; each sample trains on the adversarial example
    with the largest cross-entropy."""

    name = "adv-max"

    def loss(self, model, batch, ctx):
        x, y = batch.x, batch.y
        advs = torch.stack([self.attacks.attack(model, x, y, n, ctx) for n in self.norms])  # (K, N, C, H, W)
        net = ctx.attacked(model)
        with attack_mode(net, bn_mode=self.attacks.attack_bn_mode), torch.no_grad():
            ce = torch.stack([F.cross_entropy(net(a), y, reduction="none") for a in advs])  # (K, N)
        worst = ce.argmax(0)
        x_adv = advs[worst, torch.arange(x.shape[0], device=x.device)]
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        picked = {f"picked_{n}": (worst == k).float().mean() for k, n in enumerate(self.norms)}
        return LossOut(loss, {"ce_adv": loss.detach(), **picked}, logits)


def msd_attack(model: nn.Module, x: Tensor, y: Tensor, attacks: MultiNormAttacks, steps: int,
               step_size: dict[str, float], counter: PassCounter, ramp: float = 1.0) -> Tensor:
    """Multi steepest descent (Maini et al. 2020, mng_ac.md 5): from delta = 0, each iteration takes one step in
    every norm from the current point and keeps, per sample, the candidate with the largest CE; returns each
    sample's best iterate over the run. ramp: the fraction of the budgets and steps in force."""
    threats = [attacks.threat(n, ramp) for n in attacks.norms]
    x_cur = x.clone()
    best = x.clone()
    best_loss = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for _ in range(steps):
        _, _, g = counter.loss_and_grad(x_cur, ce_loss, y, None)
        cands = torch.stack([t.step(x_cur, g, ramp * step_size[n], x) for t, n in zip(threats, attacks.norms)])
        with torch.no_grad():
            losses = torch.stack([F.cross_entropy(counter.logits(c), y, reduction="none") for c in cands])
        # ties go to the later candidate (the reference code's order l_1, l_2, l_inf compares with >=)
        k = len(attacks.norms) - 1 - losses.flip(0).argmax(0)
        ar = torch.arange(x.shape[0], device=x.device)
        x_cur = cands[k, ar]
        loss = losses[k, ar]
        better = loss > best_loss
        best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_cur, best)
        best_loss = torch.where(better, loss, best_loss)
    return best


@METHODS.register("msd")
class MSD(_MultiNormMethod):
    """MSD (Maini, Wong, Kolter 2020) as run in MNG-AC's code: 20 iterations, no random start, steps 1/255 (l_inf),
    25/255 (l_2), 1.0 (l_1 SLIDE); CE on each sample's best iterate.

    MSD has its own iteration count and step sizes (`msd_*`); it takes the budgets, SLIDE's q, the BatchNorm mode
    and the eps ramp of the per-norm attacks, and none of their steps, step sizes or random start (it has none)."""

    name = "msd"

    def __init__(self, norms=NORMS, msd_steps: int = 20, msd_step_size_linf: float = 1 / 255,
                 msd_step_size_l2: float = 25 / 255, msd_step_size_l1: float = 1.0, eps_linf: float = 8 / 255,
                 eps_l2: float = 128 / 255, eps_l1: float = 2000 / 255, q: float = 0.99, attack_bn_mode: str = "train",
                 eps_ramp_epochs: float = 0.0) -> None:
        super().__init__(norms, eps_linf=eps_linf, eps_l2=eps_l2, eps_l1=eps_l1, q=q, attack_bn_mode=attack_bn_mode,
                         eps_ramp_epochs=eps_ramp_epochs)
        check_positive_int(msd_steps, "msd_steps")
        sizes = {"linf": msd_step_size_linf, "l2": msd_step_size_l2, "l1": msd_step_size_l1}
        for n, v in sizes.items():
            check_positive(v, f"msd_step_size_{n}")
        self.msd_steps = msd_steps
        self.msd_step_size = {n: float(sizes[n]) for n in self.norms}

    def describe(self):
        d = {k: v for k, v in super().describe().items() if k not in ("steps", "step_size")}  # the PGD ones: unused
        return {**d, "msd_steps": self.msd_steps, "msd_step_size": self.msd_step_size}

    def loss(self, model, batch, ctx):
        net = ctx.attacked(model)
        with attack_mode(net, bn_mode=self.attacks.attack_bn_mode):
            counter = PassCounter(net)
            x_adv = msd_attack(net, batch.x, batch.y, self.attacks, self.msd_steps, self.msd_step_size, counter,
                               self.attacks.ramp(ctx))
        _attack_passes(ctx, counter)
        logits = model(x_adv.detach())
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)


# -- SAT, adversarial consistency, the meta noise generator ---------------------------------------------------

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


class NoiseGenerator(nn.Module):
    """MNG-AC's noise generator (mng_ac.md 4.1): 1x1 conv to 20, 3x3 valid conv, 1x1, 1x1 back to C (LeakyReLU
    0.01 between), plus the central crop of its Gaussian input z (B, C, H+2, W+2), fresh on every call.

    image_input=False (default) is the official code's input-independent generator (4,183 parameters for C=3), the
    spec's default (mng_ac.md 4.1); image_input=True (the paper's input-dependent description) also feeds x,
    zero-padded by one pixel, next to z.
    """

    def __init__(self, channels: int, width: int = 20, image_input: bool = False) -> None:
        super().__init__()
        self.channels, self.image_input = channels, image_input
        cin = 2 * channels if image_input else channels
        act = nn.LeakyReLU(0.01)
        self.body = nn.Sequential(nn.Conv2d(cin, width, 1), act, nn.Conv2d(width, width, 3), act,
                                  nn.Conv2d(width, width, 1), act, nn.Conv2d(width, channels, 1))
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / k) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, c, h, w = x.shape
        z = torch.randn((n, c, h + 2, w + 2), generator=generator, device=x.device, dtype=x.dtype)
        inp = torch.cat([F.pad(x, (1, 1, 1, 1)), z], 1) if self.image_input else z
        return self.body(inp) + z[:, :, 1:-1, 1:-1]


class _SAT(_MultiNormMethod):
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
            return torch.randint(k, (n,), generator=ctx.generator, device=ctx.generator.device)
        gen = ctx.generator
        if self.sat_granularity == "epoch":
            gen = torch.Generator().manual_seed(mix_seed(ctx.seed, ctx.epoch, 4))
        draw = torch.randint(k, (1,), generator=gen, device=gen.device)
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
class SAT(_SAT):
    """SAT (Madaan et al., ICML 2021; mng_ac.md 2): one threat model drawn uniformly per minibatch
    from a seeded generator, one attack, CE on the adversarial batch only."""

    name = "sat"

    def loss(self, model, batch, ctx):
        x_adv, draw = self.sat_adversarial(model, batch.x, batch.y, ctx)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        return LossOut(loss, {"ce_adv": loss.detach()}, logits)


@METHODS.register("sat-ac")
class SATAC(_SAT):
    """SAT + adversarial consistency (Madaan et al., ICML 2021): CE(f(x_adv), y) + beta * JS(p_clean, p_adv, p_aug).

    mng_ac.md 3: x_aug is the drawn norm's budget applied to fresh Gaussian noise (the untrained generator's input);
    beta 12."""

    name = "sat-ac"
    forwards_options_to = (MultiNormAttacks,)

    def __init__(self, norms=NORMS, beta: float = 12.0, sat_granularity: str = "batch", **attack_kwargs: Any) -> None:
        super().__init__(norms, sat_granularity, **attack_kwargs)
        check_positive(beta, "beta", allow_zero=True)
        self.beta = float(beta)

    def augmented(self, x: Tensor, draw: Tensor, ctx: StepContext) -> Tensor:
        z = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
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

    def loss(self, model, batch, ctx):
        x, y = batch.x, batch.y
        x_adv, draw = self.sat_adversarial(model, x, y, ctx)
        with torch.no_grad():
            x_aug = self.augmented(x, draw, ctx)
        return self.consistency_step(model, x, y, x_adv, x_aug)


@METHODS.register("mng-ac")
class MNGAC(SATAC):
    """MNG-AC (Madaan, Shin, Hwang, ICML 2021; mng_ac.md 4): SAT + adversarial consistency + the meta noise
    generator. Each step: (1) x_adv by one SAT attack; (2) meta step: theta' = theta - lr * grad CE(f(x_aug(phi))),
    a one-step lookahead with the graph kept, then phi <- SGD step on CE(f_theta'(x_adv)) (second order, through
    torch.func.functional_call on the real model's parameters and cloned buffers: no model copy, and the
    classifier's weights, .grad and BatchNorm statistics are untouched); (3) classifier step on
    CE(f(x_adv)) + beta * JS(p_clean, p_adv, p_aug) with fresh generator noise.

    generator_input="noise" (default) is the official code's input-independent generator, the one behind the
    published numbers and the spec's default (mng_ac.md 4.1); "image" feeds x and z (the paper's description).
    generator_lr / lookahead_lr: None = the classifier's current lr (the code's choice), else that value times the
    lr schedule's factor.
    """

    name = "mng-ac"
    forwards_options_to = (MultiNormAttacks,)

    def __init__(self, norms=NORMS, beta: float = 12.0, sat_granularity: str = "batch",
                 generator_input: str = "noise", generator_width: int = 20, generator_lr: float | None = None,
                 lookahead_lr: float | None = None, generator_momentum: float = 0.9,
                 generator_weight_decay: float = 5e-4, **attack_kwargs: Any) -> None:
        super().__init__(norms, beta, sat_granularity, **attack_kwargs)
        check_choice(generator_input, "generator_input", ("image", "noise"))
        check_positive_int(generator_width, "generator_width")
        for k, v in (("generator_lr", generator_lr), ("lookahead_lr", lookahead_lr)):
            if v is not None:
                check_positive(v, k)
        check_positive(generator_momentum, "generator_momentum", allow_zero=True)
        check_positive(generator_weight_decay, "generator_weight_decay", allow_zero=True)
        self.generator_input, self.generator_width = generator_input, generator_width
        self.generator_lr, self.lookahead_lr = generator_lr, lookahead_lr
        self.generator_momentum, self.generator_weight_decay = float(generator_momentum), float(generator_weight_decay)
        self.generator: NoiseGenerator | None = None
        self.generator_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Tensor] | None = None

    # -- owned state ---------------------------------------------------------------------------
    def _ensure(self, x: Tensor) -> NoiseGenerator:
        if self.generator is None:
            self.generator = NoiseGenerator(x.shape[1], self.generator_width,
                                            self.generator_input == "image").to(x.device)
            self.generator_optimizer = torch.optim.SGD(self.generator.parameters(), lr=0.0,
                                                       momentum=self.generator_momentum,
                                                       weight_decay=self.generator_weight_decay)
            if self._pending is not None:
                self._load(self._pending)
                self._pending = None
        return self.generator

    def state_tensors(self) -> dict[str, Tensor]:
        if self.generator is None or self.generator_optimizer is None:
            return dict(self._pending or {})
        out = {f"generator/{k}": v for k, v in self.generator.state_dict().items()}
        out.update(optimizer_state_tensors("generator_optim", self.generator_optimizer))
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        mine = {k: v for k, v in tensors.items() if k.startswith(("generator/", "generator_optim/"))}
        if not mine:
            return
        if self.generator is None:  # built on the first batch (it needs the channel count)
            self._pending = mine
        else:
            self._load(mine)

    def _load(self, tensors: dict[str, Tensor]) -> None:
        assert self.generator is not None and self.generator_optimizer is not None
        self.generator.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("generator/")})
        load_optimizer_state("generator_optim", self.generator_optimizer, tensors)

    # -- the step ------------------------------------------------------------------------------
    def meta_step(self, net: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, draw: Tensor, lr: float,
                  gen: torch.Generator, f: float = 1.0) -> tuple[Tensor, Tensor]:
        """Generator gradient of CE(f_theta'(x_adv), y), theta' = theta - lr * grad_theta CE(f_theta(x_aug(phi)), y).

        Returns (meta loss, the phi gradients as one flat tensor, for tests); the gradients are also left in .grad.
        Nothing of `net` is modified:
        the gradients are taken w.r.t. phi only and BatchNorm runs on cloned buffers."""
        assert self.generator is not None
        params = {k: p for k, p in net.named_parameters() if p.requires_grad}
        x_aug = self._fit(x, self.generator(x, gen), draw, f)
        inner = F.cross_entropy(functional_call(net, ({**params, **_cloned_buffers(net)},), (x_aug,)), y)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
        lookahead = {k: (p - lr * g if g is not None else p) for (k, p), g in zip(params.items(), grads)}
        meta = F.cross_entropy(functional_call(net, ({**lookahead, **_cloned_buffers(net)},), (x_adv,)), y)
        phi = list(self.generator.parameters())
        g_phi = torch.autograd.grad(meta, phi, allow_unused=True)
        phi_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(phi, g_phi)]
        for p, g in zip(phi, phi_grads):
            p.grad = g
        return meta.detach(), torch.cat([g.flatten() for g in phi_grads])

    def train_step(self, model, batch, optimizer, ctx: StepContext, backward_and_step):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise InputError("mng-ac trains in one process (its generator and meta step are not wired for DDP); "
                             "run without torchrun")
        x, y = batch.x, batch.y
        gen_net = self._ensure(x)
        assert self.generator_optimizer is not None
        net = ctx.attacked(model)
        lr_now = optimizer.param_groups[0]["lr"]
        lookahead_lr = lr_now if self.lookahead_lr is None else self.lookahead_lr * ctx.lr_factor
        generator_lr = lr_now if self.generator_lr is None else self.generator_lr * ctx.lr_factor
        # the attack runs on the real weights with BatchNorm in train mode but its statistics restored, as on the
        # official code's per-step model copy
        x_adv, draw = self.sat_adversarial(model, x, y, ctx, keep_buffers=True)
        for g in self.generator_optimizer.param_groups:
            g["lr"] = generator_lr
        self.generator_optimizer.zero_grad(set_to_none=True)
        f = self.attacks.ramp(ctx)
        meta, _ = self.meta_step(net, x, y, x_adv, draw, lookahead_lr, ctx.generator, f)
        ctx.passes[1] += 2 * x.shape[0]  # the double backward of the meta loss (on top of the inner backward)
        self.generator_optimizer.step()
        with torch.no_grad():
            x_aug = self._fit(x, gen_net(x, ctx.generator), draw, f)  # the updated generator, fresh noise
        out = self.consistency_step(model, x, y, x_adv, x_aug)
        backward_and_step(out.loss)
        out.logs["meta"] = meta
        out.stepped = True
        return out

    def loss(self, model, batch, ctx):  # reporting only; training goes through train_step
        logits = model(batch.x)
        return LossOut(F.cross_entropy(logits, batch.y), {}, logits)


def _cloned_buffers(net: nn.Module) -> dict[str, Tensor]:
    return {k: b.clone() for k, b in net.named_buffers()}


__all__ = ["AdvInf", "AdvL1", "AdvL2", "TRADESInf", "AdvAvg", "AdvMax", "MSD", "SAT", "SATAC", "MNGAC",
           "MultiNormAttacks", "NoiseGenerator", "fit_noise", "js_divergence", "msd_attack", "check_norms",
           "TRAIN_SETTINGS"]
