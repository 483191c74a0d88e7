"""Data pipeline throughput on this machine.

    python benchmarks/data.py                 # VOC-format pipeline with 0, 1, 2 workers; in-memory CIFAR epoch
    python benchmarks/data.py --images 256 --size 300 --workers 0 1 2 4 --json out.json

1. VOC: a synthetic VOC folder (JPEGs of about the model's size, VOC XML, written by `robustlab.data.standins`) is
   read through `EpochLoader` exactly as training reads it (decode, SSD augmentation with per-sample seeds, resize
   to --size, collate), batch 32, for each worker count; images/s and the ratio to 0 workers (the target on 2
   cores: 2 workers >= 1.6x). Batches are checked equal across worker counts.
2. CIFAR in memory: one epoch of the Trainer's in-memory path (index, uint8 -> float on the device, crop-flip)
   over 50,000 CIFAR-shaped images, against a plain PyTorch loop over a float tensor (the ratio is the cost of
   robustlab's path).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from robustlab.data.augment import augment
from robustlab.data.embedded import as_float_images
from robustlab.data.loading import EpochLoader
from robustlab.data.standins import write_standin
from robustlab.detection.data import load_detection_data


def voc_pipeline(images: int, size: int, workers: list[int], batch: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        kwargs = write_standin("voc", folder, images, 1, 0, {"image_size": size, "train_sets": ["2007/trainval"]})
        data = load_detection_data("voc", **kwargs)
        index_batches = [torch.arange(s, min(s + batch, images)) for s in range(0, images, batch)]
        first = None
        for w in workers:
            loader = EpochLoader(data.train, w, seed=0)
            next(loader.epoch(index_batches[:1], epoch=99))  # start the workers (persistent) before timing
            t = time.perf_counter()
            out = list(loader.epoch(index_batches, epoch=0))
            seconds = time.perf_counter() - t
            if first is None:
                first = out
            same = all(torch.equal(a[0], b[0]) for a, b in zip(first, out))
            rows.append({"workers": w, "images_per_s": images / seconds, "same_batches_as_0": same})
            del loader
    base = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_to_0_workers"] = r["images_per_s"] / base
    return rows


def cifar_epoch(n: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    x_f = x_u8.float() / 255
    perm = torch.randperm(n, generator=g)

    def robustlab_path() -> None:
        gen = torch.Generator().manual_seed(1)
        for s in range(0, n, batch):
            augment(as_float_images(x_u8[perm[s:s + batch]]), "crop-flip", gen)

    def plain() -> None:
        for s in range(0, n, batch):
            x_f[perm[s:s + batch]].clone()

    out = {}
    for name, fn in (("robustlab", robustlab_path), ("plain_index", plain)):
        t = time.perf_counter()
        fn()
        out[name] = n / (time.perf_counter() - t)
    return {"images": n, "robustlab_images_per_s": out["robustlab"], "plain_index_images_per_s": out["plain_index"],
            "ratio": out["robustlab"] / out["plain_index"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192, help="VOC-format images (default: 192)")
    ap.add_argument("--size", type=int, default=300, help="model input size (default: 300, SSD300)")
    ap.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
    ap.add_argument("--cifar", type=int, default=50_000, help="in-memory CIFAR-shaped images (default: 50000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default: 1)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    voc = voc_pipeline(args.images, args.size, args.workers, args.batch_size)
    cifar = cifar_epoch(args.cifar, 128)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"VOC-format pipeline, {args.images} images at {args.size}x{args.size}, batch {args.batch_size}:")
    for r in voc:
        print(f"  {r['workers']} workers: {r['images_per_s']:7.1f} images/s  ({r['ratio_to_0_workers']:.2f}x 0 workers; "
              f"same batches: {r['same_batches_as_0']})")
    print(f"in-memory CIFAR epoch ({cifar['images']} images, uint8 -> float + crop-flip): "
          f"{cifar['robustlab_images_per_s']:.0f} images/s ({cifar['images'] / cifar['robustlab_images_per_s']:.2f} s "
          f"per epoch); plain float indexing without augmentation (the ceiling) {cifar['plain_index_images_per_s']:.0f} "
          f"images/s (ratio {cifar['ratio']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"voc": voc, "cifar": cifar}, indent=2))


if __name__ == "__main__":
    main()
