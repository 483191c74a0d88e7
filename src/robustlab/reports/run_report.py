"""The main job's report: Markdown and HTML with a comparison table and PNG plots."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any


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


def write_report(run_dir: Path, summary: dict[str, Any], figures: dict[str, str]) -> tuple[Path, Path]:
    table = comparison_table(summary["results"])
    specs = "\n".join(f"- `{s}`" for s in summary["attack_specs"])
    md = [f"# robustlab run: {summary['name']}", "",
          f"Data: `{summary['dataset']}` ({summary['n_eval']} test images evaluated). "
          f"Machine: {summary['machine']}. Total time: {summary['seconds']:.0f} s.", "",
          "Robust accuracy (%) — a sample counts only if its clean prediction is correct too:", "", table, "",
          "Attacks:", specs, "",
          "Reproduce: `" + summary["command"] + "`", ""]
    for title, fname in figures.items():
        md += [f"## {title}", "", f"![{title}]({fname})", ""]
    if summary.get("events"):
        md += ["## Training events", ""] + [f"- {e}" for e in summary["events"]] + [""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))
    rows = []
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
            f"<p>Data: {html.escape(summary['dataset'])} ({summary['n_eval']} test images). Machine: "
            f"{html.escape(summary['machine'])}. Total time: {summary['seconds']:.0f} s.</p>"
            f"<table>{''.join(rows)}</table><p>Attacks: "
            + ", ".join(f"<code>{html.escape(s)}</code>" for s in summary["attack_specs"])
            + f"</p><p>Reproduce: <code>{html.escape(summary['command'])}</code></p>{figs}</body></html>")
    html_path = run_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path
