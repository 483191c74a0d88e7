"""Several classifiers under one attack panel, as one table (the seeds' comparison tables).

Bounded attacks are reported as robust accuracy (%), minimal-perturbation attacks (DeepFool, C&W, the
critic attack, FAB without eps) as rho = mean ||r||_2 / ||x||_2, the adversary-critic paper's measure,
with the count of failed attacks. `robustlab compare` is the command.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from robustlab.errors import InputError
from robustlab.outputs import atomic_write_text


def compare_models(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, specs: list[str], *,
                   batch_size: int = 500, progress: bool | None = False, integrity: bool = True) -> dict[str, Any]:
    """{label: evaluate(...) result} for every model on the same images and attack specs, with the integrity
    checks of each evaluation (robustlab.engine.integrity) unless integrity=False."""
    from robustlab import evaluate

    if not models:
        raise InputError("compare needs at least one model")
    return {label: evaluate(m, x, y, specs, batch_size=batch_size, checks=False, integrity=integrity,
                            progress=progress, keep_records=True)
            for label, m in models.items()}


def _cell(entry: dict[str, Any]) -> str:
    pert = entry.get("perturbation")
    if pert is not None and entry.get("eps") is None:  # unbounded minimal attack: rho
        failed = pert.get("n_failed", 0)
        rho = pert.get("rho")
        return ("-" if rho is None else f"{rho:.3f}") + (f" ({failed} failed)" if failed else "")
    return f"{100 * entry['robust_accuracy']:.1f}"


def compare_table(results: Mapping[str, dict[str, Any]]) -> str:
    """Markdown: model | error % | clean % | one column per attack (rho or robust accuracy %) | union %."""
    first = next(iter(results.values()))
    names = list(first["attacks"])
    bounded = [n for n in names if first["attacks"][n].get("perturbation") is None
               or first["attacks"][n].get("eps") is not None]
    head = ["model", "error (%)"] + [
        f"{n} ({'rho' if n not in bounded else 'acc %'})" for n in names]
    if bounded:
        head.append("union of bounded (acc %)")
    # several norms (MNG-AC's layout): each norm's worst case over its attacks and their mean
    norms = list(first.get("per_norm") or {}) if len(first.get("per_norm") or {}) > 1 else []
    head += [f"{p} (acc %)" for p in norms] + (["avg over norms (acc %)"] if norms else [])
    timed = all("train_seconds" in r for r in results.values())
    if timed:
        head.append("train time (min)")
    checked = all("integrity" in r for r in results.values())
    if checked:
        head.append("integrity")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        cells = [label, f"{100 * (1 - r['clean_accuracy']):.2f}"] + [_cell(r["attacks"][n]) for n in names]
        if bounded:  # per-sample records: a sample counts only if it survives every bounded attack
            rob = torch.tensor([r["records"]["robust"][n] for n in bounded], dtype=torch.bool)
            cells.append(f"{100 * rob.all(0).float().mean().item():.1f}")
        cells += [f"{100 * r['per_norm'][p]:.1f}" for p in norms]
        if norms:
            cells.append(f"{100 * r['norm_average_accuracy']:.1f}")
        if timed:
            cells.append(f"{r['train_seconds'] / 60:.1f}")
        if checked:
            cells.append("ok" if r["integrity"]["ok"] else f"FLAGGED ({len(r['integrity']['flags'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def integrity_notes(results: Mapping[str, dict[str, Any]]) -> list[str]:
    """Every integrity flag raised, per model (empty when all evaluations look sound)."""
    return [f"- {label}: {flag}" for label, r in results.items() for flag in (r.get("integrity") or {}).get("flags", [])]


def write_compare(out_dir: str | Path, results: Mapping[str, dict[str, Any]], *, specs: list[str],
                  n_samples: int, command: str = "", machine: str = "") -> Path:
    """compare.md, compare.html and compare.json in out_dir; returns the Markdown path."""
    from robustlab.reports.json import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(results)
    md = ["# robustlab compare", "", f"{n_samples} test images; machine: {machine or 'not recorded'}.", "",
          "rho = mean ||r||_2 / ||x||_2 over all evaluated images (misclassified ones count 0; failed attacks "
          "excluded and counted); accuracies count a sample only if its clean prediction is correct.", "",
          table, "", "Attacks:"] + [f"- `{s}`" for s in specs]
    notes = integrity_notes(results)
    if notes:
        md += ["", "Integrity warnings (do not trust these rows' numbers):"] + notes
    if command:
        md += ["", f"Reproduce: `{command}`"]
    path = out / "compare.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    rows = [line.strip("|").split("|") for line in table.splitlines() if not set(line) <= set("|-")]
    cells = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"
                                     for c in row) + "</tr>" for i, row in enumerate(rows))
    atomic_write_text(out / "compare.html", f"<!doctype html><meta charset='utf-8'><title>robustlab compare</title>"
                                            f"<table border='1' cellpadding='4'>{cells}</table>"
                                            + "".join(f"<p>{html.escape(n[2:])}</p>" for n in notes)
                                            + f"<p>{html.escape(command)}</p>\n")
    write_json(out / "compare.json", {"specs": specs, "n_samples": n_samples, "command": command,
                                      "machine": machine, "results": dict(results)})
    return path
