"""The `robustlab` command line: list, eval, train, run. Thin over the library; only this package reads argv."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

KINDS = ("attacks", "models", "datasets", "methods")


def _registry(kind: str):
    import robustlab  # noqa: F401  (registers everything)
    from robustlab import registry

    try:
        import robustlab.methods  # noqa: F401
    except ImportError:  # methods arrive with the training engine
        pass
    return {"attacks": registry.ATTACKS, "models": registry.MODELS, "datasets": registry.DATASETS,
            "methods": registry.METHODS}[kind]


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        reg = _registry(kind)
        if len(kinds) > 1:
            print(f"{kind}:")
        for name in reg.names():
            print(f"  {name:18s} {reg.describe(name)}" if len(kinds) > 1 else f"{name:18s} {reg.describe(name)}")
    return 0


def _load_eval_data(spec: str | None, split: str, extra: dict):
    from robustlab.attacks.spec import parse_spec
    from robustlab.registry import DATASETS

    if spec is None:  # the data the checkpoint was trained on, else mnist5k
        cfg = extra.get("config") or {}
        data = DATASETS.create(cfg.get("dataset", "mnist5k"), **(cfg.get("dataset_kwargs") or {}))
    else:
        name, kwargs = parse_spec(spec, DATASETS)
        data = DATASETS.create(name, **kwargs)
    if getattr(data, "task", "classification") != "classification":
        raise ValueError(f"dataset {spec!r} is a detection dataset; a classifier needs classification data")
    return (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from robustlab import evaluate
    from robustlab.attacks import create_attack
    from robustlab.cli.common import report_written
    from robustlab.engine.checkpoint import load_model
    from robustlab.outputs import check_writable, save_result
    from robustlab.reports.json import write_json
    from robustlab.reports.markdown import eval_table
    from robustlab.utils import set_threads
    from robustlab.validation import check_device, check_positive_int

    # everything the user typed is checked before the model, the data or an attack costs anything
    check_device(args.device)
    if args.n_samples is not None:
        check_positive_int(args.n_samples, "--n-samples")
    check_positive_int(args.batch_size, "--batch-size")
    if args.json:
        check_writable(args.json, what="--json file")
    if args.report:
        check_writable(args.report, folder=True, what="--report folder")
    set_threads(args.threads)
    model, extra = load_model(args.model, map_location=args.device)
    if getattr(model, "task", "classification") == "detection":
        from robustlab.cli.detection import eval_detector

        return eval_detector(args, model, extra)
    x, y = _load_eval_data(args.data, args.split, extra)
    from robustlab.attacks.spec import expand_panels

    specs = expand_panels(args.attack or ["pgd:norm=linf,eps=0.3,steps=40"])
    attacks = [create_attack(s, model) for s in specs]
    if args.n_samples is not None:
        x, y = x[: args.n_samples], y[: args.n_samples]
    result = evaluate(model, x.to(args.device), y.to(args.device), attacks, batch_size=args.batch_size,
                      progress=None if not args.quiet else False)
    result["model"] = str(args.model)
    result["data"] = {"name": args.data, "split": args.split}
    result["attack_specs"] = specs
    result["device"] = str(torch.device(args.device))
    print(eval_table(result))
    if args.json:
        return report_written(*save_result(args.json, lambda p: write_json(p, result), what="result JSON"))
    return 0



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustlab", description="Adversarial training and robustness evaluation.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("list", help="list registered attacks, models, datasets or methods")
    pl.add_argument("kind", nargs="?", choices=KINDS, help="what to list (default: everything)")
    pl.set_defaults(func=cmd_list)

    pe = sub.add_parser("eval", help="evaluate a checkpoint under a panel of attacks",
                        description="Evaluate a model checkpoint. Classifiers: clean, per-attack, union and average "
                                    "accuracy. Detectors: mAP@0.5 and per-class AP (--ap-mode, --report).")
    pe.add_argument("--model", required=True, help="model checkpoint (.safetensors) written by robustlab")
    pe.add_argument("--data", help="dataset NAME[:key=value,...] (see `robustlab list datasets`), e.g. "
                                   "mnist-det:preset=coco; default: the dataset the checkpoint was trained on")
    pe.add_argument("--split", default="test", choices=("test", "train"))
    pe.add_argument("--attack", action="append", metavar="SPEC",
                    help='attack spec "name:key=value,..." (repeatable), e.g. "pgd:norm=linf,eps=0.3,steps=40", or a '
                         'named panel: critic-rho (DeepFool, C&W, critic attack), part[:eps=E,step_size=A] (PGD-20, MMA, '
                         'AutoAttack); detectors: "cwa", '
                         '"det-pgd:objective=reg,eps=8", or the seed\'s panels table1 / table3')
    pe.add_argument("--json", type=Path, help="write the full results as JSON to this file")
    pe.add_argument("--n-samples", type=int, help="evaluate only the first N test samples")
    pe.add_argument("--batch-size", type=int, default=500)
    pe.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    pe.add_argument("--threads", type=int, help="torch CPU threads (set 1-2 on small machines)")
    pe.add_argument("--quiet", action="store_true", help="no progress bar")
    pe.add_argument("--ap-mode", default="11pt", choices=("11pt", "area", "coco"),
                    help="detectors: VOC07 11-point AP, all-point (area) AP, or COCO-rules AP50")
    pe.add_argument("--report", type=Path, help="detectors: write report.md with per-class AP and example images here")
    pe.set_defaults(func=cmd_eval)

    from robustlab.cli import analyze, compare, corruptions, detection, training

    training.add_commands(sub)
    compare.add_commands(sub)
    corruptions.add_commands(sub)
    detection.add_commands(sub)
    analyze.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as e:
        # User errors (bad spec, missing file, corrupt checkpoint): one clear line, exit code 2.
        print(f"robustlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
