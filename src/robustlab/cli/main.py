"""The `robustlab` command line: list, eval, train, run. Thin over the library; only this package reads argv."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Sequence

from robustlab.errors import RobustlabError

KINDS = ("attacks", "models", "datasets", "methods", "panels")


def _registry(kind: str):
    import robustlab  # noqa: F401  (registers attacks, models, datasets)
    import robustlab.methods  # noqa: F401  (registers the methods)
    from robustlab import registry

    return {"attacks": registry.ATTACKS, "models": registry.MODELS, "datasets": registry.DATASETS,
            "methods": registry.METHODS}[kind]


def _panels() -> dict[str, str]:
    """Named attack panels (usable wherever attack specs are) and what each expands to."""
    from robustlab.attacks.spec import PANELS, expand_panels
    from robustlab.detection.attacks import PANELS as DET_PANELS

    out = {}
    for name, fn in PANELS.items():
        doc = " ".join((fn.__doc__ or "").split())
        out[name] = f"{doc}\n  default expansion: " + "; ".join(expand_panels([name]))
    for name, specs in DET_PANELS.items():
        out[name] = "detection panel of the class-aware SSD paper: " + "; ".join(f"{k} = {v}" for k, v in specs.items())
    return out


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        if len(kinds) > 1:
            print(f"{kind}:")
        if kind == "panels":
            entries = _panels()
        else:
            reg = _registry(kind)
            entries = {name: reg.describe(name) for name in reg.names()}
        indent = "  " if len(kinds) > 1 else ""
        for name, text in entries.items():
            lines = [line for line in text.splitlines() if line.strip()] or [""]
            print(f"{indent}{name:18s} {lines[0]}")
            for line in lines[1:]:
                print(f"{indent}{'':18s} {line.strip()}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from robustlab.cli.common import command_line, report_written
    from robustlab.engine.checkpoint import load_model
    from robustlab.engine.tasks import task_of
    from robustlab.outputs import check_writable, save_result
    from robustlab.reports.json import write_json
    from robustlab.utils import machine_description, set_threads
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
    task = task_of(model, args)  # classification or detection: data, metric, attacks and report follow from it
    split, data = task.eval_data(args.data, args.split, extra, model)
    specs = task.expand_specs(args.attack) if args.attack else list(task.default_specs)
    result = task.evaluate(model, split, specs, args.n_samples, batch_size=args.batch_size,
                           examples=task.report_examples if args.report else 0,
                           progress=None if not args.quiet else False)
    result.update({"model": str(args.model), "data": data, "attack_specs": specs,
                   "device": str(torch.device(args.device))})
    print(task.table(result))
    if args.report:
        title = f"{task.name.capitalize()} evaluation: {Path(args.model).name}"
        print(f"wrote {task.write_report(args.report, result, title, command_line(), machine_description())}")
    result.pop("examples", None)
    if args.json:
        return report_written(*save_result(args.json, lambda p: write_json(p, result), what="result JSON"))
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default (options without one, or with help=SUPPRESS, stay as they are)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustlab", description="Adversarial training and robustness evaluation.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logs, and the traceback of a user error too (also accepted after the subcommand)")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("list", help="list registered attacks, models, datasets, methods and attack panels")
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
    pe.add_argument("--report", type=Path, help="write report.md with the results table here (detectors: with per-class "
                                                "AP and example images)")
    pe.set_defaults(func=cmd_eval)

    from robustlab.cli import analyze, compare, corruptions, detection, training

    training.add_commands(sub)
    compare.add_commands(sub)
    corruptions.add_commands(sub)
    detection.add_commands(sub)
    analyze.add_commands(sub)
    for parser in _all_parsers(p):
        parser.formatter_class = _HelpFormatter
        for action in parser._actions:  # an option without help text still shows its default
            if action.help is None and action.default not in (None, False) and action.option_strings:
                action.help = "(default: %(default)s)"
    return p


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 success; 2 a user error (robustlab.errors, or an OS error on a path the user gave), printed as
    one line (-v adds its traceback); 1 anything else: a bug, shown with its traceback; 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)  # before or after the subcommand
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value config overrides may appear anywhere among the options of commands that take them
        if hasattr(args, "overrides") and all(OVERRIDE.match(a) for a in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `robustlab list | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except RobustlabError as e:
        return _user_error(args.command, str(e), verbose)
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug or the machine, keep the traceback
            raise
        return _user_error(args.command, f"{e.strerror or e}: {e.filename}", verbose)


def _user_error(command: str, message: str, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(f"robustlab {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
