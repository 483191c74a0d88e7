"""Attack specifications as strings: "name:key=value,key=value" (the CLI's --attack syntax).

Values are parsed as Python literals (never evaluated as code); "a/b" is accepted as a fraction
(eps=8/255); anything else stays a string (norm=linf).
"""
from __future__ import annotations

import ast
import re
from typing import Any

from torch import nn

from robustlab.registry import ATTACKS

_FRACTION = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def parse_value(text: str) -> Any:
    m = _FRACTION.match(text)
    if m:
        den = float(m.group(2))
        if den == 0:
            raise ValueError(f"division by zero in {text!r}")
        return float(m.group(1)) / den
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text.strip()


def parse_spec(spec: str, registry=ATTACKS) -> tuple[str, dict[str, Any]]:
    """'name:key=value,...' -> (name, {key: literal}) for any registry (attacks, datasets)."""
    kind = registry.kind
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty {kind} specification {spec!r}; expected 'name:key=value,...'")
    name, _, rest = spec.partition(":")
    name = name.strip()
    registry.get(name)  # fails listing valid names
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad option {part!r} in {kind} spec {spec!r}; expected key=value")
        kwargs[key.strip()] = parse_value(value)
    return name, kwargs


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pgd:norm=linf,eps=0.3,steps=40' -> ('pgd', {'norm': 'linf', 'eps': 0.3, 'steps': 40})."""
    return parse_spec(spec, ATTACKS)


# Named classifier panels: the evaluation protocols of the seed papers, usable wherever a list of attack specs
# is (`robustlab eval --attack critic-rho`). Detection panels live in robustlab.detection.attacks.
PANELS: dict[str, list[str]] = {
    # adversary critic, Table 1 (critic.md 8): minimal l_2 perturbations, reported as rho = ||r||_2 / ||x||_2
    "critic-rho": ["deepfool:steps=500,max_step=0.1,project=true", "cw:steps=1000", "critic"],
}


def expand_panels(specs: list[str]) -> list[str]:
    """Replace panel names by their attack specs (order kept, duplicates dropped)."""
    out: list[str] = []
    for s in specs:
        for item in PANELS.get(s.strip(), [s]):
            if item not in out:
                out.append(item)
    return out


def create_attack(name_or_spec: str, model: nn.Module, **overrides: Any):
    """Build an attack from its registry name or a full spec string; unknown options raise TypeError."""
    name, kwargs = parse_attack_spec(name_or_spec)
    kwargs.update(overrides)
    return ATTACKS.create(name, model, **kwargs)
