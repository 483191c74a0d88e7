"""Pieces several commands share: the command line as typed (for "Reproduce:" lines in reports), loading
`LABEL=PATH` checkpoints (robustlab compare, det-report, corruptions eval) and evaluation data, and saying where a
result was written."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from robustlab.errors import InputError
from robustlab.validation import parse_assignment


def command_line() -> str:
    """`robustlab ...` exactly as invoked, quoted so that it can be pasted back into a shell."""
    return "robustlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def load_labelled_models(items: list[str], device: str, task: str, all_extras: bool = False):
    """{label: model in eval mode} from `LABEL=PATH` items (a bare PATH is labelled by its run folder) and the
    first checkpoint's extra metadata (all_extras: {label: extra} instead). Every model must be for `task`;
    labels must be distinct."""
    from robustlab.engine.checkpoint import load_model

    models, extras, first = {}, {}, None
    for item in items:
        if "=" in item:
            label, path = parse_assignment(item, "--model LABEL=PATH", literal=False)
        else:  # a bare PATH: labelled by its run folder
            label, path = Path(item).parent.name or Path(item).stem, item
        if label in models:
            raise InputError(f"model label {label!r} given twice; use LABEL=PATH to name them")
        model, extra = load_model(path, map_location=device)
        if getattr(model, "task", "classification") != task:
            raise InputError(f"{path} is not a {task} checkpoint (compare classifiers with `robustlab compare`, "
                             "detectors with `robustlab det-report`)")
        models[label] = model.eval()
        extras[label] = extra
        first = first if first is not None else extra
    return models, (extras if all_extras else first)


def report_written(path: Path, problem: str | None) -> int:
    """Say where a result went (outputs.save_result); exit code 2 when it could not go where the user asked and
    was saved elsewhere."""
    if problem:
        print(f"robustlab: error: {problem}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def load_eval_data(spec: str | None, split: str, extra: dict):
    """(x, y) of a classification dataset: `spec` (NAME[:key=value,...]) or the one a checkpoint was trained on."""
    from robustlab.engine.tasks import Classification

    return Classification().eval_data(spec, split, extra)[0]
