"""Pictures and tables for detection: image grids with ground-truth and predicted boxes (PNG, pillow), the
per-class AP table (Markdown) and bar chart (PNG), and the detection report that `robustlab eval` writes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from robustlab.outputs import atomic_save_figure, atomic_write_text

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_grid(images: Tensor, path: str | Path, targets: Sequence[Any] | None = None,
              detections: Sequence[Any] | None = None, class_names: Sequence[str] | None = None,
              score_threshold: float = 0.3, ncols: int = 8, scale: int = 2) -> Path:
    """Images (N, 3, S, S) in [0, 255] with ground truth (white, thin) and detections above `score_threshold`
    (class colour, label and score) drawn on them, in a grid."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    hs, ws = h * scale, w * scale
    grid = Image.new("RGB", (ncols * (ws + 4), nrows * (hs + 4)), (255, 255, 255))
    names = list(class_names) if class_names is not None else None
    for i in range(n):
        arr = images[i].detach().clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()
        im = Image.fromarray(arr).resize((ws, hs), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(im)
        size = torch.tensor([ws, hs, ws, hs], dtype=torch.float32)
        if targets is not None:
            for b in targets[i][0]:
                draw.rectangle((b.float() * size).tolist(), outline=(255, 255, 255), width=1)
        if detections is not None:
            d = detections[i]
            for b, s, lab in zip(d.boxes, d.scores, d.labels):
                if float(s) < score_threshold:
                    continue
                col = PALETTE[int(lab) % len(PALETTE)]
                xy = (b.float() * size).tolist()
                draw.rectangle(xy, outline=col, width=2)
                text = f"{names[int(lab)] if names else int(lab)} {float(s):.2f}"
                draw.text((xy[0] + 2, xy[1] + 1), text, fill=col)
        grid.paste(im, ((i % ncols) * (ws + 4) + 2, (i // ncols) * (hs + 4) + 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def ap_table(result: dict[str, Any]) -> str:
    """Markdown: one row per class, one column per evaluation (clean, then each attack), mAP last."""
    names = result["class_names"]
    cols = {"clean": result["clean"], **result.get("attacks", {})}
    head = "| class | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for i, name in enumerate(names):
        cells = [("–" if math.isnan(c["ap"][i]) else f"{c['ap'][i]:.3f}") for c in cols.values()]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append("| **mAP** | " + " | ".join(f"**{c['map']:.3f}**" for c in cols.values()) + " |")
    return head + "\n".join(rows) + "\n" + attack_summary(result)


def detection_log(result: dict[str, Any]) -> str:
    """The AutoAttack-style log of a detector evaluation (`robustlab eval --log`): clean mAP, then per attack its mAP,
    the running total time, its passes per image and the largest perturbation, then the integrity verdict."""
    lines = [f"initial mAP: {result['clean']['map']:.4f} ({result['n_images']} images, {result['ap_mode']})"]
    total = result["clean"].get("seconds", 0.0)
    for name, a in result.get("attacks", {}).items():
        total += a.get("seconds", 0.0)
        eps = "unbounded" if a.get("eps") is None else f"l_inf eps {a['eps']:g}"
        lines.append(f"mAP after {name.upper()} ({eps}): {a['map']:.4f} (total time {total:.1f} s)")
        if "passes" in a:
            lines.append(f"  passes per image: {a['passes']['per_image']:.1f}; max |delta|: "
                         f"{a['perturbation']['max_abs']:.3f}")
    integrity = result.get("integrity")
    if integrity is not None:
        lines.append("integrity: ok" if integrity["ok"] else "integrity: DO NOT TRUST THESE NUMBERS")
        lines += [f"  - {f}" for f in integrity["flags"]]
    return "\n".join(lines) + "\n"


def attack_summary(result: dict[str, Any]) -> str:
    """One line per attack: its budget, passes and seconds, the perturbation it made and its own statistics."""
    lines = []
    for name, a in result.get("attacks", {}).items():
        if "passes" not in a:
            continue
        eps = "unbounded ([0, 255] box only)" if a.get("eps") is None else f"l_inf eps {a['eps']:g}"
        stats = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in a["stats"].items())
        lines.append(f"- {name}: {eps}; {a['passes']['per_image']:.1f} passes/img, {a['seconds']:.1f} s; |delta| mean "
                     f"{a['perturbation']['mean_abs']:.3f}, max {a['perturbation']['max_abs']:.3f}"
                     + (f"; {stats}" if stats else ""))
    integrity = result.get("integrity")
    if integrity is not None:
        lines += ["", "integrity: ok (no sign of gradient masking)" if integrity["ok"] else
                  "integrity: DO NOT TRUST THESE NUMBERS"] + [f"  - {f}" for f in integrity["flags"]]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def per_class_ap_plot(result: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["class_names"]
    cols = {"clean": result["clean"], **result.get("attacks", {})}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) * len(cols)), 3.5))
    width = 0.8 / len(cols)
    for j, (label, c) in enumerate(cols.items()):
        ax.bar([i + j * width for i in range(len(names))], [0 if math.isnan(a) else a for a in c["ap"]], width,
               label=f"{label} (mAP {c['map']:.3f})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45 if len(names) > 10 else 0)
    ax.set_ylabel(f"AP@0.5 ({result['ap_mode']})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def write_detection_report(out_dir: str | Path, result: dict[str, Any], title: str, command: str = "",
                           machine: str = "") -> Path:
    """report.md + per_class_ap.png + examples_<name>.png (when the result kept examples)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [("Per-class AP", per_class_ap_plot(result, out / "per_class_ap.png").name)]
    ex = result.get("examples")
    if ex:
        for name, imgs in ex["images"].items():
            p = draw_grid(imgs, out / f"examples_{name}.png", ex["targets"], ex["detections"][name],
                          result["class_names"])
            figures.append((f"Detections ({name}; white: ground truth, colour: predictions with score >= 0.3)", p.name))
    lines = [f"# {title}", "", f"{result['n_images']} test images, AP@0.5 ({result['ap_mode']}).", ""]
    if command:
        lines += ["Reproduce:", "", "```", command, "```", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    lines += [ap_table(result), ""]
    for caption, name in figures:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def map_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown in the layout of the seed's Tables 1, 2, 4, 5: one row per model, clean then each attack."""
    cols = ["clean"] + [a for a in next(iter(results.values()))["attacks"]]
    head = "| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for name, r in results.items():
        cells = [r["clean"]["map"]] + [r["attacks"][a]["map"] for a in cols[1:]]
        rows.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return head + "\n".join(rows) + "\n"


def per_class_table(results: dict[str, dict[str, Any]], attacks: Sequence[str]) -> str:
    """Markdown in the layout of the seed's Table 3: per-class AP under each attack for each model, plus the
    standard deviation and the minimum over classes (how evenly a defense protects the classes)."""
    import statistics

    first = next(iter(results.values()))
    names = first["class_names"]
    cols = [(m, a) for m in results for a in attacks]
    head = "| class | " + " | ".join(f"{m} {a}" for m, a in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for i, name in enumerate(names):
        rows.append(f"| {name} | " + " | ".join(f"{results[m]['attacks'][a]['ap'][i]:.3f}" for m, a in cols) + " |")
    for label, fn in (("std", statistics.pstdev), ("min", min)):
        vals = [fn([v for v in results[m]["attacks"][a]["ap"] if not math.isnan(v)]) for m, a in cols]
        rows.append(f"| *{label}* | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    rows.append("| **mAP** | " + " | ".join(f"**{results[m]['attacks'][a]['map']:.3f}**" for m, a in cols) + " |")
    return head + "\n".join(rows) + "\n"


def curve_plot(curves: dict[str, dict[str, tuple[list[float], list[float]]]], path: str | Path, xlabel: str) -> Path:
    """mAP against attack steps or eps: one panel per attack, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(next(iter(curves.values())))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.2), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for model, per_attack in curves.items():
            xs, ys = per_attack[attack]
            ax.plot(xs, ys, marker="o", label=model)
        ax.set_title(attack)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mAP@0.5")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
