"""A randomised model under attack (issue 28): the expected accuracy of the adversarial images that robustlab's
APGD-CE (eot=20, compaction on and off) and `autoattack:version=rand` return, next to `pyautoattack`'s rand version
on the same images, each judged by the same fresh forward passes; and `evaluate`'s own judged number.

    robustlab run                             # trains runs/mnist5k-pgd-at/pgd-at/best.safetensors (3 minutes)
    python benchmarks/randomised.py --threads 1
    python benchmarks/randomised.py --checkpoint other.safetensors --sigma 0.1 --eps 0.3 --n 50

The model is the checkpoint with N(0, sigma^2) noise added to its input on every forward pass (a randomised
defense). docs/attacks.md ("Randomised models") holds the numbers, with those of the release before the fix.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from robustlab import evaluate
from robustlab.attacks import APGD, AutoAttack
from robustlab.data import load_dataset
from robustlab.engine.checkpoint import load_model
from robustlab.reports.markdown import attack_log


class Noisy(nn.Module):
    """Gaussian noise on the input of a classifier, fresh on every forward pass."""

    def __init__(self, net: nn.Module, sigma: float) -> None:
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


def expected_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> float:
    """Accuracy averaged over `draws` forward passes, the same seeded draws for every x judged."""
    torch.manual_seed(123)
    with torch.no_grad():
        return sum((model(x).argmax(1) == y).float().mean().item() for _ in range(draws)) / draws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/mnist5k-pgd-at/pgd-at/best.safetensors")
    ap.add_argument("--sigma", type=float, default=0.1, help="noise added to the input on every forward pass")
    ap.add_argument("--eps", type=float, default=0.3, help="l_inf budget")
    ap.add_argument("--n", type=int, default=50, help="mnist5k test images")
    ap.add_argument("--judge-draws", type=int, default=50, help="fresh forward passes judging each x_adv")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist5k")
    base, _ = load_model(args.checkpoint)
    model = Noisy(base.eval(), args.sigma).eval()
    x, y = data.x_test[: args.n], data.y_test[: args.n]
    rows = [("clean", x, 0.0)]
    runs = [("APGD-CE eot=20, compact", lambda: APGD(model, eps=args.eps, eot=20)(x, y)),
            ("APGD-CE eot=20, not compact", lambda: APGD(model, eps=args.eps, eot=20, compact=False)(x, y)),
            ("AutoAttack rand (robustlab)", lambda: AutoAttack(model, eps=args.eps, version="rand")(x, y)),
            ("AutoAttack rand (pyautoattack)",
             lambda: AutoAttack(model, eps=args.eps, version="rand", impl="reference")(x, y))]
    for name, run in runs:
        torch.manual_seed(0)
        start = time.perf_counter()
        rows.append((name, run(), time.perf_counter() - start))
    print(f"| attack ({args.n} images, l_inf {args.eps:g}, sigma {args.sigma:g}) | expected accuracy over "
          f"{args.judge_draws} draws | seconds |\n|---|---|---|")
    for name, x_adv, seconds in rows:
        print(f"| {name} | {100 * expected_accuracy(model, x_adv, y, args.judge_draws):.1f}% | {seconds:.1f} |")
    result = evaluate(model, x, y, [f"autoattack:norm=linf,eps={args.eps},version=rand"], integrity=False,
                      progress=False)
    print("\nrobustlab.evaluate (its own judging, 20 draws per image):")
    print("\n".join(attack_log(result, "autoattack")))


if __name__ == "__main__":
    main()
