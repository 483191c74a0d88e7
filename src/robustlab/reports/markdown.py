"""Markdown tables for evaluation results."""
from __future__ import annotations

from typing import Any


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def eval_table(result: dict[str, Any]) -> str:
    """One row per attack: robust accuracy, norm, eps, passes per attacked image, perturbation stats."""
    lines = [f"clean accuracy: {_pct(result['clean_accuracy'])}%  (n = {result['n_samples']})", "",
             "| attack | norm | eps | robust acc (%) | passes/img | median l2 | rho |",
             "|---|---|---|---|---|---|---|"]
    for name, a in result["attacks"].items():
        pert = a.get("perturbation") or {}
        med = pert.get("median_l2")
        rho = pert.get("rho")
        eps = a.get("eps")
        lines.append(f"| {name} | {a.get('norm') or '-'} | {eps if eps is not None else '-'} | "
                     f"{_pct(a['robust_accuracy'])} | {a['passes']['per_attacked_image']:.1f} | "
                     f"{'-' if med is None else f'{med:.3f}'} | {'-' if rho is None else f'{rho:.4f}'} |")
    lines += ["", f"union accuracy: {_pct(result['union_accuracy'])}%   "
                  f"average accuracy: {_pct(result['average_accuracy'])}%"]
    if len(result.get("per_norm") or {}) > 1:  # the multi-perturbation layout: worst case per norm, their mean
        per = "   ".join(f"{p}: {_pct(v)}%" for p, v in result["per_norm"].items())
        lines += [f"per norm: {per}   mean over norms: {_pct(result['norm_average_accuracy'])}%"]
    integrity = result.get("integrity")
    if integrity is not None:
        lines += ["", "integrity: ok (no sign of gradient masking)" if integrity["ok"] else
                  "integrity: DO NOT TRUST THESE NUMBERS"] + [f"  - {f}" for f in integrity["flags"]]
    return "\n".join(lines)
