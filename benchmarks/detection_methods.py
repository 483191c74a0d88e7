"""Training cost of the detection methods: backward passes per minibatch (by the Trainer's counters) and
seconds per epoch, as ratios to STD measured in the same process (spec cwat.md 4.2, the seed's App. B).

    python benchmarks/detection_methods.py --threads 2                   # TinySSD-96, 256 MNIST-Det images
    python benchmarks/detection_methods.py --model ssd300-vgg16 --device cuda --n-train 512

The seed counts 23 back-propagations per iteration for MTD (PGD-10) against 2 per replay for fast CWAT and
reports fast CWAT 3.19x faster on 4 GPUs; the last line prints the measured MTD / CWAT-fast ratio per update.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from robustlab.detection.data import mnist_det
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer

METHODS = {"det-std": {}, "cls": {"steps": 10}, "reg": {"steps": 10}, "toat": {"steps": 10},
           "owat": {"steps": 10}, "cwat": {"steps": 10}, "mtd": {"steps": 10},
           "cwat-fast": {"replays": 4}, "mtd-fast": {"replays": 4}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--model", default="tinyssd-96")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = {"tinyssd-96": 96, "tinyssd-128": 128}.get(args.model, 300)
    data = mnist_det(preset="voc", n_train=args.n_train, n_test=8, image_size=min(size, 128))
    if size == 300:  # SSD300: the same scenes upsampled
        for src in (data.train, data.test):
            src.images = torch.nn.functional.interpolate(src.images.float(), size=(300, 300), mode="bilinear",
                                                         align_corners=False).round().clamp(0, 255).byte()
            src.image_size = 300
    rows = []
    for method in args.methods:
        cfg = TrainConfig(name=f"bench-{method}", dataset="mnist-det", model=args.model, method=method,
                          method_kwargs=METHODS[method], epochs=2, batch_size=args.batch_size, lr=0.001,
                          eval_every=10 ** 6, eval_samples=1, device=args.device, amp=args.amp, select_best=False,
                          progress=False, out_dir="/tmp/robustlab-bench")
        trainer = Trainer(cfg, data=data)
        trainer.evaluate = lambda: {"eval_clean": 0.0}  # type: ignore[method-assign]  (timing only)
        hist = trainer.fit()["history"]
        last = hist[-1]  # epoch 2: epoch 1 includes warm-up
        m = trainer.method.steps_per_batch()
        rows.append({"method": method, "seconds_per_epoch": last["seconds"], "updates_per_minibatch": m,
                     "backward_per_minibatch": last["backward_per_image"],
                     "forward_per_minibatch": last["forward_per_image"]})
    std = next((r for r in rows if r["method"] == "det-std"), rows[0])
    print(f"{args.model}, {args.n_train} images/epoch, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("| method | s/epoch | x STD | updates/minibatch | backward/minibatch | forward/minibatch | s per update x STD |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["x_std"] = r["seconds_per_epoch"] / std["seconds_per_epoch"]
        r["per_update_x_std"] = r["x_std"] / r["updates_per_minibatch"]
        print(f"| {r['method']} | {r['seconds_per_epoch']:.2f} | {r['x_std']:.2f} | {r['updates_per_minibatch']} | "
              f"{r['backward_per_minibatch']:.0f} | {r['forward_per_minibatch']:.0f} | {r['per_update_x_std']:.2f} |")
    by = {r["method"]: r for r in rows}
    if "mtd" in by and "cwat-fast" in by:
        ratio = by["mtd"]["per_update_x_std"] / by["cwat-fast"]["per_update_x_std"]
        print(f"MTD / CWAT-fast, seconds per model update: {ratio:.2f}x (the seed: 3.19x on 4 GPUs; "
              f"backward passes {by['mtd']['backward_per_minibatch']:.0f} vs "
              f"{by['cwat-fast']['backward_per_minibatch'] / by['cwat-fast']['updates_per_minibatch']:.0f} per update)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine": platform.processor() or platform.machine(), "model": args.model}, f,
                      indent=2)


if __name__ == "__main__":
    main()
