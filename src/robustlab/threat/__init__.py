"""Threat models: the sets an attacker may move an input within, intersected with the [0, 1] box."""
from robustlab.threat.lp import (
    NORMS,
    L1Ball,
    L2Ball,
    LinfBall,
    LpBall,
    ThreatViolation,
    check_within,
    make_threat,
    per_sample_norm,
)

__all__ = ["LpBall", "LinfBall", "L2Ball", "L1Ball", "make_threat", "per_sample_norm", "NORMS", "ThreatViolation",
           "check_within"]
