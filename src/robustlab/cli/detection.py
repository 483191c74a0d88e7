"""Detection commands: `robustlab data mnist-det` (generate, statistics, preview) and `robustlab det-report`
(detectors compared under the CWAT seed's panels). `robustlab eval` serves detectors through their task."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from robustlab.cli.common import command_line, load_labelled_models


def cmd_data(args: argparse.Namespace) -> int:
    from robustlab.detection.mnistdet import PRESET_TARGETS, class_distribution, load_or_generate, make_config, split_statistics

    cfg = make_config(args.preset, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size,
                      alpha=args.alpha, seed=args.seed)
    d = load_or_generate(cfg, regenerate=args.regenerate)
    stats: dict[str, Any] = {s: split_statistics(d[s]) for s in ("train", "test")}
    target = PRESET_TARGETS[args.preset]
    stats["preset_targets"] = {"objects_per_image": target[0], "classes_per_image": target[1],
                               "single_class_fraction": target[2],
                               "class_shares": class_distribution(args.alpha).round(4).tolist()}
    stats["mean_rgb"] = [round(float(m), 3) for m in d["mean"]["rgb"]]
    print(json.dumps(stats, indent=2))
    if args.preview:
        import torch

        from robustlab.detection.data import tensor_source
        from robustlab.detection.report import draw_grid
        from robustlab.detection.targets import unpad

        src = tensor_source(d["train"], args.image_size)
        x, t = src.batch(torch.arange(min(args.preview_n, len(src))))
        path = draw_grid(x, args.preview, targets=unpad(t), ncols=8)
        print(f"wrote {path}")
    return 0


def cmd_det_report(args: argparse.Namespace) -> int:
    from robustlab.detection.compare import compare_detectors, write_comparison
    from robustlab.engine.tasks import Detection
    from robustlab.utils import machine_description, set_threads

    set_threads(args.threads)
    models, extra = load_labelled_models(args.model, args.device, "detection")
    test, _ = Detection(args.ap_mode).eval_data(args.data, "test", extra, next(iter(models.values())))
    ints = lambda s: [int(v) for v in s.split(",")] if s else []  # noqa: E731
    floats = lambda s: [float(v) for v in s.split(",")] if s else []  # noqa: E731
    result = compare_detectors(models, test, args.n_samples, args.panel or ["table1", "table3"], args.ap_mode,
                               ints(args.steps), floats(args.eps), examples=8, progress=None if not args.quiet else False)
    path = write_comparison(args.out, result, command_line(), machine_description())
    print(path.read_text().split("## mAP vs")[0])
    from robustlab.reports.json import write_json

    for r in result["models"].values():
        r.pop("examples", None)
    write_json(Path(args.out) / "results.json", result)
    print(f"wrote {path} and {Path(args.out) / 'results.json'}")
    return 0


def add_commands(sub) -> None:
    pr = sub.add_parser("det-report", help="compare detectors under the seed's attack panels, curves and examples",
                        description="Evaluate detector checkpoints on the same test images under the CWAT seed's "
                                    "panels (table1: FGSM/PGD-10 A_cls and A_reg, CWA, DAG; table3: per-class AP under "
                                    "MDA, OWA, CWA), optional mAP-vs-steps and mAP-vs-eps curves, and write "
                                    "report.md, PNG figures and results.json.")
    pr.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                    help="a detector checkpoint with its row name (repeatable), e.g. STD=runs/std/best.safetensors")
    pr.add_argument("--data", help="detection dataset spec; default: the one the last checkpoint was trained on")
    pr.add_argument("--panel", action="append", choices=("table1", "table3"), help="attack panels (default: both)")
    pr.add_argument("--n-samples", type=int, default=200, help="test images")
    pr.add_argument("--steps", default="", help="PGD steps for the mAP-vs-steps curve, e.g. 1,2,5,10,20")
    pr.add_argument("--eps", default="", help="eps values for the mAP-vs-eps curve, e.g. 0,1,2,4,6,8,10,12,16")
    pr.add_argument("--ap-mode", default="11pt", choices=("11pt", "area", "coco"),
                    help="AP rule: VOC07 11-point, VOC area, or COCO AP50")
    pr.add_argument("--out", type=Path, default=Path("det-report"), help="output folder (report, JSON, figures)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    pr.add_argument("--threads", type=int, help="torch CPU threads (set 1-2 on small machines)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_det_report)

    pd = sub.add_parser("data", help="generate MNIST-Det, print its statistics, render a preview grid",
                        description="Generate (and cache) the synthetic MNIST-Det detection dataset from the embedded "
                                    "MNIST digits, print realised statistics next to the preset's targets, and "
                                    "optionally render a grid of training images with their boxes to PNG.")
    pd.add_argument("name", choices=("mnist-det",), help="dataset to generate")
    pd.add_argument("--preset", default="voc", choices=("voc", "coco"), help="class count and scene statistics")
    pd.add_argument("--n-train", type=int, default=2000, help="training scenes")
    pd.add_argument("--n-test", type=int, default=500, help="test scenes")
    pd.add_argument("--image-size", type=int, default=96, help="scene side in pixels")
    pd.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of the class distribution (0: balanced)")
    pd.add_argument("--seed", type=int, default=0, help="seed of the scenes (digits, positions, sizes)")
    pd.add_argument("--regenerate", action="store_true", help="ignore the cache")
    pd.add_argument("--preview", type=Path, help="write a PNG grid of training images with their boxes")
    pd.add_argument("--preview-n", type=int, default=32, help="images in the preview grid")
    pd.set_defaults(func=cmd_data)


__all__ = ["add_commands"]
