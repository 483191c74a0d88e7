"""Detection commands: `robustlab data mnist-det` (generate, statistics, preview) and the detector branch of
`robustlab eval` (mAP and per-class AP, JSON and a report with example images)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from robustlab.cli.common import command_line, load_labelled_models
from robustlab.errors import InputError

# `robustlab train --task detection` starts from these keys (a --config and KEY=VALUE overrides replace them):
# the clean TinySSD-96 recipe of spec cwat.md 1.8 on MNIST-Det `voc`.
DETECTION_DEFAULTS: dict[str, Any] = {
    "name": "det-std", "dataset": "mnist-det", "dataset_kwargs": {"preset": "voc"}, "model": "tinyssd-96",
    "method": "det-std", "epochs": 30, "batch_size": 32, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
    "weight_decay": 5e-4, "schedule": "multistep", "milestones": (0.6667, 0.8333), "warmup_epochs": 3.2,
    "eval_every": 5, "eval_samples": 500, "ap_mode": "11pt",
}


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

        from robustlab.detection.data import _tensor_source
        from robustlab.detection.report import draw_grid
        from robustlab.detection.targets import unpad

        src = _tensor_source(d["train"], args.image_size)
        x, t = src.batch(torch.arange(min(args.preview_n, len(src))))
        path = draw_grid(x, args.preview, targets=unpad(t), ncols=8)
        print(f"wrote {path}")
    return 0


def _data_from_spec(spec: str | None, extra: dict[str, Any]):
    from robustlab.attacks.spec import parse_spec
    from robustlab.registry import DATASETS

    if spec is None:  # the data the checkpoint was trained on
        cfg = extra.get("config") or {}
        if "dataset" not in cfg:
            raise InputError("the checkpoint does not record its dataset; pass --data NAME[:key=value,...]")
        name, kwargs = cfg["dataset"], dict(cfg.get("dataset_kwargs") or {})
    else:
        name, kwargs = parse_spec(spec, DATASETS)
    return DATASETS.create(name, **kwargs), name, kwargs


def eval_detector(args: argparse.Namespace, model, extra: dict[str, Any]) -> int:
    from robustlab.detection.data import DetData
    from robustlab.detection.evaluate import evaluate_detector
    from robustlab.detection.report import ap_table, write_detection_report

    data, name, kwargs = _data_from_spec(args.data, extra)
    if not isinstance(data, DetData):
        raise InputError(f"dataset {name!r} is not a detection dataset; a detector needs mnist-det, voc or coco")
    if data.num_classes != model.num_classes:
        raise InputError(f"the model detects {model.num_classes} classes but dataset {name!r} has {data.num_classes}")
    from robustlab.detection.attacks import detection_attacks

    attacks = detection_attacks(args.attack, model) if args.attack else None
    source = data.test if args.split == "test" else data.train
    result = evaluate_detector(model, source, args.n_samples, batch_size=min(args.batch_size, 64), ap_mode=args.ap_mode,
                               attacks=attacks, keep_examples=16 if args.report else 0,
                               progress=None if not args.quiet else False)
    print(ap_table(result))
    result.update({"model": str(args.model), "data": {"name": name, "kwargs": kwargs, "split": args.split}})
    if args.report:
        from robustlab.utils import machine_description

        path = write_detection_report(args.report, result, f"Detection evaluation: {Path(args.model).name}",
                                      command_line(), machine_description())
        print(f"wrote {path}")
    result.pop("examples", None)
    if args.json:
        from robustlab.cli.common import report_written
        from robustlab.outputs import save_result
        from robustlab.reports.json import write_json

        return report_written(*save_result(args.json, lambda p: write_json(p, result), what="result JSON"))
    return 0


def cmd_det_report(args: argparse.Namespace) -> int:
    from robustlab.detection.compare import compare_detectors, write_comparison
    from robustlab.detection.data import DetData
    from robustlab.utils import machine_description, set_threads

    set_threads(args.threads)
    models, extra = load_labelled_models(args.model, args.device, "detection")
    data, _, _ = _data_from_spec(args.data, extra)
    if not isinstance(data, DetData):
        raise InputError("det-report needs a detection dataset (mnist-det, voc, coco)")
    ints = lambda s: [int(v) for v in s.split(",")] if s else []  # noqa: E731
    floats = lambda s: [float(v) for v in s.split(",")] if s else []  # noqa: E731
    result = compare_detectors(models, data.test, args.n_samples, args.panel or ["table1", "table3"], args.ap_mode,
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
    pr.add_argument("--ap-mode", default="11pt", choices=("11pt", "area", "coco"))
    pr.add_argument("--out", type=Path, default=Path("det-report"))
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--threads", type=int)
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_det_report)

    pd = sub.add_parser("data", help="generate MNIST-Det, print its statistics, render a preview grid",
                        description="Generate (and cache) the synthetic MNIST-Det detection dataset from the embedded "
                                    "MNIST digits, print realised statistics next to the preset's targets, and "
                                    "optionally render a grid of training images with their boxes to PNG.")
    pd.add_argument("name", choices=("mnist-det",), help="dataset to generate")
    pd.add_argument("--preset", default="voc", choices=("voc", "coco"))
    pd.add_argument("--n-train", type=int, default=2000)
    pd.add_argument("--n-test", type=int, default=500)
    pd.add_argument("--image-size", type=int, default=96)
    pd.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of the class distribution (0: balanced)")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--regenerate", action="store_true", help="ignore the cache")
    pd.add_argument("--preview", type=Path, help="write a PNG grid of training images with their boxes")
    pd.add_argument("--preview-n", type=int, default=32, help="images in the preview grid")
    pd.set_defaults(func=cmd_data)


__all__ = ["add_commands", "eval_detector", "DETECTION_DEFAULTS"]
