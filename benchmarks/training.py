"""Training cost per method: seconds per epoch and forward/backward image-passes per training image,
as ratios to standard training measured in the same process.

    python benchmarks/training.py                        # CPU, small CNN on mnist5k (width 8)
    python benchmarks/training.py --methods pgd-at trades --steps 10 --device cuda
    python benchmarks/training.py --methods adv-inf adv-l1 adv-l2 trades-inf adv-avg adv-max msd sat sat-ac mng-ac \
        --ratio-to adv-inf adv-avg                       # MNG-AC's table: cost relative to Adv_inf
    python benchmarks/training.py --methods pgd-at wpgd --ratio-to pgd-at   # WPGD vs PGD-AT, same steps

PGD-AT with k steps should cost at most 1.1 x (k + 1) x standard training (the k attack passes plus
the training pass, each a forward and a backward). Evaluation is switched off while timing.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from robustlab.data import load_dataset
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer

EPS = 0.3


def method_kwargs(method: str, steps: int) -> dict:
    return {"standard": {}, "fgsm-at": {"eps": EPS}, "fast-at": {"eps": EPS}, "free-at": {"eps": EPS, "replays": 4},
            "pgd-at": {"eps": EPS, "steps": steps}, "trades": {"eps": EPS, "steps": steps},
            "mart": {"eps": EPS, "steps": steps}, "vat": {"eps": 2.0}, "margin": {"lam": 0.1},
            "critic": {"critic_hidden": 1200},
            # PART from the first epoch (no burn-in), so the timed epoch pays for the CAM pass
            "part": {"eps": EPS, "eps_low": 0.2625, "steps": steps, "step_size": 0.1, "burn_in_epochs": 0},
            "part-t": {"eps": EPS, "eps_low": 0.2625, "steps": steps, "burn_in_epochs": 0},
            "part-m": {"eps": EPS, "eps_low": 0.2625, "steps": steps, "burn_in_epochs": 0},
            # the multi-perturbation family at MNIST budgets with the official attack step counts
            # (l_inf 10, l_2 10, l_1 20, MSD 20; mng_ac.md 1.8)
            "adv-inf": {"eps": EPS}, "adv-l2": {"eps": 2.0, "step_size": 0.3}, "adv-l1": {"eps": 10.0},
            "trades-inf": {"eps": EPS, "steps": 10}, **{m: MULTI for m in MULTI_NORM},
            # WPGD: the cost of the metric does not depend on its values; uniform keeps it data-free
            "wpgd": {"eps": EPS, "steps": steps, "metric": "uniform", "p": 2.5}}[method]


MULTI = {"eps_linf": EPS, "eps_l2": 2.0, "eps_l1": 10.0, "step_size_linf": 0.04, "step_size_l2": 0.3}
MULTI_NORM = ("adv-avg", "adv-max", "msd", "sat", "sat-ac", "mng-ac")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["standard", "fgsm-at", "fast-at", "free-at", "pgd-at", "trades",
                                                     "mart", "vat"])
    p.add_argument("--steps", type=int, default=7, help="inner PGD steps for pgd-at/trades/mart")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--model", default="small-cnn", choices=("small-cnn", "mlp"),
                   help="mlp: the adversary-critic paper's 3x1200 network")
    p.add_argument("--n-train", type=int, default=2000, help="training images per timed epoch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--ratio-to", nargs="+", default=["standard", "fgsm-at"],
                   help="ratio columns against these methods (when they are in --methods)")
    p.add_argument("--json")
    p.add_argument("--checkpoint-cost", action="store_true",
                   help="instead: the cost of states within the epoch (checkpoint_every) on the main job's PGD-AT model")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint_cost:
        return checkpoint_cost(args)
    data = load_dataset("mnist5k")
    data.x_train, data.y_train = data.x_train[: args.n_train], data.y_train[: args.n_train]
    rows = []
    for method in args.methods:
        cfg = TrainConfig(name=f"bench-{method}", method=method, method_kwargs=method_kwargs(method, args.steps),
                          model=args.model, epochs=2,  # the critic pretrains in epoch 1; epoch 2 is timed
                          model_kwargs={"width": args.width, "hidden": 64} if args.model == "small-cnn" else {},
                          batch_size=128, optimizer="sgd", lr=0.01, eval_every=10 ** 6, eval_samples=1,
                          device=args.device, amp=args.amp, channels_last=args.channels_last,
                          out_dir="/tmp/robustlab-bench", select_best=False, progress=False)
        trainer = Trainer(cfg, data=data)
        trainer.evaluate = lambda: {"eval_clean": 0.0, "eval_robust": 0.0, "eval_attack": "off"}  # type: ignore
        t = time.perf_counter()
        hist = trainer.fit()["history"]
        # epoch 2 only (epoch 1 includes warm-up); the Trainer reports per-epoch seconds of the loop alone
        rows.append({"method": method, "seconds_per_epoch": hist[-1]["seconds"],
                     "forward_per_image": hist[-1]["forward_per_image"],
                     "backward_per_image": hist[-1]["backward_per_image"], "wall": time.perf_counter() - t})
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " + (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU")
    by_name = {r["method"]: r for r in rows}
    refs = [by_name[m] for m in args.ratio_to if m in by_name] or [rows[0]]
    net = f"small-cnn width {args.width}" if args.model == "small-cnn" else "mlp 3x1200"
    print(f"{net}, {args.n_train} images/epoch, batch 128, inner steps {args.steps}; {machine}\n")
    print("| method | s/epoch |" + "".join(f" x {b['method']} |" for b in refs) + " fwd/img | bwd/img |"
          + "".join(f" passes x {b['method']} |" for b in refs))
    print("|---|---|" + "---|" * len(refs) + "---|---|" + "---|" * len(refs))
    for r in rows:
        passes = r["forward_per_image"] + r["backward_per_image"]
        r["time_ratio"] = {b["method"]: r["seconds_per_epoch"] / b["seconds_per_epoch"] for b in refs}
        r["pass_ratio"] = {b["method"]: passes / (b["forward_per_image"] + b["backward_per_image"]) for b in refs}
        print(f"| {r['method']} | {r['seconds_per_epoch']:.2f} |" + "".join(f" {v:.2f} |" for v in r["time_ratio"].values())
              + f" {r['forward_per_image']:.1f} | {r['backward_per_image']:.1f} |"
              + "".join(f" {v:.2f} |" for v in r["pass_ratio"].values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": rows}, f, indent=2)


def checkpoint_cost(args) -> None:
    """Epoch 2 of PGD-AT on the main job's model (small-cnn width 16, hidden 100, 7 steps) with no state within the
    epoch and with one every 10 steps, in the same process; one state write timed alone; the default (one state per
    30 minutes) as a share of training time."""
    import tempfile

    data = load_dataset("mnist5k")
    data.x_train, data.y_train = data.x_train[: args.n_train], data.y_train[: args.n_train]
    seconds, write = {}, 0.0
    for every in (None, 10):
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(name="ckpt", method="pgd-at", method_kwargs={"eps": EPS, "steps": 7,
                                                                           "step_size": 2.5 * EPS / 7},
                              model="small-cnn", model_kwargs={"width": 16, "hidden": 100}, epochs=2, batch_size=64,
                              optimizer="adam", lr=1e-3, eval_every=10 ** 6, eval_samples=1, out_dir=out,
                              select_best=False, progress=False, checkpoint_every=every)
            trainer = Trainer(cfg, data=data)
            trainer.evaluate = lambda: {"eval_clean": 0.0, "eval_robust": 0.0, "eval_attack": "off"}  # type: ignore
            seconds[every] = trainer.fit()["history"][-1]["seconds"]
            t = time.perf_counter()
            for _ in range(5):
                trainer.save_state(trainer.run_dir / "timed.safetensors")
            write = (time.perf_counter() - t) / 5
    steps = -(-args.n_train // 64)
    print(f"PGD-AT (7 steps), small-cnn width 16, {args.n_train} images/epoch, batch 64, {torch.get_num_threads()} "
          f"threads\n\n| | s/epoch | x no state |\n|---|---|---|")
    print(f"| no state within the epoch | {seconds[None]:.2f} | 1.000 |")
    print(f"| checkpoint_every: 10 ({(steps - 1) // 10} states per epoch) | {seconds[10]:.2f} | "
          f"{seconds[10] / seconds[None]:.3f} |")
    print(f"\none state write: {1e3 * write:.1f} ms; at the default (checkpoint_every: 30m) "
          f"{100 * write / 1800:.4f}% of training time")


if __name__ == "__main__":
    main()
