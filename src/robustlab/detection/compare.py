"""Compare detectors in the seed's layout (spec cwat.md 5.2-5.3): mAP clean and under the attack panels
(Table 1: FGSM/PGD-10 A_cls and A_reg, CWA, DAG; Table 3: per-class AP under MDA, OWA, CWA), mAP against
PGD steps and against eps (PNG), and detections on clean vs attacked images (PNG). `robustlab det-report`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from robustlab.detection.attacks import PANELS, detection_attacks
from robustlab.detection.data import DetSource
from robustlab.detection.evaluate import evaluate_detector
from robustlab.detection.report import curve_plot, draw_grid, map_table, per_class_table
from robustlab.errors import InputError
from robustlab.outputs import atomic_write_text

STEPS_GRID = (1, 2, 5, 10, 20)
EPS_GRID = (0, 1, 2, 4, 6, 8, 10, 12, 16)
CURVE_ATTACKS = {"pgd-cls": "det-pgd:objective=cls", "pgd-reg": "det-pgd:objective=reg", "cwa": "cwa"}


def compare_detectors(models: Mapping[str, nn.Module], source: DetSource, n_images: int | None = None,
                      panels: Sequence[str] = ("table1", "table3"), ap_mode: str = "11pt",
                      steps_grid: Sequence[int] = (), eps_grid: Sequence[float] = (), batch_size: int = 32,
                      examples: int = 8, progress: bool | None = False) -> dict[str, Any]:
    """Evaluate every model on the same images under the panels (each attack generated on the model itself,
    white-box); optional curves: mAP vs PGD steps at eps 8 (alpha 2) and vs eps under PGD-10 (alpha eps/4)."""
    for p in panels:
        if p not in PANELS:
            raise InputError(f"unknown panel {p!r}; valid: {', '.join(PANELS)}")
    out: dict[str, Any] = {"panels": list(panels), "models": {}, "steps": {}, "eps": {}, "seconds": {}}
    for name, model in models.items():
        t0 = time.perf_counter()
        out["models"][name] = evaluate_detector(model, source, n_images, batch_size, ap_mode,
                                                detection_attacks(list(panels), model), keep_examples=examples,
                                                progress=progress)
        if steps_grid:
            specs = {f"{a}@{k}": f"{s},steps={k}" if ":" in s else f"{s}:steps={k}"
                     for a, s in CURVE_ATTACKS.items() for k in steps_grid}
            r = evaluate_detector(model, source, n_images, batch_size, ap_mode,
                                  {lab: v for lab, v in zip(specs, detection_attacks(list(specs.values()), model).values())})
            out["steps"][name] = {a: (list(steps_grid), [r["attacks"][f"{a}@{k}"]["map"] for k in steps_grid])
                                  for a in CURVE_ATTACKS}
        if eps_grid:
            specs = {f"{a}@{e}": (f"{s},eps={e}" if ":" in s else f"{s}:eps={e}")
                     for a, s in CURVE_ATTACKS.items() for e in eps_grid}
            r = evaluate_detector(model, source, n_images, batch_size, ap_mode,
                                  {lab: v for lab, v in zip(specs, detection_attacks(list(specs.values()), model).values())})
            out["eps"][name] = {a: (list(eps_grid), [r["attacks"][f"{a}@{e}"]["map"] for e in eps_grid])
                                for a in CURVE_ATTACKS}
        out["seconds"][name] = time.perf_counter() - t0
    return out


def write_comparison(out_dir: str | Path, result: dict[str, Any], command: str = "", machine: str = "") -> Path:
    """report.md (Table-1 and Table-3 layouts), curves_steps.png, curves_eps.png, examples_<model>.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = result["models"]
    first = next(iter(models.values()))
    lines = ["# Detector robustness", "", f"{first['n_images']} test images, mAP@0.5 ({first['ap_mode']}), eps 8 "
             "(pixel scale), PGD-10 with alpha 2, no random start; every attack is generated on the model it attacks.", ""]
    if command:
        lines += ["Reproduce:", "", "```", command, "```", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    lines += ["## mAP clean and under attack (the seed's Tables 1, 2, 4, 5)", "", map_table(models), ""]
    if "table3" in result["panels"]:
        lines += ["## Per-class AP under MDA, OWA, CWA (the seed's Table 3)", "",
                  per_class_table(models, list(PANELS["table3"])), ""]
    if result["steps"]:
        p = curve_plot(result["steps"], out / "curves_steps.png", "PGD steps (eps 8, alpha 2)")
        lines += ["## mAP vs attack steps", "", f"![mAP vs steps]({p.name})", ""]
    if result["eps"]:
        p = curve_plot(result["eps"], out / "curves_eps.png", "eps (PGD-10, alpha eps/4)")
        lines += ["## mAP vs eps", "", f"![mAP vs eps]({p.name})", ""]
    for name, r in models.items():
        ex = r.get("examples")
        if not ex:
            continue
        for attack, imgs in ex["images"].items():
            if attack not in ("clean", "pgd-cls", "cwa", "dag"):  # a few of them tell the story
                continue
            p = draw_grid(imgs, out / f"examples_{name}_{attack}.png", ex["targets"], ex["detections"][attack],
                          r["class_names"])
            lines += [f"### {name}: detections on {attack} images", "", f"![{name} {attack}]({p.name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
