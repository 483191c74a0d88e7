"""FAB: fast adaptive boundary attack (Croce & Hein, ICML 2020, arXiv:1907.02044); l_inf and l_2.

Minimal-norm attack: linearise the boundary between the current class and the chosen class, project
onto it under the box constraint from the current point and from the original point, take a convex
combination biased towards the original, and step back towards the original after every success
(baselines.md 2.6). Untargeted FAB uses the closest boundary over all classes (one backward per
class); FAB-T (`targeted=True`, AutoAttack's version) runs one restart per target ranked 2..10, each linearising
the boundary to its target; as in the reference, any misclassified point counts as adversarial.
With a finite eps, a success counts only if its norm is <= eps; norms are always reported.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.base import Attack, PassCounter, targets_at_once
from robustlab.errors import InputError
from robustlab.registry import ATTACKS
from robustlab.threat import make_threat, per_sample_norm
from robustlab.types import AttackOut
from robustlab.validation import check_eps, check_positive_int


def _solve_capped_linear(a: Tensor, cap: Tensor, c: Tensor) -> Tensor:
    """Smallest lam >= 0 with h(lam) = sum_i min(lam * a_i, cap_i) >= c (a, cap >= 0; rows are samples).

    h is piecewise linear and increasing; breakpoints lam_i = cap_i / a_i are sorted and the active
    segment solved exactly. Returns inf where c exceeds sum(cap) (the target is out of the box's reach).
    """
    bp = torch.where(a > 0, cap / a.clamp_min(1e-30), torch.full_like(a, float("inf")))
    bp, order = bp.sort(dim=1)
    a_s, cap_s = a.gather(1, order), cap.gather(1, order)
    cap_before = torch.cumsum(cap_s, 1) - cap_s  # sum of caps of coordinates saturated before breakpoint j
    a_after = a_s.flip(1).cumsum(1).flip(1)  # sum of slopes of coordinates not yet saturated at j
    h_at_bp = cap_before + torch.where(torch.isfinite(bp), bp, torch.zeros_like(bp)) * a_after
    h_at_bp = torch.where(torch.isfinite(bp), h_at_bp, torch.full_like(bp, float("inf")))
    j = (h_at_bp < c[:, None]).sum(1).clamp(max=a.shape[1] - 1)  # first breakpoint reaching c
    lam = (c - cap_before.gather(1, j[:, None]).squeeze(1)) / a_after.gather(1, j[:, None]).squeeze(1).clamp_min(1e-30)
    reachable = c <= cap.sum(1)
    lam = torch.where(reachable, lam.clamp_min(0), torch.full_like(lam, float("inf")))
    return torch.where(c <= 0, torch.zeros_like(lam), lam)


def project_hyperplane_box(p: Tensor, w: Tensor, b: Tensor, norm: str) -> Tensor:
    """Minimal-norm d with w.(p + d) = b and 0 <= p + d <= 1 (best effort if the box forbids it).

    p, w: (N, D); b: (N,). norm: 'l2' or 'linf'. Exact up to float rounding.
    """
    c = b - (w * p).sum(1)
    s = torch.where(c < 0, -torch.ones_like(c), torch.ones_like(c))
    ws = w * s[:, None]  # now solve ws.d = |c| >= 0
    c = c.abs()
    room = torch.where(ws > 0, 1 - p, p)  # how far each coordinate can move in the helpful direction
    if norm == "l2":
        a = ws * ws
        lam = _solve_capped_linear(a, a.sqrt() * room, c)
        step = torch.where(torch.isfinite(lam)[:, None], lam[:, None] * ws.abs(), room)
        return ws.sign() * torch.minimum(step, room)
    a = ws.abs()
    t = _solve_capped_linear(a, a * room, c)
    step = torch.where(torch.isfinite(t)[:, None], t[:, None].expand_as(room), room)
    return ws.sign() * torch.minimum(step, room)


def _diff_and_grad(counter: PassCounter, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """df (N, K') = z_j - z_y and dg (N, K', D) their input gradients; K' = 1 for a target, else all K."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = counter.logits(xg)
        z_y = logits.gather(1, y[:, None])
        if target is not None:
            diff = logits.gather(1, target[:, None]) - z_y
            g = counter.grad(diff.sum(), xg)
            return diff.detach(), g.flatten(1)[:, None, :]
        diffs = logits - z_y
        grads = [counter.grad(diffs[:, j].sum(), xg, retain_graph=j < logits.shape[1] - 1)
                 for j in range(logits.shape[1])]
    return diffs.detach(), torch.stack([g.flatten(1) for g in grads], 1)


def fab_single_run(counter: PassCounter, x: Tensor, y: Tensor, *, norm: str, steps: int, target: Tensor | None,
                   alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                   stop_at: float | None = None, group: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One FAB run from the clean point. Returns (best adversarial x, its norm; inf where none found).

    stop_at: a sample leaves the working batch once it has an adversarial point of norm <= stop_at (its norm is
    then not refined further: enough for "fooled within eps", one host sync per step).
    group: rows that are copies of one image (FAB-T's targets side by side): with stop_at, all copies leave once
    one of them is done.
    """
    n = x.shape[0]
    shape = x.shape
    x0 = x.flatten(1)
    x1 = x0.clone()
    best = x0.clone()
    best_norm = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    best_all, best_norm_all = best.clone(), best_norm.clone()
    active = torch.arange(n, device=x.device)
    p_norm = "l2" if norm == "l2" else "linf"
    for _ in range(steps):
        m = x0.shape[0]
        df, dg = _diff_and_grad(counter, x1.view(-1, *shape[1:]), y, target)
        if target is None:
            size = dg.norm(dim=2) if norm == "l2" else dg.abs().sum(2)
            dist = df.abs() / (size + 1e-12)
            dist.scatter_(1, y[:, None], 1e10)
            j = dist.argmin(1)
        else:
            j = torch.zeros(m, dtype=torch.long, device=x.device)
        w = dg[torch.arange(m, device=x.device), j]
        f = df.gather(1, j[:, None]).squeeze(1)
        b = -f + (w * x1).sum(1)
        d = project_hyperplane_box(torch.cat([x1, x0]), torch.cat([w, w]), torch.cat([b, b]), p_norm)
        d1, d2 = d[:m], d[m:]
        a1, a2 = per_sample_norm(d1, p_norm), per_sample_norm(d2, p_norm)
        alpha = torch.clamp(a1 / (a1 + a2 + 1e-30), 0.0, alpha_max)[:, None]
        x1 = ((x1 + eta * d1) * (1 - alpha) + (x0 + d2 * eta) * alpha).clamp(0.0, 1.0)
        with torch.no_grad():
            pred = counter.logits(x1.view(-1, *shape[1:])).argmax(1)
        is_adv = pred != y  # also with a target: any misclassification counts (spec 2.6, the reference's FAB-T)
        dist_now = per_sample_norm(x1 - x0, p_norm)
        better = is_adv & (dist_now < best_norm)
        best = torch.where(better[:, None], x1, best)
        best_norm = torch.where(better, dist_now, best_norm)
        x1 = torch.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
        if stop_at is not None:
            done = best_norm <= stop_at
            if bool(done.any()):
                best_all[active], best_norm_all[active] = best, best_norm
                if group is not None:  # every copy of a broken image leaves with it
                    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
                    broken[group[done]] = True
                    done = broken[group]
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    return best_all.view(shape), best_norm_all
                active, x0, x1, best, best_norm, y = (t[keep] for t in (active, x0, x1, best, best_norm, y))
                target = target[keep] if target is not None else None
                group = group[keep] if group is not None else None
    best_all[active], best_norm_all[active] = best, best_norm
    return best_all.view(shape), best_norm_all


@ATTACKS.register("fab")
class FAB(Attack):
    """FAB minimal-norm attack, l_inf / l_2. eps=None: unbounded (reports norms); targeted=True: FAB-T."""

    name = "fab"
    no_op_options = {"seed": "deterministic: draws nothing at random (every attack takes a seed)"}
    minimal = True

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float | None = None, steps: int = 100,
                 targeted: bool = False, n_targets: int = 9, targets_at_once: int | None = None,
                 alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, compact: bool = False, seed: int | None = 0, bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        key = str(norm).lower()
        if key not in ("linf", "l2", "inf"):
            raise InputError(f"FAB supports norms linf and l2, got {norm!r}")
        if eps is not None:
            check_eps(eps)
        check_positive_int(steps, "steps")
        check_positive_int(n_targets, "n_targets")
        if targets_at_once is not None:
            check_positive_int(targets_at_once, "targets_at_once")
        if targets_at_once is not None and not targeted:
            raise InputError(f"FAB targets_at_once={targets_at_once} needs targeted=True (untargeted FAB has no "
                             f"targets)")
        self.targets_at_once = targets_at_once
        self._norm = "l2" if key == "l2" else "linf"
        self.threat = make_threat(self._norm, eps) if eps is not None else None
        self.eps_value = eps
        self.steps, self.targeted, self.n_targets = steps, targeted, n_targets
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta
        if compact and eps is None:
            raise InputError("FAB compact=True needs eps: a sample leaves the batch once fooled within eps")
        # off by default: FAB is a minimal-norm attack, and a sample that left stops refining its norm
        self.compact = bool(compact)

    @property
    def norm(self) -> str:
        return self._norm

    def describe(self) -> dict[str, Any]:
        return {**self.execution(), "attack": self.name, "norm": self._norm, "eps": self.eps_value, "steps": self.steps,
                "targeted": self.targeted, "n_targets": self.n_targets, "targets_at_once": self.targets_at_once,
                "compact": self.compact}

    def _run(self, counter, x, y, target, gen):
        eps = float("inf") if self.eps_value is None else float(self.eps_value)
        with torch.no_grad():
            clean = counter.logits(x)
        correct = clean.argmax(1) == y
        x_adv = x.clone()
        norms = torch.where(correct, torch.full_like(y, 0, dtype=x.dtype) + float("inf"), torch.zeros_like(y, dtype=x.dtype))
        kw = dict(norm=self._norm, steps=self.steps, alpha_max=self.alpha_max, eta=self.eta, beta=self.beta,
                  stop_at=eps if self.compact else None)
        if not self.targeted:
            idx = correct.nonzero().squeeze(1)
            if idx.numel():
                adv, nrm = fab_single_run(counter, x[idx], y[idx], target=None, **kw)
                x_adv[idx], norms[idx] = adv, nrm
        else:
            n_targets = min(self.n_targets, clean.shape[1] - 1)
            order = clean.sort(dim=1)[1]
            ranks = list(range(2, n_targets + 2))
            at_once = targets_at_once(self.targets_at_once, n_targets, x, int(correct.sum()))
            for c in range(0, n_targets, at_once):
                chunk = ranks[c:c + at_once]
                # not yet fooled within the budget (norms is inf until an adversarial point is found; with no
                # budget, eps is inf too, so "norms > eps" would never select anything)
                idx = (correct & ~(torch.isfinite(norms) & (norms <= eps))).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                m, rows = idx.numel(), idx.repeat(len(chunk))  # one copy of each image per target
                adv, nrm = fab_single_run(counter, x[rows], y[rows], target=torch.cat([order[idx, -r] for r in chunk]),
                                          group=torch.arange(m, device=x.device).repeat(len(chunk)), **kw)
                nrm, first = nrm.view(len(chunk), m).min(0)  # the smallest norm; ties: the first target
                adv = adv.view(len(chunk), m, *x.shape[1:])[first, torch.arange(m, device=x.device)]
                better = nrm < norms[idx]
                x_adv[idx] = torch.where(better.view(-1, 1, 1, 1), adv, x_adv[idx])
                norms[idx] = torch.where(better, nrm, norms[idx])
        success = correct & torch.isfinite(norms) & (norms <= eps)
        # Outside the budget the attack failed: return x (a minimal-norm result is reported in `norms`).
        if self.eps_value is not None:
            x_adv = torch.where(success.view(-1, 1, 1, 1), x_adv, x)
        return AttackOut(x_adv, success | ~correct, norms=norms)
