"""The integrity probe's share of an evaluation (issue 34): on the main job's two models (`robustlab run`), a short
panel (PGD-10) and AutoAttack, each with `integrity="quick"` (the default) and `"full"`: the panel's seconds, the
probe's seconds and its share of the whole.

    robustlab run                                      # trains runs/mnist5k-pgd-at/{standard,pgd-at}
    python benchmarks/integrity.py --threads 1 [--run runs/mnist5k-pgd-at] [--n 100]
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from robustlab import evaluate
from robustlab.data import load_dataset
from robustlab.engine.checkpoint import load_model

PANELS = {"PGD-10": ["pgd:norm=linf,eps=0.3,steps=10"], "AutoAttack": ["autoattack:norm=linf,eps=0.3"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/mnist5k-pgd-at"), help="the main job's run folder")
    ap.add_argument("--n", type=int, default=100, help="mnist5k test images")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist5k")
    x, y = data.x_test[: args.n], data.y_test[: args.n]
    print("| model | panel | integrity | panel s | probe s | probe share | probe images, steps, Square queries |\n"
          "|---|---|---|---|---|---|---|")
    for label in ("standard", "pgd-at"):
        model, _ = load_model(args.run / label / "best.safetensors")
        for panel, specs in PANELS.items():
            for mode in ("quick", "full"):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = evaluate(model, x, y, specs, integrity=mode, progress=False)
                total = time.perf_counter() - start
                probe = r["integrity"]["seconds"]
                plan = r["integrity"]["plan"]
                print(f"| {label} | {panel} | {mode} | {total - probe:.1f} | {probe:.1f} | {probe / total:.0%} | "
                      f"{r['integrity']['n_probe']}, {plan['curve_steps']}/{plan['unbounded_steps']}, "
                      f"{plan['square_queries']} |", flush=True)


if __name__ == "__main__":
    main()
