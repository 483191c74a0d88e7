"""Markdown tables for evaluation results."""
from __future__ import annotations

from typing import Any


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def attack_log(result: dict[str, Any], name: str) -> list[str]:
    """The reference AutoAttack's log for one attack of an `evaluate` result (its stages when it has them), its lines
    in the reference's exact format (parsers written for it keep working); robustlab's extras (passes per attacked
    image, how a randomised model was judged) on lines of their own."""
    a = result["attacks"][name]
    stages = a.get("stages") or [{"attack": a.get("attack", name), "robust_accuracy": a["robust_accuracy"],
                                  "seconds": a.get("seconds") or 0.0,
                                  "passes_per_attacked_image": a["passes"]["per_attacked_image"]}]
    lines = []
    if a.get("attack") == "autoattack" and a.get("stages"):  # the reference's opening line: the version that ran
        lines.append(f"using {a.get('ran', a.get('version'))} version including "
                     f"{', '.join(stage['attack'] for stage in stages)}.")
        if a.get("ran") not in (None, "fast"):
            lines.append(f"(asked for version fast; escalated to {a['ran']} because the integrity probe flagged: "
                         + "; ".join(a.get("escalated_because", [])) + ")")
    lines.append(f"initial accuracy: {100 * result['clean_accuracy']:.2f}%")
    total = 0.0
    for stage in stages:
        total += stage["seconds"]
        lines.append(f"robust accuracy after {stage['attack'].upper()}: {100 * stage['robust_accuracy']:.2f}% "
                     f"(total time {total:.1f} s)")
    check = a.get("adversarial_check")
    if check and check.get("min") is not None:
        norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(a.get("norm") or "", a.get("norm") or "l2")
        lines.append(f"max {norm} perturbation: {check['max_perturbation']:.5f}, nan in tensor: {check['nan']}, "
                     f"max: {check['max']:.5f}, min: {check['min']:.5f}")
    lines.append(f"robust accuracy: {100 * a['robust_accuracy']:.2f}%")
    lines.append("passes per attacked image: " + ", ".join(
        f"{stage['attack']} {stage['passes_per_attacked_image']:.1f}" for stage in stages))
    spread = a.get("expected_over_draws")
    if spread:  # a randomised model: how the last line was judged, and why it may differ from the stage lines
        lines.append(f"judged as the expected accuracy over {spread['draws']} forward passes per image (accuracy of "
                     f"one pass: std {100 * spread['std']:.2f}, range {100 * spread['min']:.2f}-"
                     f"{100 * spread['max']:.2f}%)" + ("; the lines 'after' are the attack's own EoT estimates at "
                                                       "the points it kept" if a.get("stages") else ""))
    return lines


def evaluation_log(result: dict[str, Any]) -> str:
    """Every attack's log (`attack_log`), one block per attack: what `robustlab eval --log` writes."""
    blocks = []
    for name in result["attacks"]:
        blocks.append("\n".join([f"== {name} ==", *attack_log(result, name)]))
    return "\n\n".join(blocks) + "\n"


def eval_table(result: dict[str, Any]) -> str:
    """One row per attack: robust accuracy, norm, eps, passes per attacked image, perturbation stats."""
    lines = [f"clean accuracy: {_pct(result['clean_accuracy'])}%  (n = {result['n_samples']})", "",
             "| attack | norm | eps | robust acc (%) | passes/img | seconds | median l2 | rho |",
             "|---|---|---|---|---|---|---|---|"]
    for name, a in result["attacks"].items():
        pert = a.get("perturbation") or {}
        med = pert.get("median_l2")
        rho = pert.get("rho")
        eps = a.get("eps")
        lines.append(f"| {name} | {a.get('norm') or '-'} | {eps if eps is not None else '-'} | "
                     f"{_pct(a['robust_accuracy'])} | {a['passes']['per_attacked_image']:.1f} | "
                     f"{_seconds(a.get('seconds'))} | "
                     f"{'-' if med is None else f'{med:.3f}'} | {'-' if rho is None else f'{rho:.4f}'} |")
    lines += ["", f"union accuracy: {_pct(result['union_accuracy'])}%   "
                  f"average accuracy: {_pct(result['average_accuracy'])}%"]
    if len(result.get("per_norm") or {}) > 1:  # the multi-perturbation layout: worst case per norm, their mean
        per = "   ".join(f"{p}: {_pct(v)}%" for p, v in result["per_norm"].items())
        lines += [f"per norm: {per}   mean over norms: {_pct(result['norm_average_accuracy'])}%"]
    rand = result.get("randomised")
    if rand:
        lines += [f"randomised model: accuracies are expected accuracies over {rand['draws']} forward passes per "
                  f"image (clean, expected: {_pct(rand['clean_accuracy_expected'])}%)"]
    for name, a in result["attacks"].items():
        if a.get("stages"):  # attacks made of stages (AutoAttack) also print the reference's log
            lines += ["", f"{name}:", *(f"  {line}" for line in attack_log(result, name))]
    integrity = result.get("integrity")
    if integrity is not None:
        lines += ["", "integrity: ok (no sign of gradient masking)" if integrity["ok"] else
                  "integrity: DO NOT TRUST THESE NUMBERS"] + [f"  - {f}" for f in integrity["flags"]]
    return "\n".join(lines)
