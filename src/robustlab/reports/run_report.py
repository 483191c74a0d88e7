"""The main job's report: Markdown and HTML with a comparison table and PNG plots."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from robustlab.outputs import atomic_write_text


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    attacks = list(next(iter(results.values()))["attacks"])
    head = "| model | clean | " + " | ".join(attacks) + " | union |"
    lines = [head, "|" + "---|" * (len(attacks) + 3)]
    for n in names:
        r = results[n]
        cells = [f"{100 * r['attacks'][a]['robust_accuracy']:.1f}" for a in attacks]
        lines.append(f"| {n} | {100 * r['clean_accuracy']:.1f} | " + " | ".join(cells)
                     + f" | {100 * r['union_accuracy']:.1f} |")
    return "\n".join(lines)


def selection_lines(selection: dict[str, dict[str, Any]]) -> list[str]:
    """Which epoch each model's best.safetensors holds, and why (the Trainer's selection rule)."""
    out = []
    for label, b in selection.items():
        if b.get("select_best", True):
            out.append(f"- {label}: epoch {b['epoch']}, the best {b['metric_description']} "
                       f"({100 * b['score']:.1f}%) on the {b['split']}: {b['why']}")
        else:
            out.append(f"- {label}: the last epoch ({b['epoch']}); no selection")
    return out


def integrity_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The integrity checks of each evaluation: 'ok' or every flag raised."""
    out = []
    for label, r in results.items():
        integ = r.get("integrity")
        if integ is None:
            continue
        if integ["ok"]:
            z = integ.get("zero_gradient", {})
            norms = ", ".join(f"{n}: unbounded PGD leaves {100 * e['unbounded_accuracy']:.0f}%"
                              for n, e in integ.get("per_norm", {}).items())
            out.append(f"- {label}: no sign of gradient masking ({100 * z.get('entries', 0):.1f}% zero gradient "
                       f"entries; {norms}; Square found nothing the white-box attacks missed; accuracy falls "
                       f"monotonically with eps)")
        else:
            out += [f"- {label}: **WARNING** {f}" for f in integ["flags"]]
    return out


def write_report(run_dir: Path, summary: dict[str, Any], figures: dict[str, str]) -> tuple[Path, Path]:
    table = comparison_table(summary["results"])
    specs = "\n".join(f"- `{s}`" for s in summary["attack_specs"])
    split = summary.get("split")
    data_line = (f"Data: `{summary['dataset']}`: {split['train']} training / {split['validation']} validation images "
                 f"(held out of the training split, used only to choose each model's epoch) / {split['test']} test "
                 f"images, of which the first {summary['n_eval']} are evaluated here." if split else
                 f"Data: `{summary['dataset']}` ({summary['n_eval']} test images evaluated).")
    md = [f"# robustlab run: {summary['name']}", "",
          data_line + f" Machine: {summary['machine']}. Total time: {summary['seconds']:.0f} s.", "",
          "Robust accuracy (%) on the test split — a sample counts only if its clean prediction is correct too:", "",
          table, "", "Attacks:", specs, ""]
    if summary.get("selection"):
        md += ["Model selection (best.safetensors):", *selection_lines(summary["selection"]), ""]
    integrity = integrity_lines(summary["results"])
    if integrity:
        md += ["Integrity checks (robustlab.engine.integrity):", *integrity, ""]
    md += ["Reproduce: `" + summary["command"] + "`", ""]
    for title, fname in figures.items():
        md += [f"## {title}", "", f"![{title}]({fname})", ""]
    if summary.get("events"):
        md += ["## Training events", ""] + [f"- {e}" for e in summary["events"]] + [""]
    md_path = run_dir / "report.md"
    atomic_write_text(md_path, "\n".join(md))
    rows: list[str] = []
    for line in table.splitlines():
        if set(line) <= set("|-"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        tag = "th" if not rows else "td"
        rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    figs = "".join(f"<h2>{html.escape(t)}</h2><img src='{html.escape(f)}' style='max-width:100%'>" for t, f in figures.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>robustlab run {html.escape(summary['name'])}"
            "</title><style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style>"
            f"</head><body><h1>robustlab run: {html.escape(summary['name'])}</h1>"
            f"<p>{html.escape(data_line)} Machine: "
            f"{html.escape(summary['machine'])}. Total time: {summary['seconds']:.0f} s.</p>"
            f"<table>{''.join(rows)}</table><p>Attacks: "
            + ", ".join(f"<code>{html.escape(s)}</code>" for s in summary["attack_specs"]) + "</p>"
            + "".join(f"<h2>{t}</h2><ul>" + "".join(f"<li>{html.escape(x[2:]).replace('**', '')}</li>" for x in items)
                      + "</ul>" for t, items in (("Model selection", selection_lines(summary.get("selection") or {})),
                                                 ("Integrity checks", integrity)) if items)
            + f"<p>Reproduce: <code>{html.escape(summary['command'])}</code></p>{figs}</body></html>")
    html_path = run_dir / "report.html"
    atomic_write_text(html_path, page)
    return md_path, html_path
