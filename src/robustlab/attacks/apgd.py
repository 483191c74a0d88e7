"""APGD-CE, APGD-DLR and APGD-T (Croce & Hein, ICML 2020, arXiv:2003.01690); l_inf and l_2.

Parameter-free PGD with momentum 0.75 and a step size halved at checkpoints (baselines.md 2.5), a
port of the reference `autopgd_base.py` schedule written with per-sample tensor ops, so the
iteration loop has no host-device synchronisation. Returns, per sample, the first misclassified
iterate found (x itself where none was).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack, PassCounter, targets_at_once
from robustlab.errors import InputError
from robustlab.losses import ce_loss, dlr_loss, dlr_targeted_loss, probability_margin_loss
from robustlab.registry import ATTACKS
from robustlab.threat import LpBall, make_threat
from robustlab.types import AttackOut
from robustlab.utils import mix_seed
from robustlab.validation import check_choice, check_positive_int

_TINY = 1e-12
APGD_LOSSES = {"ce": ce_loss, "dlr": dlr_loss, "pm": probability_margin_loss}  # the untargeted objectives of apgd-ce


def _v(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)


def _apgd_noise(norm: str, x: Tensor, gen: torch.Generator) -> Tensor:
    """The random start's raw draw for every sample of x: uniform in [-1, 1] (l_inf) or Gaussian (l_2)."""
    if norm == "linf":
        return 2 * rng.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1
    return rng.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def _apgd_init(threat: LpBall, x: Tensor, t: Tensor) -> Tensor:
    """The random start from the raw draw t: a point of the ball's surface direction, in the box."""
    eps = threat.eps_like(x)
    if threat.norm == "linf":
        return (x + eps * t / _v(t.flatten(1).abs().amax(1))).clamp(0, 1)
    return (x + eps * t / _v(t.flatten(1).norm(dim=1) + _TINY)).clamp(0, 1)


def _apgd_project(threat: LpBall, z: Tensor, x: Tensor) -> Tensor:
    eps = threat.eps_like(x)
    if threat.norm == "linf":
        return torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1)
    d = z - x
    n = _v(d.flatten(1).norm(dim=1))
    return (x + d / (n + _TINY) * torch.min(eps * torch.ones_like(n), n)).clamp(0, 1)


def _apgd_direction(threat: LpBall, g: Tensor) -> Tensor:
    if threat.norm == "linf":
        return g.sign()
    return g / (_v(g.flatten(1).norm(dim=1)) + _TINY)


def apgd_single_run(
    counter: PassCounter,
    x: Tensor,
    y: Tensor,
    *,
    threat: LpBall,
    loss_fn,
    steps: int,
    rho: float = 0.75,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
    group: Tensor | None = None,
    compact: bool = False,
) -> tuple[Tensor, Tensor]:
    """One APGD run on all of x. Returns (x_adv, acc): per sample the model's accuracy at x_adv as the attack
    estimated it (the share of the counter's `eot` passes that classify x_adv correctly: 0 or 1 with eot=1) and
    x_adv the iterate with the lowest estimate (ties: the latest, as the reference keeps its last fooling iterate),
    x itself where no pass was ever fooled (acc 1).

    An iterate of a randomised model (eot > 1) is judged by the EoT estimate, never by one draw: one fooling draw
    says little, and keeping that iterate overstates robustness. compact=True drops a sample from the working batch
    once an iterate fools every pass (acc 0; one host sync per iteration): no later iterate can do better, so the
    estimates are those of compact=False (with eot=1: the same fooled set; the returned fooling iterate is the
    first instead of the last). Every sample's state (step size, checkpoints, loss history) is its own and the
    random start is drawn before the loop.
    start: the random start's raw draw (`_apgd_noise`), else drawn here from `generator`.
    group: rows that are copies of one image (APGD-T's targets run side by side): with compact=True, all copies
    leave the batch once one of them fools the model (the image is broken; only that copy's iterate is kept).
    """
    n_iter_2 = max(int(0.22 * steps), 1)
    n_iter_min = max(int(0.06 * steps), 1)
    size_decr = max(int(0.03 * steps), 1)
    n = x.shape[0]
    x_out, threat_all = x, threat
    active = torch.arange(n, device=x.device)  # original indices of the working batch (compact=True)
    acc_all = torch.ones(n, device=x.device, dtype=x.dtype)
    adv_all = x.clone()
    estimate = counter.eot > 1  # compact runs track their best iterate only when it can fall short of fooling

    def fooling(logits: Tensor) -> Tensor:  # reads the working batch's labels (retire narrows y)
        return logits.argmax(1) != y

    if start is None:
        assert generator is not None, "apgd_single_run needs a generator or a start"
        start = _apgd_noise(threat.norm, x, generator)
    x_adv = _apgd_init(threat, x, start)
    x_best = x_adv.clone()
    x_best_adv = x_adv.clone()
    loss_steps = torch.zeros(steps, n, device=x.device, dtype=x.dtype)

    rate, loss_indiv, grad = counter.success_and_grad(x_adv, loss_fn, y, target, fooling)
    grad_best = grad.clone()
    acc = 1 - rate
    # The reference keeps x_best_adv = starting point for all samples; only fooled ones are returned.
    acc_best = acc.clone()
    loss_best = loss_indiv.clone()
    step_size = _v(2.0 * threat.eps_per_sample(x))
    x_adv_old = x_adv.clone()
    k = n_iter_2
    counter3 = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)

    def retire(now: Tensor) -> bool:
        """compact=True: record the samples fooled by every pass at x_adv and drop them from the working batch;
        False when none is left."""
        nonlocal active, x, y, target, group, threat, x_adv, x_adv_old, x_best, grad, grad_best, loss_steps
        nonlocal loss_indiv, loss_best, step_size, loss_best_last_check, reduced_last_check, x_best_adv, acc_best
        gone = now.nonzero().squeeze(1)
        adv_all[active[gone]] = x_adv[gone]
        acc_all[active[gone]] = 0
        leave = now
        if group is not None:  # every copy of a broken image leaves with it
            broken = torch.zeros(n, dtype=torch.bool, device=now.device)
            broken[group[gone]] = True
            leave = broken[group]
            if estimate:  # a copy that leaves unbroken keeps what it found
                left = (leave & ~now).nonzero().squeeze(1)
                adv_all[active[left]] = torch.where(_v(acc_best[left] < 1), x_best_adv[left], x[left])
                acc_all[active[left]] = acc_best[left]
        keep = (~leave).nonzero().squeeze(1)
        active, x, y, x_adv, x_adv_old, x_best, grad, grad_best = (
            t[keep] for t in (active, x, y, x_adv, x_adv_old, x_best, grad, grad_best))
        target = target[keep] if target is not None else None
        group = group[keep] if group is not None else None
        threat = threat_all.subset(active)
        loss_steps, loss_indiv, loss_best = loss_steps[:, keep], loss_indiv[keep], loss_best[keep]
        step_size, loss_best_last_check = step_size[keep], loss_best_last_check[keep]
        reduced_last_check = reduced_last_check[keep]
        if estimate:
            x_best_adv, acc_best = x_best_adv[keep], acc_best[keep]
        return keep.numel() > 0

    def finish() -> tuple[Tensor, Tensor]:
        if not compact:
            return torch.where(_v(acc_best < 1), x_best_adv, x_out), acc_best
        if estimate and active.numel():  # samples still in the batch: their best iterate
            adv_all[active] = torch.where(_v(acc_best < 1), x_best_adv, x)
            acc_all[active] = acc_best
        return adv_all, acc_all

    if compact and bool((acc == 0).any()) and not retire(acc == 0):
        return finish()
    for i in range(steps):
        grad2 = x_adv - x_adv_old
        x_adv_old = x_adv
        a = 0.75 if i > 0 else 1.0
        z = _apgd_project(threat, x_adv + step_size * _apgd_direction(threat, grad), x)
        x_adv = _apgd_project(threat, x_adv + (z - x_adv) * a + grad2 * (1 - a), x)

        rate, loss_indiv, grad = counter.success_and_grad(x_adv, loss_fn, y, target, fooling)
        acc = 1 - rate
        if not compact or estimate:
            better = (acc <= acc_best) & (acc < 1)
            x_best_adv = torch.where(_v(better), x_adv, x_best_adv)
            acc_best = torch.minimum(acc_best, acc)
        if compact and bool((acc == 0).any()) and not retire(acc == 0):
            return finish()

        loss_steps[i] = loss_indiv
        improved = loss_indiv > loss_best
        x_best = torch.where(_v(improved), x_adv, x_best)
        grad_best = torch.where(_v(improved), grad, grad_best)
        loss_best = torch.where(improved, loss_indiv, loss_best)

        counter3 += 1
        if counter3 == k:
            # Oscillation check: count loss increases over the last k iterations (reference indexing,
            # including its wrap-around to the last row at the first checkpoint).
            increases = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
            for c5 in range(k):
                increases += (loss_steps[i - c5] > loss_steps[i - c5 - 1]).to(x.dtype)
            osc = increases <= k * rho
            no_impr = ~reduced_last_check & (loss_best_last_check >= loss_best)
            reduce = osc | no_impr
            reduced_last_check = reduce
            loss_best_last_check = loss_best.clone()
            step_size = torch.where(_v(reduce), step_size / 2.0, step_size)
            x_adv = torch.where(_v(reduce), x_best, x_adv)
            grad = torch.where(_v(reduce), grad_best, grad)
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return finish()


class _APGDBase(Attack):
    loss_name = "ce"

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float | Tensor = 8 / 255, steps: int = 100,
                 restarts: int = 1, rho: float = 0.75, compact: bool = True, eot: int = 1, seed: int | None = 0,
                 bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        if str(norm).lower() not in ("linf", "l2", "inf"):
            raise InputError(f"APGD supports norms linf and l2, got {norm!r}")
        check_positive_int(steps, "steps")
        check_positive_int(restarts, "restarts")
        self.threat = make_threat(norm, eps)
        self.steps, self.restarts, self.rho = steps, restarts, rho
        # a sample leaves the working batch at its first fooling iterate (same fooled set, fewer passes)
        self.compact = bool(compact)
        check_positive_int(eot, "eot")
        self.eot = eot  # gradients averaged over eot passes (randomised models; AutoAttack's rand version uses 20)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "steps": self.steps, "restarts": self.restarts, "compact": self.compact,
                "eot": self.eot}


@ATTACKS.register("apgd-ce")
class APGD(_APGDBase):
    """APGD with the cross-entropy loss (untargeted); `loss="dlr"` gives APGD-DLR, `loss="pm"` APGD on PMA's
    probability margin."""

    name = "apgd-ce"
    forwards_options_to = (_APGDBase,)

    def __init__(self, model: nn.Module, *, loss: str = "ce", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        check_choice(loss, "APGD loss", tuple(APGD_LOSSES))
        self.loss_name = loss
        self.loss_fn = APGD_LOSSES[loss]

    def _run(self, counter, x, y, target, gen):
        return apgd_restarts(counter, x, y, threat=self.threat, loss_fn=self.loss_fn, steps=self.steps,
                             rho=self.rho, restarts=self.restarts, generator=gen, compact=self.compact)


@ATTACKS.register("apgd-dlr")
class APGDDLR(APGD):
    """APGD with the difference-of-logits-ratio loss (untargeted)."""

    name = "apgd-dlr"
    forwards_options_to = (_APGDBase,)  # loss is fixed to dlr

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, loss="dlr", **kwargs)


def apgd_restarts(counter, x, y, *, threat, loss_fn, steps, rho, restarts, generator, compact=False):
    """Restarts (and, for APGD-T, targets) run only on points the model may still classify correctly: accuracy
    above 0 (with eot > 1, by the EoT estimate); a restart's point replaces the kept one only where it estimates
    a lower accuracy."""
    acc = counter.accuracy(x, y)
    x_adv = x.clone()
    for _ in range(restarts):
        idx = (acc > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        adv, acc_run = apgd_single_run(counter, x[idx], y[idx], threat=threat.subset(idx), loss_fn=loss_fn,
                                       steps=steps, rho=rho, generator=generator, compact=compact)
        x_adv[idx] = torch.where(_v(acc_run < acc[idx]), adv, x_adv[idx])
        acc[idx] = torch.minimum(acc[idx], acc_run)
    return _out(counter, x_adv, acc)


def _out(counter: PassCounter, x_adv: Tensor, acc: Tensor) -> AttackOut:
    """The result of an APGD attack from each point's estimated accuracy: success where the estimate is below
    one half (with eot=1: fooled); the estimates themselves when they are EoT estimates (eot > 1)."""
    return AttackOut(x_adv, acc < 0.5, accuracy=acc if counter.eot > 1 else None)


# MALT (Melamed, Yehudai & Shamir, "MALT Powers Up Adversarial Attacks", NeurIPS 2024): the paper's setting
MALT_TARGETS = 5  # c: targets attacked per image
MALT_CANDIDATES = 100  # a: the highest-logit classes scored (all of them with fewer classes)
TARGETINGS = ("rank", "malt")


def malt_targets(counter: PassCounter, x: Tensor, y: Tensor, norm: str, n_targets: int,
                 candidates: int = MALT_CANDIDATES) -> Tensor:
    """(N, n_targets) target classes per image, best first, by MALT's mesoscopic almost-linearity score: among the
    `candidates` highest-logit classes j != y, the logit gap z_y - z_j divided by the dual norm (l_1 for l_inf, l_2
    for l_2) of its input gradient, smallest first. For a linear classifier that is exactly the distance from x to
    the boundary between y and j; for a network, its linearisation at x. One forward and one backward per
    candidate (the candidates' gradients are taken from one graph)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = counter.logits(x)
        k = logits.shape[1]
        others = logits.detach().scatter(1, y[:, None], -torch.inf)
        n_cand = min(max(candidates, n_targets), k - 1)
        cand = others.topk(n_cand, dim=1).indices  # (N, n_cand), by logit
        z_y = logits.gather(1, y[:, None])
        scores = []
        for c in range(n_cand):
            gap = z_y[:, 0] - logits.gather(1, cand[:, c:c + 1])[:, 0]
            g = counter.grad(gap.sum(), x, retain_graph=c < n_cand - 1).flatten(1)
            dual = g.abs().sum(1) if norm == "linf" else g.norm(dim=1)
            scores.append(gap.detach() / (dual + _TINY))
    order = torch.stack(scores, 1).argsort(dim=1, stable=True)  # ties: the higher logit first
    return cand.gather(1, order[:, :n_targets])


@ATTACKS.register("apgd-t")
class APGDT(_APGDBase):
    """Targeted APGD on the targeted DLR loss, one run per target class.

    targeting: "rank" (AutoAttack's): the 2nd..(n_targets+1)-th largest clean logits, n_targets 9 by default;
    "malt": MALT's choice (`malt_targets`), the classes nearest the decision boundary by the gradient-normalised
    logit gap, n_targets 5 (the paper's c) by default, scored among the `malt_candidates` highest-logit classes.
    targets_at_once: how many targets run side by side in one working batch (copies of the images, one per
    target; memory grows with it); None: as many as fit a budget on a GPU, one on a CPU (`base.targets_at_once`).
    Every (target, restart) copy draws its random start from its own stream, and an image is broken iff one of
    its copies fools the model, so the broken set does not depend on this setting; running targets together pays
    on GPUs, where small batches leave the device idle.
    """

    name = "apgd-t"
    forwards_options_to = (_APGDBase,)

    def __init__(self, model: nn.Module, *, n_targets: int | None = None, targeting: str = "rank",
                 malt_candidates: int = MALT_CANDIDATES, targets_at_once: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        check_choice(targeting, "apgd-t targeting", TARGETINGS)
        if n_targets is None:
            n_targets = 9 if targeting == "rank" else MALT_TARGETS
        check_positive_int(n_targets, "n_targets")
        check_positive_int(malt_candidates, "malt_candidates")
        if targeting == "rank" and malt_candidates != MALT_CANDIDATES:
            raise InputError(f"malt_candidates={malt_candidates} applies to targeting='malt' only (targeting is "
                             f"{targeting!r})")
        if targets_at_once is not None:
            check_positive_int(targets_at_once, "targets_at_once")
        self.n_targets, self.targets_at_once = n_targets, targets_at_once
        self.targeting, self.malt_candidates = targeting, malt_candidates

    def describe(self) -> dict[str, Any]:
        extra = {"malt_candidates": self.malt_candidates} if self.targeting == "malt" else {}
        return {**super().describe(), "n_targets": self.n_targets, "targets_at_once": self.targets_at_once,
                "targeting": self.targeting, **extra}

    def _run(self, counter, x, y, target, gen):
        with torch.no_grad():
            clean_logits = counter.logits(x)
        n_targets = min(self.n_targets, clean_logits.shape[1] - 1)
        # accuracy per image (the EoT estimate with eot > 1); an image is attacked while it is above 0
        acc = (clean_logits.argmax(1) == y).to(x.dtype)
        if counter.eot > 1:
            acc = counter.accuracy(x, y)
        # targets[i, p]: image i's target of position p (best first)
        if self.targeting == "rank":
            targets = clean_logits.sort(dim=1)[1].flip(1)[:, 1:n_targets + 1]
        else:
            targets = torch.zeros(x.shape[0], n_targets, dtype=torch.long, device=x.device)
            live = (acc > 0).nonzero().squeeze(1)
            if live.numel():
                targets[live] = malt_targets(counter, x[live], y[live], self.threat.norm, n_targets,
                                             self.malt_candidates)
        x_adv = x.clone()
        base = int(rng.randint(2**62, (1,), generator=gen, device=gen.device).item())  # copies' streams
        at_once = targets_at_once(self.targets_at_once, n_targets, x, int((acc > 0).sum()))
        for restart in range(self.restarts):
            for c in range(0, n_targets, at_once):
                chunk = list(range(c, min(c + at_once, n_targets)))
                idx = (acc > 0).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return _out(counter, x_adv, acc)
                # a copy's start: drawn for the whole batch from the (position, restart) stream, so it does not
                # depend on which images are still robust or which targets run beside it
                starts = torch.cat([_apgd_noise(self.threat.norm, x, rng.device_generator(
                    x.device, mix_seed(base, p + 2, restart)))[idx] for p in chunk])
                m, rows = idx.numel(), idx.repeat(len(chunk))
                adv, acc_run = apgd_single_run(
                    counter, x[rows], y[rows], threat=self.threat.subset(rows), loss_fn=dlr_targeted_loss,
                    steps=self.steps, rho=self.rho, target=torch.cat([targets[idx, p] for p in chunk]),
                    start=starts, group=torch.arange(m, device=x.device).repeat(len(chunk)), compact=self.compact)
                acc_run = acc_run.view(len(chunk), m)
                first = (-acc_run).argmax(0)  # the first target (in order) with the lowest estimate
                adv = adv.view(len(chunk), m, *x.shape[1:])[first, torch.arange(m, device=x.device)]
                acc_run = acc_run[first, torch.arange(m, device=x.device)]
                x_adv[idx] = torch.where(_v(acc_run < acc[idx]), adv, x_adv[idx])
                acc[idx] = torch.minimum(acc[idx], acc_run)
        return _out(counter, x_adv, acc)
