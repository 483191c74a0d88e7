"""`robustlab corruptions generate` (the 19 CIFAR-10-C corruptions of any test set) and
`robustlab corruptions eval` (accuracy per corruption, PART's second table)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustlab.cli.common import command_line, load_labelled_models
from robustlab.errors import InputError
from robustlab.outputs import atomic_write_text


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from robustlab.attacks.spec import parse_spec
    from robustlab.data.corruptions import CORRUPTIONS, write_cifar10_c
    from robustlab.registry import DATASETS

    name, kwargs = parse_spec(args.data, DATASETS)
    data = DATASETS.create(name, **kwargs)
    n = min(args.n_samples or data.x_test.shape[0], data.x_test.shape[0])
    x = data.x_test[:n].permute(0, 2, 3, 1).numpy()  # NHWC float in [0, 1]
    y = data.y_test[:n].numpy()
    chosen = args.corruption or list(CORRUPTIONS)
    out = write_cifar10_c(np.round(x * 255).astype(np.uint8), y, args.out, corruptions=chosen, seed=args.seed,
                          progress=None if not args.quiet else False)
    print(f"wrote {len(chosen)} corruptions x 5 severities of {n} {args.data} test images to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from robustlab.engine.corruption_eval import corruption_accuracy, corruption_table
    from robustlab.utils import set_threads

    set_threads(args.threads)
    if not Path(args.root).is_dir():
        raise InputError(f"{args.root} is not a folder of <corruption>.npy files")
    models, _ = load_labelled_models(args.model, args.device, "classification")
    sev = [int(s) for s in args.severity.split(",")] if args.severity != "all" else [1, 2, 3, 4, 5]
    result = corruption_accuracy(models, args.root, corruptions=args.corruption, severities=sev,
                                 n_samples=args.n_samples, device=args.device)
    table = corruption_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = command_line()
        atomic_write_text(out / "corruptions.md", f"# Accuracy under corruptions (%), mean over severities {sev}\n\n"
                                            f"{table}\n\nReproduce: `{command}`\n")
        atomic_write_text(out / "corruptions.json", json.dumps({**result, "command": command}, indent=2))
        print(f"wrote {out}/corruptions.md and corruptions.json")
    return 0


def add_commands(sub) -> None:
    pc = sub.add_parser("corruptions", help="generate CIFAR-10-C style corruptions; accuracy per corruption",
                        description="generate: the 19 CIFAR-10-C corruptions x 5 severities of a dataset's test "
                                    "images, in the <corruption>.npy + labels.npy layout of the cifar10-c dataset. "
                                    "eval: accuracy of one or more models per corruption.")
    csub = pc.add_subparsers(dest="action", required=True)
    pg = csub.add_parser("generate", help="write <corruption>.npy files for a dataset's test images",
                         description="Corrupt a dataset's test images (19 corruptions x 5 severities, CIFAR-10-C "
                                     "parameters, seeded) and write the cifar10-c layout.")
    pg.add_argument("--data", default="mnist5k", help="dataset NAME[:key=value,...], e.g. cifar10:root=data/cifar10")
    pg.add_argument("--out", type=Path, required=True, help="output folder")
    pg.add_argument("--n-samples", type=int, help="only the first N test images")
    pg.add_argument("--corruption", action="append", help="only these corruptions (repeatable)")
    pg.add_argument("--seed", type=int, default=0, help="seed of the corruptions' random parameters")
    pg.add_argument("--quiet", action="store_true", help="no progress bar")
    pg.set_defaults(func=cmd_generate)
    pe = csub.add_parser("eval", help="accuracy per corruption of one or more checkpoints",
                         description="Accuracy (%) per corruption, averaged over the chosen severities, one column "
                                     "per model (the PART seed's CIFAR-10-C table).")
    pe.add_argument("--model", action="append", required=True, metavar="LABEL=PATH", help="checkpoint (repeatable)")
    pe.add_argument("--root", required=True, type=Path, help="folder with <corruption>.npy and labels.npy")
    pe.add_argument("--severity", default="all", help="'all' (mean over 1..5) or a list, e.g. 5 or 1,3,5")
    pe.add_argument("--corruption", action="append", help="only these corruptions (default: all present)")
    pe.add_argument("--n-samples", type=int, help="only the first N images of each severity")
    pe.add_argument("--out", type=Path, help="write corruptions.md and corruptions.json here")
    pe.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    pe.add_argument("--threads", type=int, help="torch CPU threads")
    pe.set_defaults(func=cmd_eval)
