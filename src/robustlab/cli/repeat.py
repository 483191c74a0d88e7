"""`robustlab repeat` (one config over seeds) and `robustlab compare-runs` (two repeats, paired by seed)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from robustlab.outputs import atomic_write_text


def cmd_repeat(args: argparse.Namespace) -> int:
    from robustlab.analysis.repeat import Repeat, SeedFailed, parse_seeds, run_repeat
    from robustlab.engine.config import load_config
    from robustlab.validation import check_positive_int

    seeds = parse_seeds(args.seeds)
    check_positive_int(args.threads, "--threads")
    jobs = args.jobs if args.jobs is not None else max(1, (os.cpu_count() or 1) // args.threads)
    check_positive_int(jobs, "--jobs")
    if args.n_samples is not None:
        check_positive_int(args.n_samples, "--n-samples")
    out = args.out_dir or Path("repeats") / load_config(args.config, list(args.overrides)).name
    rep = Repeat(out, args.config, args.overrides, args.attack or [], args.n_samples, args.threads,
                 trained_from=args.trained_from)
    print(f"repeat {rep.name}: seeds {', '.join(map(str, seeds))}, {min(jobs, len(seeds))} at a time, in {out}",
          flush=True)
    try:
        agg = run_repeat(rep, seeds, jobs, report=lambda m: print(m, flush=True))
    except SeedFailed as e:
        print(f"robustlab repeat: {e}; the seeds that finished are kept, the same command resumes", file=sys.stderr)
        return 1
    print(_table(agg))
    print(f"wrote {Path(out) / 'repeat.json'}")
    return 0


SCALE = "every value x 100: accuracies in %, rho and mAP x 100"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _table(agg: dict) -> str:
    lines = [f"{len(agg['seeds'])} seeds, {agg['n_images']} test images; mean, seed std and "
             f"{int(100 * agg['level'])}% t interval over seeds; the test set's binomial std beside "
             f"({SCALE})",
             "| metric | mean | seed std | interval | binomial std |", "|---|---|---|---|---|"]
    for k, m in agg["metrics"].items():
        lo, hi = m["ci"]
        lines.append(f"| {k} | {_pct(m['mean'])} | {_pct(m['std'])} | "
                     f"{'-' if lo is None else f'{_pct(lo)} to {_pct(hi)}'} | "
                     f"{_pct(m['sampling']['binomial_std']) if m['sampling'] else '-'} |")
    return "\n".join(lines)


def cmd_compare_runs(args: argparse.Namespace) -> int:
    from robustlab.analysis.repeat import compare_runs

    out = compare_runs(args.a, args.b)
    lines = [f"A = {args.a}, B = {args.b}: {len(out['seeds'])} seeds paired ({', '.join(map(str, out['seeds']))}), "
             f"{out['n_images']} test images ({SCALE})",
             "| metric | A | B | A - B (points) | interval | verdict | test-set std of A - B |",
             "|---|---|---|---|---|---|---|"]
    for k, m in out["metrics"].items():
        d = m["difference"]
        lo, hi = d["ci"]
        interval = "-" if lo is None else f"{100 * lo:+.1f} to {100 * hi:+.1f}"
        lines.append(f"| {k} | {_pct(m['a'])} | {_pct(m['b'])} | {100 * d['mean']:+.1f} | {interval} | "
                     f"{d['verdict']} | {_pct(m['sampling_std_of_difference'])} |")
    print("\n".join(lines))
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def add_commands(sub) -> None:
    pr = sub.add_parser("repeat", help="train and evaluate one config over seeds, with intervals",
                        description="Train the config once per seed (seed=S) and evaluate each run's selected "
                                    "checkpoint (best.safetensors: chosen on validation data) on the test data; "
                                    "writes per-seed results and repeat.json (per metric: the values, mean, standard "
                                    "deviation and 95% t interval over seeds, and the test set's binomial error). "
                                    "Resumable: a seed with a result is never run again, a killed one resumes.")
    pr.add_argument("--config", type=Path, required=True, help="YAML config (see configs/)")
    pr.add_argument("--seeds", default="5", help="how many seeds (0..N-1), or a list: 0,3,7")
    pr.add_argument("--out-dir", type=Path, help="the repeat's folder (default: repeats/<config name>)")
    pr.add_argument("--attack", action="append", metavar="SPEC",
                    help="the evaluation's attack spec or panel (repeatable; default: the config's eval_attack)")
    pr.add_argument("--n-samples", type=int, help="evaluate the first N test images (default: all)")
    pr.add_argument("--trained-from", type=Path, metavar="DIR",
                    help="evaluate the seeds another repeat of the same config and overrides trained (its seed-S "
                         "runs; trained there first where missing), e.g. a costlier attack on fewer images")
    pr.add_argument("--jobs", type=int, help="seeds run side by side (default: the machine's cores / --threads)")
    pr.add_argument("--threads", type=int, default=1, help="torch CPU threads of each seed's processes")
    pr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. epochs=3")
    pr.set_defaults(func=cmd_repeat)

    pc = sub.add_parser("compare-runs", help="the paired difference of two repeats, with its interval and verdict",
                        description="A - B per metric over the seeds both repeats evaluated (paired by seed): the "
                                    "mean difference, its 95% t interval and a verdict: 'A better' or 'B better' "
                                    "when the interval excludes 0, else 'no detectable difference at this sample "
                                    "size'. The test set's binomial error of the difference is shown beside.")
    pc.add_argument("a", type=Path, metavar="A", help="a repeat folder (robustlab repeat --out-dir A)")
    pc.add_argument("b", type=Path, metavar="B", help="another repeat folder, evaluated on the same test images")
    pc.add_argument("--json", type=Path, help="write the comparison as JSON to this file")
    pc.set_defaults(func=cmd_compare_runs)


__all__ = ["add_commands"]
