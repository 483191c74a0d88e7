"""The `robustlab` command line: list, eval, train, run. Thin over the library; only this package reads argv."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Sequence

from robustlab.errors import RobustlabError, UserCodeError

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
    from robustlab.engine.distributed import Torchrun
    from robustlab.engine.external import load_any_model
    from robustlab.engine.tasks import task_of
    from robustlab.errors import InputError
    from robustlab.outputs import check_writable, save_result
    from robustlab.reports.json import write_json
    from robustlab.reports.store import data_key
    from robustlab.utils import machine_description, set_threads
    from robustlab.validation import check_device, check_positive_int

    # everything the user typed is checked before the model, the data or an attack costs anything
    check_device(args.device)
    if args.n_samples is not None:
        check_positive_int(args.n_samples, "--n-samples")
    check_positive_int(args.batch_size, "--batch-size")
    check_positive_int(args.draws, "--draws")
    if args.json:
        check_writable(args.json, what="--json file")
    if args.report:
        check_writable(args.report, folder=True, what="--report folder")
    for flag, path in (("--log", args.log), ("--robustbench-json", args.robustbench_json),
                       ("--save-adversarials", args.save_adversarials)):
        if path:
            check_writable(path, what=f"{flag} file")
    rb_info = {}
    if args.robustbench_info:
        from robustlab.reports.exports import parse_robustbench_info

        if not args.robustbench_json:
            raise InputError("--robustbench-info fills keys of the --robustbench-json entry: add --robustbench-json FILE")
        rb_info = parse_robustbench_info(args.robustbench_info)
    shard = _parse_shard(args.shard) if args.shard else None
    if shard is not None:
        if args.state is None:
            raise InputError(f"--shard {args.shard} writes its slice of the work to a state folder: add --state DIR "
                             "(one folder per shard), then robustlab eval-merge DIR... --json OUT.json")
        given = [f for f, v in (("--json", args.json), ("--log", args.log), ("--robustbench-json", args.robustbench_json),
                                ("--save-adversarials", args.save_adversarials), ("--report", args.report)) if v]
        if given:
            raise InputError(f"{', '.join(given)}: a --shard run holds a slice of the result; write the whole result "
                             "with robustlab eval-merge DIR... --json OUT.json")
    if args.save_adversarials and args.save_adversarials.suffix != ".safetensors":
        raise InputError(f"--save-adversarials {args.save_adversarials}: the file must end in .safetensors (float "
                         "tensors; image formats would quantise the perturbations away)")
    set_threads(args.threads)
    ranks = Torchrun(args.device, connect=False)  # under torchrun, the ranks take the batches round-robin
    if ranks.enabled:
        if shard is not None:
            raise InputError("--shard splits the work without torchrun; under torchrun the ranks split it")
        if args.device.startswith("cuda") and ":" not in args.device:
            args.device = f"cuda:{ranks.local_rank}"
    model, extra = load_any_model(args.model, model_kwargs=args.model_kwargs, weights=args.weights,
                                  normalize=args.normalize, input_range=args.input_range, map_location=args.device)
    if extra is None and args.data is None:
        raise InputError(f"--model {args.model} was not written by robustlab and names no dataset: pass --data "
                         "(a dataset NAME or an .npz / .safetensors / .pt file with x and y)")
    task = task_of(model, args)  # classification or detection: data, metric, attacks and report follow from it
    task.check_evaluation_options(precision=args.precision, compile=args.compile,
                                  keep_adversarials=bool(args.save_adversarials), draws=args.draws)
    split, data = task.eval_data(args.data, args.split, extra or {}, model)
    task.probe(model, split, args.model, f"--data {args.data}" if args.data else f"dataset {data['name']!r}")
    specs = task.expand_specs(args.attack) if args.attack else task.default_attacks(data)
    from robustlab.attacks.autoattack import is_protocol_autoattack

    if args.robustbench_json and not any(is_protocol_autoattack(s) for s in specs):
        raise InputError("--robustbench-json reports AutoAttack accuracy (standard or rand; version=fast is not "
                         "RobustBench's protocol): add --attack \"autoattack:norm=linf,eps=8/255\"")
    store = _results_store(args, wanted=True)
    options = dict(examples=task.report_examples if args.report else 0, precision=args.precision,
                   compile=args.compile, keep_adversarials=bool(args.save_adversarials),
                   keep_records=store is not None and task.per_sample_records, draws=args.draws,
                   integrity=args.integrity)
    if ranks.enabled:
        result = _torchrun_eval(task, model, split, specs, args, options, data)
        if result is None:
            return 0  # not rank 0: rank 0 writes the result
    else:
        result = task.evaluate(model, split, specs, args.n_samples, batch_size=args.batch_size,
                               progress=None if not args.quiet else False, state=args.state, shard=shard, **options)
    if shard is not None:
        _write_eval_context(args.state, args, data, specs, data_key(data) if store is not None else None)
        print(f"shard {shard[0]}/{shard[1]}: batches {', '.join(map(str, result['batches'])) or 'none'} of "
              f"{result['n_batches']} written to {args.state}; when every shard is done: robustlab eval-merge "
              f"DIR... --json OUT.json")
        return 0
    result.update({"model": str(args.model), "data": data, "attack_specs": specs,
                   "device": str(torch.device(args.device))})
    print(task.table(result))
    if args.report:
        title = f"{task.name.capitalize()} evaluation: {Path(args.model).name}"
        print(f"wrote {task.write_report(args.report, result, title, command_line(), machine_description())}")
    result.pop("examples", None)
    adversarials = result.pop("adversarials", None)
    records = result.pop("records", None)
    written = []
    if args.log:
        from robustlab.outputs import atomic_write_text

        written.append(save_result(args.log, lambda p: atomic_write_text(p, task.log(result)), what="log"))
    if args.robustbench_json:
        from robustlab.reports.exports import robustbench_entry

        entry = robustbench_entry(result, model_name=str(args.model), info=rb_info,
                                  dataset=None if data.get("name") == "file" else data.get("name"))
        written.append(save_result(args.robustbench_json, lambda p: write_json(p, entry), what="RobustBench JSON"))
    if args.save_adversarials:
        from robustlab.reports.exports import save_adversarials

        written.append(save_result(args.save_adversarials, lambda p: save_adversarials(p, adversarials, records, specs),
                                   what="adversarial examples"))
    if args.json:
        written.append(save_result(args.json, lambda p: write_json(p, result), what="result JSON"))
    rc = 0
    for w in written:
        rc = max(rc, report_written(*w))
    if store is not None:  # after the files the user asked for: a store that cannot be written loses none of them
        from robustlab import __version__
        from robustlab.reports.store import model_hash, record

        record(store, model_digest=model_hash(model), model_name=str(args.model), data=data_key(data), specs=specs,
               version=__version__, result={**result, "records": records})
        print(f"recorded in {store} (robustlab leaderboard --store {store})")
    return rc


def _parse_shard(text: str) -> tuple[int, int]:
    from robustlab.errors import InputError

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise InputError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4")
    return i, n


def _write_eval_context(folder: Path, args: argparse.Namespace, data: dict, specs: list[str],
                        store_data: str | None) -> None:
    """What eval-merge needs to write (and, with store_data, record) the result of a state folder the way `eval`
    does: the command's model, data and attack specs."""
    import torch

    from robustlab.outputs import atomic_write_text

    atomic_write_text(Path(folder) / "eval.json", json.dumps({
        "model": str(args.model), "data": data, "attack_specs": specs, "store_data": store_data,
        "device": str(torch.device(args.device))}))


def _torchrun_eval(task, model, split, specs, args, options, data) -> dict | None:
    """Rank r evaluates batches k with k % world == r into its own state folder (under --state, or a temporary
    folder rank 0 makes); rank 0 merges them once every rank is done. Returns the result on rank 0, else None."""
    import shutil
    import tempfile

    from robustlab.engine.distributed import Torchrun
    from robustlab.engine.tasks import merge_evaluations
    from robustlab.errors import InputError

    base = args.state
    if base is not None and (Path(base) / "manifest.json").exists():
        raise InputError(f"--state {base} holds a single-process evaluation: resume it without torchrun, or name a "
                         "new folder")
    ranks = Torchrun(args.device)  # the process group, from here to the end of this function
    temporary = base is None
    if temporary:
        base = ranks.broadcast(tempfile.mkdtemp(prefix="robustlab-eval-") if ranks.main else None)
    folders = [Path(base) / f"rank-{r}-of-{ranks.world}" for r in range(ranks.world)]
    finished = False
    try:
        task.evaluate(model, split, specs, args.n_samples, batch_size=args.batch_size,
                      progress=(None if not args.quiet else False) if ranks.main else False,
                      state=folders[ranks.rank], shard=(ranks.rank, ranks.world), **options)
        # eval-merge on these folders writes what this run writes; rank 0 records the result itself, so the
        # context names no store data (a merge of them must not record it twice)
        _write_eval_context(folders[ranks.rank], args, data, specs, None)
        ranks.barrier()
        result = merge_evaluations(folders, keep_records=options["keep_records"] or options["keep_adversarials"]) \
            if ranks.main else None
        ranks.barrier()
        finished = True
    finally:
        if temporary and ranks.main:
            shutil.rmtree(base, ignore_errors=True)
        ranks.close(together=finished)
    return result


def _results_store(args: argparse.Namespace, wanted: bool) -> Path | None:
    """The results store an evaluation records in, checked before the work: a --store that cannot be written is a
    user error; the default store that cannot be written is a warning, and the evaluation goes on unrecorded."""
    from robustlab.errors import OutputError
    from robustlab.reports.store import default_store, store_problem

    if args.no_store or not wanted:
        return None
    store = Path(args.store or default_store())
    problem = store_problem(store)
    if problem is None:
        return store
    if args.store:
        raise OutputError(f"--store {store} cannot be written ({problem}); give a writable path, or --no-store")
    print(f"robustlab {args.command}: warning: the default results store {store} cannot be written ({problem}); "
          "this evaluation will not be recorded (--store PATH records elsewhere, --no-store silences this)",
          file=sys.stderr)
    return None


def _eval_interrupted(args: argparse.Namespace) -> str:
    from robustlab.cli.common import command_line

    if args.state is not None:
        return f"every finished batch is kept in {args.state}; the same command resumes: {command_line()}"
    return ("nothing was kept: the batches evaluated so far are lost (with --state DIR each batch is kept the moment "
            "it is done, and the same command resumes)")


def cmd_eval_merge(args: argparse.Namespace) -> int:
    from robustlab.cli.common import report_written
    from robustlab.engine.tasks import merge_evaluations, task_named
    from robustlab.outputs import atomic_write_text, check_writable, save_result
    from robustlab.reports.json import write_json
    from robustlab.reports.store import record

    if args.json:
        check_writable(args.json, what="--json file")
    if args.log:
        check_writable(args.log, what="--log file")
    context_file = args.folders[0] / "eval.json"  # written by `robustlab eval --shard` and by torchrun's ranks
    context = json.loads(context_file.read_text()) if context_file.exists() else {}
    store = _results_store(args, wanted=context.get("store_data") is not None)
    result = merge_evaluations(args.folders, keep_records=True)
    result.pop("adversarials", None)
    result.pop("examples", None)  # a detector's report images: not JSON
    records = result.pop("records", None)  # per-sample flags: classifiers only
    result.update({k: context[k] for k in ("model", "data", "attack_specs", "device") if k in context})
    manifest = json.loads((args.folders[0] / "manifest.json").read_text())
    task = task_named(manifest.get("task", "classification"))()
    print(task.table(result))
    written = []
    if args.log:
        written.append(save_result(args.log, lambda p: atomic_write_text(p, task.log(result)), what="log"))
    if args.json:
        written.append(save_result(args.json, lambda p: write_json(p, result), what="result JSON"))
    rc = max([0] + [report_written(*w) for w in written])
    if store is not None:  # as `robustlab eval` would have, had it run in one piece
        from robustlab.version import __version__

        record(store, model_digest=manifest["model_sha256"], model_name=context["model"], data=context["store_data"],
               specs=context["attack_specs"], version=__version__, result={**result, "records": records})
        print(f"recorded in {store} (robustlab leaderboard --store {store})")
    return rc


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from robustlab.reports.store import default_store, format_leaderboard, leaderboard, store_contents

    store = args.store or default_store()
    rows = leaderboard(store, data=args.data, threat=args.threat)
    print(format_leaderboard(rows, args.format), end="")
    if not rows:  # say so, with what a filter could have matched (stdout stays a valid, empty table)
        held = store_contents(store)
        asked = " ".join(f"{flag} {v}" for flag, v in (("--data", args.data), ("--threat", args.threat)) if v)
        print(f"robustlab leaderboard: no evaluation in {store}" + (f" matches {asked}" if asked else "")
              + (f"; it holds data {', '.join(held['data'])} and threats {', '.join(held['threat'])}"
                 if held["data"] else " (it is empty)"), file=sys.stderr)
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
    pe.add_argument("--model", required=True,
                    help="a robustlab checkpoint, a TorchScript (torch.jit.save) or torch.export (.pt2) file, or your "
                         "own code: FILE.py:NAME or package.module:NAME (a class or a function returning an nn.Module; "
                         "imports that Python file)")
    pe.add_argument("--model-kwargs", metavar="JSON", help='arguments for NAME, e.g. \'{"depth": 28}\'')
    pe.add_argument("--weights", help="weights for FILE.py:NAME: safetensors or .pt/.pth/.ckpt read with "
                                      "torch.load(weights_only=True) (nested state_dict/model/net keys and "
                                      "module./_orig_mod. prefixes handled)")
    pe.add_argument("--normalize", metavar="MEAN/STD",
                    help="the model expects normalised inputs: wrap it so images stay in [0, 1], e.g. "
                         "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616")
    pe.add_argument("--input-range", type=float, default=1.0, choices=(1.0, 255.0),
                    help="255: the model takes pixels in [0, 255] (images are scaled inside the wrapper)")
    pe.add_argument("--data", help="dataset NAME[:key=value,...] (see `robustlab list datasets`), e.g. "
                                   "mnist-det:preset=coco, or a file (.npz, .safetensors, .pt) with x (N, C, H, W) "
                                   "float in [0, 1] or uint8 in [0, 255] (N, H, W, C or N, C, H, W) and y (int "
                                   "labels); default: the dataset the checkpoint was trained on")
    pe.add_argument("--split", default="test", choices=("test", "train"),
                    help="which split of a dataset --data names (an array file is one set: test only)")
    pe.add_argument("--attack", action="append", metavar="SPEC",
                    help='attack spec "name:key=value,..." (repeatable), e.g. "pgd:norm=linf,eps=0.3,steps=40", or a '
                         'named panel: critic-rho (DeepFool, C&W, critic attack), part[:eps=E,step_size=A] (PGD-20, MMA, '
                         'AutoAttack); detectors: "cwa", '
                         '"det-pgd:objective=reg,eps=8", or the seed\'s panels table1 / table3. Default: a classifier '
                         'gets PGD-40 at its dataset\'s standard l_inf budget (mnist, mnist5k 0.3; digits 0.1; cifar10, '
                         'cifar100, svhn 8/255; tiny-imagenet 4/255); an array file or image folder needs --attack; a '
                         'detector gets clean mAP only')
    pe.add_argument("--json", type=Path, help="write the full results as JSON to this file")
    pe.add_argument("--n-samples", type=int, help="evaluate only the first N test samples")
    pe.add_argument("--batch-size", type=int, default=500,
                    help="images per batch (the unit of work that --state keeps and --shard splits)")
    pe.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    pe.add_argument("--threads", type=int, help="torch CPU threads (set 1-2 on small machines)")
    pe.add_argument("--quiet", action="store_true", help="no progress bar")
    pe.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="the attacks' forward passes: bf16 autocast (gradients, projections and the judging of "
                         "adversarial points stay fp32; checked against fp32 on the first batch, with a warning)")
    pe.add_argument("--integrity", default="quick", choices=("quick", "full", "off"),
                    help="the integrity probe on the first batch (gradient masking, an unbounded attack, black-box vs "
                         "white-box, accuracy vs eps): quick keeps its cost within a quarter of the attacks' (an "
                         "AutoAttack panel affords the full probe), full always runs the whole probe, off skips it "
                         "with a warning; detectors: zero gradients, an unbounded PGD and mAP vs eps on 16 images of "
                         "the first batch (full: up to 64)")
    pe.add_argument("--draws", type=int, default=20,
                    help="a randomised model (two forward passes differ) has each adversarial image judged by this "
                         "many forward passes: robust accuracy is the expected accuracy, with its spread (a "
                         "deterministic model is judged by one pass)")
    pe.add_argument("--compile", action="store_true",
                    help="run the attacks' forward through torch.compile (pays off on long evaluations)")
    pe.add_argument("--log", type=Path, help="write the reference AutoAttack's log (initial accuracy, robust accuracy "
                                             "after each attack with its time, max perturbation) to this file")
    pe.add_argument("--robustbench-json", type=Path,
                    help="write a RobustBench model_info-style entry (clean_acc, autoattack_acc, eps as \"8/255\") here")
    pe.add_argument("--robustbench-info", action="append", metavar="KEY=VALUE",
                    help="a key of the RobustBench entry only you know (repeatable): name, link, authors, venue, "
                         "architecture, reported, footnote, dataset, additional_data (true/false), "
                         "number_forward_passes; keys not given are written as null")
    pe.add_argument("--save-adversarials", type=Path, metavar="FILE.safetensors",
                    help="store every attack's adversarial examples as floats, with the labels and per-sample flags")
    pe.add_argument("--store", type=Path, help="results store to record this evaluation in (SQLite; default "
                                               "$ROBUSTLAB_STORE or ~/.robustlab/results.sqlite)")
    pe.add_argument("--no-store", action="store_true", help="do not record this evaluation in the results store")
    pe.add_argument("--ap-mode", default="11pt", choices=("11pt", "area", "coco"),
                    help="detectors: VOC07 11-point AP, all-point (area) AP, or COCO-rules AP50")
    pe.add_argument("--report", type=Path, help="write report.md with the results table here (detectors: with per-class "
                                                "AP and example images)")
    pe.add_argument("--state", type=Path, metavar="DIR",
                    help="keep every batch's results here the moment they are computed; the same command resumes "
                         "from it (a folder written with other settings is refused, naming what differs)")
    pe.add_argument("--shard", metavar="I/N", help="evaluate only batches k with k %% N == I into --state (job arrays, "
                                                   "separate machines); robustlab eval-merge builds the result")
    pe.set_defaults(func=cmd_eval, on_interrupt=_eval_interrupted)

    pm = sub.add_parser("eval-merge", help="merge the state folders of a sharded evaluation into its result",
                        description="The result of `robustlab eval --shard I/N --state DIR_I` runs, equal to a "
                                    "single-process run (per-attack seconds are summed over the shards). Refuses "
                                    "folders with different settings and names the shards that are missing.")
    pm.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="the shards' --state folders")
    pm.add_argument("--json", type=Path, help="write the full results as JSON to this file")
    pm.add_argument("--log", type=Path, help="write the reference AutoAttack's log to this file")
    pm.add_argument("--store", type=Path, help="results store to record the merged evaluation in (default "
                                               "$ROBUSTLAB_STORE or ~/.robustlab/results.sqlite; shards run with "
                                               "--no-store are not recorded)")
    pm.add_argument("--no-store", action="store_true", help="do not record the merged evaluation in the results store")
    pm.set_defaults(func=cmd_eval_merge)

    pb = sub.add_parser("leaderboard", help="the local leaderboard: clean, AutoAttack and best-known robust accuracy",
                        description="Every recorded `robustlab eval`, per model (weight hash), data and threat model: "
                                    "clean accuracy, the latest AutoAttack robust accuracy and the best-known robust "
                                    "accuracy (per sample, the worst case over every attack ever run).")
    pb.add_argument("--data", help="only this data (as recorded, e.g. mnist5k:test or file:<sha256 prefix>; a name "
                                   "without its split matches every split)")
    pb.add_argument("--threat", help="only this threat model, e.g. linf:8/255 or l2:0.5 (budgets are compared as "
                                     "numbers: linf:0.30 = linf:0.3 = linf:76.5/255)")
    pb.add_argument("--store", type=Path, help="results store (default $ROBUSTLAB_STORE or ~/.robustlab/results.sqlite)")
    pb.add_argument("--format", default="md", choices=("md", "csv", "json", "html"), help="output format")
    pb.set_defaults(func=cmd_leaderboard)

    from robustlab.cli import analyze, compare, corruptions, detection, repeat, training

    training.add_commands(sub)
    repeat.add_commands(sub)
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
    except KeyboardInterrupt:  # Ctrl-C: one line that says what was kept (`train` says it itself)
        hint = getattr(args, "on_interrupt", None)
        print(f"robustlab {args.command}: interrupted; "
              + (hint(args) if hint else "files it finished are complete (every write is atomic); the work in "
                 "progress is lost"), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `robustlab list | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except UserCodeError as e:  # the user's code raised: one line, then their traceback (not robustlab's)
        rc = _user_error(args.command, str(e), verbose)
        print(e.user_traceback, end="", file=sys.stderr)
        return rc
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
