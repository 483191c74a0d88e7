"""A union of threat models, for multi-norm evaluation: x_adv is admissible if it lies in any member."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from robustlab.threat.lp import LpBall


@dataclass(frozen=True)
class UnionThreat:
    members: tuple[LpBall, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a union of threat models needs at least one member (got an empty set)")
        for m in self.members:
            if not isinstance(m, LpBall):
                raise TypeError(f"union members must be threat models, got {type(m).__name__}")

    @property
    def norm(self) -> str:
        return "+".join(m.norm for m in self.members)

    def contains(self, x_adv: Tensor, x: Tensor, tol: float = 1e-5) -> Tensor:
        out = self.members[0].contains(x_adv, x, tol)
        for m in self.members[1:]:
            out = out | m.contains(x_adv, x, tol)
        return out
