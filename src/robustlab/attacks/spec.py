"""Attack specifications as strings: "name:key=value,key=value" (the CLI's --attack syntax).

Values are parsed as Python literals (never evaluated as code); "a/b" is accepted as a fraction
(eps=8/255); anything else stays a string (norm=linf): `validation.parse_assignment`, the one key=value parser.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from robustlab.errors import AttackSpecError
from robustlab.registry import ATTACKS
from robustlab.validation import parse_assignment


def parse_spec(spec: str, registry=ATTACKS) -> tuple[str, dict[str, Any]]:
    """'name:key=value,...' -> (name, {key: literal}) for any registry (attacks, datasets)."""
    kind = registry.kind
    if not isinstance(spec, str) or not spec.strip():
        raise AttackSpecError(f"empty {kind} specification {spec!r}; expected 'name:key=value,...'")
    name, _, rest = spec.partition(":")
    name = name.strip()
    registry.get(name)  # fails listing valid names
    return name, _options(rest, f"{kind} spec {spec!r}")


def _options(rest: str, where: str) -> dict[str, Any]:
    """'key=value,...' -> {key: literal}; a key given twice is an error (which value was meant?)."""
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, value = parse_assignment(part, where, AttackSpecError)
        if key in kwargs:
            raise AttackSpecError(f"option {key!r} is given twice in {where} ({kwargs[key]!r} and {value!r}); "
                                  "give it once")
        kwargs[key] = value
    return kwargs


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pgd:norm=linf,eps=0.3,steps=40' -> ('pgd', {'norm': 'linf', 'eps': 0.3, 'steps': 40})."""
    return parse_spec(spec, ATTACKS)


# Named classifier panels: the evaluation protocols of the seed papers, usable wherever a list of attack specs
# is (`robustlab eval --attack critic-rho`, `--attack part:eps=0.3,step_size=0.01`). A panel takes options like an
# attack spec. Detection panels live in robustlab.detection.attacks.
def _critic_rho() -> list[str]:
    """Adversary critic, Table 1 (critic.md 8): minimal l_2 perturbations reported as rho = ||r||_2 / ||x||_2."""
    return ["deepfool:steps=500,max_step=0.1,project=true", "cw:steps=1000", "critic"]


def _part(eps: float = 8 / 255, step_size: float = 2 / 255, aa_impl: str = "robustlab") -> list[str]:
    """PART's table (part.md 9): PGD-20 (uniform start), MMA (3 targets, 20 steps, confidence 50) and
    AutoAttack standard at l_inf eps; the training step is the attack step. aa_impl=torchattacks for the
    10-iteration AutoAttack the published numbers used."""
    return [f"pgd:norm=linf,eps={eps!r},steps=20,step_size={step_size!r}",
            f"mma:eps={eps!r},steps=20,step_size={step_size!r},k=3,confidence=50",
            f"autoattack:norm=linf,eps={eps!r},impl={aa_impl}"]


def _multi_norm(eps_linf: float = 8 / 255, eps_l2: float = 128 / 255, eps_l1: float = 2000 / 255,
                autoattack: bool = True, ead_steps: int = 1000, sapa_steps: int = 1000, cw_steps: int = 200,
                noise_repeats: int = 100, brendel_bethge: bool = True, bb_steps: int = 1000) -> list[str]:
    """MNG-AC's multi-perturbation protocol (mng_ac.md 6.1): per norm, PGD with the evaluation steps (l_inf 50 x
    eps/8, l_2 50 x eps*25/128, l_1 SLIDE 100 x eps*255/2000: the official code's steps at CIFAR budgets,
    scaled with the budget), AutoAttack standard for l_inf and l_2, Brendel-Bethge for l_inf and l_2 (bb_steps,
    foolbox's 1,000 by default), C&W l_2 (5 binary steps x cw_steps, foolbox's settings) and additive Gaussian
    noise (noise_repeats draws) in the l_2 group, and the l_1 attacks EAD and salt-and-pepper; the minimisation
    attacks are judged inside their ball as foolbox judges them. `evaluate` reports per attack, per norm (worst case
    over that norm's attacks), the union over all, and the average of the per-norm accuracies. autoattack=false
    and brendel_bethge=false for a quick run (the two cost the most)."""
    specs = [f"pgd:norm=linf,eps={eps_linf!r},steps=50,step_size={eps_linf / 8!r}",
             f"brendel-bethge:norm=linf,eps={eps_linf!r},steps={bb_steps}",
             f"pgd:norm=l2,eps={eps_l2!r},steps=50,step_size={eps_l2 * 25 / 128!r}",
             f"brendel-bethge:norm=l2,eps={eps_l2!r},steps={bb_steps}",
             f"cw:eps={eps_l2!r},steps={cw_steps},binary_steps=5",
             f"gaussian-noise:eps={eps_l2!r},repeats={noise_repeats}",
             f"pgd:norm=l1,eps={eps_l1!r},steps=100,step_size={eps_l1 * 255 / 2000!r}",
             f"ead:eps={eps_l1!r},steps={ead_steps}",
             f"salt-pepper:eps={eps_l1!r},steps={sapa_steps}"]
    if not brendel_bethge:
        specs = [s for s in specs if not s.startswith("brendel-bethge:")]
    if autoattack:
        specs.insert(1, f"autoattack:norm=linf,eps={eps_linf!r}")
        specs.insert(specs.index(next(s for s in specs if s.startswith("pgd:norm=l2"))) + 1,
                     f"autoattack:norm=l2,eps={eps_l2!r}")
    return specs


PANELS = {"critic-rho": _critic_rho, "part": _part, "multi-norm": _multi_norm}


def expand_panels(specs: list[str]) -> list[str]:
    """Replace panel names (with options) by their attack specs (order kept, duplicates dropped)."""
    out: list[str] = []
    for s in specs:
        name, _, rest = s.strip().partition(":")
        if name in PANELS:
            kwargs = _options(rest, f"panel spec {s!r}")
            valid = list(inspect.signature(PANELS[name]).parameters)
            unknown = [k for k in kwargs if k not in valid]
            if unknown:
                raise AttackSpecError(f"panel {name!r} has no option {', '.join(map(repr, unknown))}; valid options: "
                                      f"{', '.join(valid) or '(none)'}")
            items = PANELS[name](**kwargs)
        else:
            items = [s]
        for item in items:
            if item not in out:
                out.append(item)
    return out


def create_attack(name_or_spec: str, model: nn.Module, **overrides: Any):
    """Build an attack from its registry name or a full spec string; unknown options raise TypeError."""
    name, kwargs = parse_attack_spec(name_or_spec)
    kwargs.update(overrides)
    return ATTACKS.create(name, model, **kwargs)
