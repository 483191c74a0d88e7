"""Integrity checks of a robustness evaluation: signs that a robust accuracy is too high to be trusted.

The checks of the reference AutoAttack (`checks.py`) and of the field's guidelines (Athalye et al., ICML 2018;
Carlini et al., "On Evaluating Adversarial Robustness", 2019), run cheaply on a probe of at most
`n_probe` clean-correct images of the first batch:

- `output_probabilities`: the model returns probabilities (rows non-negative, summing to 1), not logits.
- `zero_gradient`: the fraction of *entries* of the input gradient that are exactly zero, at a random point of
  the threat model around each probe image (at the clean image a ReLU network legitimately has dead regions,
  e.g. MNIST's background; a quantising or otherwise non-differentiable model has zero gradient everywhere in
  the ball), and the fraction of images whose whole gradient is zero.
- `unbounded`: PGD (margin loss) with a budget covering the whole [0, 1] box must reach ~0% accuracy; a model
  that survives it is hiding its gradient (or the attack is broken).
- `black_box`: Square, a score-based attack that never reads gradients, on the images every white-box attack of
  the same threat model failed on: if it breaks a noticeable share, the gradients mislead the white-box attacks.
- `eps_curve`: robust accuracy of PGD-20 at 1/4, 1/2 and 1x the budget and unbounded must not rise with eps;
  likewise across attacks of the same kind and norm in the panel at different budgets.

Each failed check adds a line to `flags`, sets `ok` to false and raises an `IntegrityWarning`. The thresholds
are deliberately loose (a flag means "do not trust this number", not "probably fine").

The probe's cost follows the evaluation's (`mode`): "full" runs FULL_PLAN (100 images, PGD-20 at three budgets,
PGD-50 unbounded, Square with 1,000 queries); "quick" (the default) shrinks it until its passes are at most
PROBE_SHARE of the panel's own (an AutoAttack-sized panel affords the full probe), down to MIN_PLAN; "off" skips
it, with a warning that masking goes unchecked.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack, PassCounter, attack_mode
from robustlab.errors import IntegrityWarning
from robustlab.losses import ce_loss
from robustlab.threat import make_threat

N_PROBE = 100
ZERO_GRADIENT_FLAG = 0.25  # share of exactly-zero gradient entries at random points of the ball
UNBOUNDED_FLAG = 0.02  # accuracy an unbounded attack may leave (noise of a 50-step attack on a few images)
# share of the probe that Square may break after every white-box attack failed: a weak PGD leaves a few images
# that a black-box search finds (2 of 120 on an honest CNN after PGD-10); masking leaves most of them
BLACK_BOX_FLAG = 0.03
MONOTONE_TOLERANCE = 0.01  # accuracy may rise by at most this much (or one image) between budgets
BLACK_BOX_QUERIES = 1000
CURVE_FRACTIONS = (0.25, 0.5, 1.0)
GRADIENT_FREE = ("square", "salt-pepper", "gaussian-noise")  # attacks that never read gradients
MIXED = ("autoattack",)  # white-box and black-box together: neither side of the black-box comparison


INTEGRITY_MODES = ("quick", "full", "off")
PROBE_SHARE = 0.25  # "quick": the probe's passes at most this share of the panel's
AUTOATTACK_SIZED = 1000  # passes per attacked image from which "quick" runs the full probe (AutoAttack: thousands)


@dataclass(frozen=True)
class ProbePlan:
    """How much the probe does: images, PGD steps of the eps curve and of the unbounded attack, Square queries
    (0: no black-box check)."""

    n_probe: int
    curve_steps: int
    unbounded_steps: int
    square_queries: int

    def passes(self, n_norms: int) -> int:
        """Image-passes (forward + backward) the probe spends at most: the zero-gradient check, and per norm the
        eps curve, the unbounded attack and Square on every image (an upper bound: Square runs on survivors)."""
        per_norm = 2 * len(CURVE_FRACTIONS) * (self.curve_steps + 1) + 2 * (self.unbounded_steps + 1) + \
            self.square_queries
        return self.n_probe * (2 + n_norms * per_norm)


FULL_PLAN = ProbePlan(N_PROBE, 20, 50, BLACK_BOX_QUERIES)
MIN_PLAN = ProbePlan(8, 5, 10, 0)


def probe_plan(mode: str, panel_passes: float, n_norms: int, per_image: float = 0.0) -> ProbePlan:
    """The probe for a mode: FULL_PLAN, or ("quick") the largest plan within PROBE_SHARE of `panel_passes` (the
    panel's image-passes on this evaluation), halving Square's queries, then the images, then the steps. A panel
    of AutoAttack's size (`per_image`, its passes per attacked image, >= AUTOATTACK_SIZED) gets the full probe:
    those are the evaluations whose numbers get published."""
    if mode == "full" or per_image >= AUTOATTACK_SIZED:
        return FULL_PLAN
    plan, budget = FULL_PLAN, PROBE_SHARE * panel_passes
    while plan.passes(max(n_norms, 1)) > budget and plan != MIN_PLAN:
        if plan.square_queries > 100:
            plan = replace(plan, square_queries=plan.square_queries // 2)
        elif plan.n_probe > MIN_PLAN.n_probe:
            plan = replace(plan, n_probe=max(MIN_PLAN.n_probe, plan.n_probe // 2))
        elif plan.curve_steps > MIN_PLAN.curve_steps or plan.unbounded_steps > MIN_PLAN.unbounded_steps:
            plan = replace(plan, curve_steps=max(MIN_PLAN.curve_steps, plan.curve_steps // 2),
                           unbounded_steps=max(MIN_PLAN.unbounded_steps, plan.unbounded_steps // 2))
        else:
            plan = replace(plan, square_queries=0)
    return plan


def attack_budget(atk: Attack) -> float | None:
    """The scalar budget of a bounded attack (None for unbounded minimal attacks and per-pixel budgets)."""
    eps = atk.eps if atk.threat is not None else getattr(atk, "eps_value", None)
    if eps is None or isinstance(eps, Tensor):
        return None
    return float(eps)


def _white_box(atk: Attack) -> bool:
    """Reads gradients only: neither a black-box attack nor a panel with a black-box stage (AutoAttack standard's
    Square; version=fast has none)."""
    if atk.name in MIXED:
        return getattr(atk, "version", None) == "fast"
    return atk.name not in GRADIENT_FREE


def _unbounded_eps(norm: str, x: Tensor) -> float:
    d = x[0].numel()
    return {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[norm]


def _pgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float, steps: int, loss: str,
                  seed: int) -> float:
    from robustlab.attacks.pgd import PGD

    step_size = 2.5 * eps / steps if norm != "l1" else max(eps / steps, 1.0)
    x_adv = PGD(model, norm=norm, eps=eps, steps=steps, step_size=step_size, loss=loss, seed=seed)(x, y)
    with attack_mode(model), torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def finish_integrity(probe: dict[str, Any], panel: Sequence[Sequence[Any]], accuracies: dict[str, float]) -> dict[str, Any]:
    """The probe's result (first batch) plus the panel-wide check on the final accuracies: the same attack and norm
    at a larger budget must not leave more images robust. Sets `ok` and warns once per flag."""
    out = {**probe, "flags": list(probe["flags"])}
    flags = out["flags"]
    series: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for name, kind, norm, eps in panel:
        if eps is not None and norm:
            series.setdefault((kind, norm), []).append((eps, accuracies[name], name))
    for (kind, norm), pts in series.items():
        pts.sort()
        for (e0, a0, n0), (e1, a1, n1) in zip(pts, pts[1:]):
            if e1 > e0 and a1 > a0 + MONOTONE_TOLERANCE:
                flags.append(f"{kind} {norm}: robust accuracy rises from {a0:.1%} at eps {e0:g} ({n0}) to {a1:.1%} at "
                             f"eps {e1:g} ({n1})")
    out["ok"] = not flags
    for f in flags:
        warnings.warn(f, IntegrityWarning, stacklevel=4)  # the caller of evaluate / merge_evaluations (engine.tasks)
    return out


def bounded_norms(attacks: Sequence[tuple[str, Attack]]) -> dict[str, float]:
    """The largest scalar budget of the panel per norm (what the probe checks)."""
    bounded: dict[str, float] = {}
    for _, atk in attacks:
        eps = attack_budget(atk)
        if atk.norm in ("linf", "l2", "l1") and eps is not None and eps > 0:
            bounded[atk.norm] = max(bounded.get(atk.norm, 0.0), eps)
    return bounded


def probe_integrity(model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[tuple[str, Attack]],
                    robust_first_batch: dict[str, Tensor], *, plan: ProbePlan = FULL_PLAN, mode: str = "full",
                    seed: int = 0) -> dict[str, Any]:
    """The checks that need the model, on a probe of the first batch (no warnings yet: `finish_integrity`)."""
    start = time.perf_counter()
    flags: list[str] = []
    with attack_mode(model), torch.no_grad():
        logits = model(x)
    correct = logits.argmax(1) == y
    probe = correct.nonzero().squeeze(1)[:plan.n_probe]
    out: dict[str, Any] = {"mode": mode, "plan": asdict(plan), "n_probe": int(probe.numel())}

    probs = bool((logits >= 0).all()) and bool(torch.allclose(logits.sum(1), torch.ones_like(logits[:, 0]), atol=1e-4))
    out["output_probabilities"] = probs
    if probs:
        flags.append("the model outputs probabilities (rows are non-negative and sum to 1), not logits: "
                     "cross-entropy attacks see a squashed loss; remove the final softmax")

    bounded = bounded_norms(attacks)

    if probe.numel():
        xp, yp = x[probe], y[probe]
        gen = rng.device_generator(x.device, seed)
        norm, eps = next(iter(bounded.items())) if bounded else ("linf", 0.0)
        x0 = make_threat(norm, eps).random_init(xp, gen) if eps > 0 else xp
        with attack_mode(model):
            _, _, g = PassCounter(model).loss_and_grad(x0, ce_loss, yp)
        zero_entries = (g == 0).float().mean().item()
        zero_images = (g.flatten(1).abs().amax(1) == 0).float().mean().item()
        out["zero_gradient"] = {"entries": zero_entries, "images": zero_images,
                                "at": f"random points of the {norm} ball eps={eps:g}" if eps > 0 else "clean images"}
        if zero_entries > ZERO_GRADIENT_FLAG or zero_images > 0:
            flags.append(f"{zero_entries:.0%} of the input-gradient entries ({zero_images:.0%} of the images "
                         f"entirely) are exactly zero: gradient masking or a non-differentiable model; "
                         f"gradient-based robust accuracy is overestimated")

        per_norm: dict[str, Any] = {}
        for i, (norm, eps) in enumerate(bounded.items()):
            entry: dict[str, Any] = {"eps": eps}
            curve_eps = [eps * f for f in CURVE_FRACTIONS] + [_unbounded_eps(norm, xp)]
            curve = [_pgd_accuracy(model, xp, yp, norm, e, plan.curve_steps, "ce", seed + i) for e in curve_eps[:-1]]
            curve.append(_pgd_accuracy(model, xp, yp, norm, curve_eps[-1], plan.unbounded_steps, "cw", seed + i))
            entry["eps_curve"] = {"eps": curve_eps, "accuracy": curve,
                                  "attack": f"PGD-{plan.curve_steps} (CE); unbounded: PGD-{plan.unbounded_steps} "
                                            "(CW margin)"}
            entry["unbounded_accuracy"] = curve[-1]
            tol = max(MONOTONE_TOLERANCE, 1.0 / probe.numel())
            if curve[-1] > UNBOUNDED_FLAG:
                flags.append(f"{norm}: PGD with an unbounded budget (eps {curve_eps[-1]:g}) leaves {curve[-1]:.0%} of "
                             f"the probe images correctly classified (expected ~0%): gradient masking or a broken "
                             f"attack")
            rises = [(curve_eps[j], curve_eps[j + 1]) for j in range(len(curve) - 1) if curve[j + 1] > curve[j] + tol]
            if rises:
                a, b = rises[0]
                flags.append(f"{norm}: robust accuracy rises with the budget (PGD-{plan.curve_steps} at eps {a:g} -> "
                             f"{b:g}): the attack "
                             f"is not converging (gradient masking or a bad step size)")
            if norm in ("linf", "l2") and plan.square_queries:
                white = [name for name, atk in attacks if atk.norm == norm and _white_box(atk)
                         and attack_budget(atk) == eps]
                if white:
                    survived = torch.stack([robust_first_batch[n][probe] for n in white]).all(0)
                    cand = survived.nonzero().squeeze(1)
                    broken = 0
                    if cand.numel():
                        from robustlab.attacks.square import Square

                        sq = Square(model, norm=norm, eps=eps, n_queries=plan.square_queries, seed=seed)
                        fooled = sq.run(xp[cand], yp[cand]).success
                        broken = int(fooled.sum()) if fooled is not None else 0
                    entry["black_box"] = {"attack": f"square ({plan.square_queries} queries)", "after": white,
                                          "candidates": int(cand.numel()), "broken": broken}
                    if broken > max(2, BLACK_BOX_FLAG * probe.numel()):
                        flags.append(f"{norm} eps {eps:g}: Square (black-box, no gradients) broke {broken} of the "
                                     f"{cand.numel()} probe images that every white-box attack ({', '.join(white)}) "
                                     f"failed on: the gradients mislead the attacks, the white-box numbers are too high")
            per_norm[norm] = entry
        out["per_norm"] = per_norm

    out["flags"] = flags
    out["seconds"] = time.perf_counter() - start
    return out


__all__ = ["probe_integrity", "finish_integrity", "attack_budget", "bounded_norms", "probe_plan", "ProbePlan",
           "FULL_PLAN", "MIN_PLAN", "INTEGRITY_MODES", "N_PROBE"]
