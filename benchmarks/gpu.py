"""The GPU table in one command (docs/benchmarks.md): run it the moment a GPU is available.

    python benchmarks/gpu.py                         # CUDA, full sizes, prints the table with the device name
    python benchmarks/gpu.py --json gpu.json
    python benchmarks/gpu.py --device cpu --quick    # the same code paths at toy sizes (checks the script runs)

1. ResNet-18 on CIFAR-shaped data (batch 128, data on the device): training images/s of standard training and
   PGD-10 AT through robustlab's Trainer, in fp32, bf16, bf16 + channels_last and bf16 + channels_last + compile,
   each as a ratio to a plain PyTorch loop doing the same passes with the same settings in this process.
2. PGD-40 (l_inf 8/255) and AutoAttack (standard, l_inf 8/255) images/s on that ResNet-18, against torchattacks'
   PGD and the AutoAttack authors' code (`pyautoattack`) on the same model and images. Labels are the model's own
   predictions, so every image starts correctly classified (no free early exits).
3. SSD300-VGG16 CWAT-fast training images/s (VOC-format stand-in at 300x300, bf16 + channels_last), and the
   DataLoader's images/s on the same VOC-format data for several worker counts: the loader must outrun the model.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from robustlab.attacks import AutoAttack, create_attack
from robustlab.data.embedded import ImageData
from robustlab.data.loading import EpochLoader
from robustlab.data.standins import write_standin
from robustlab.detection.data import load_detection_data
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer
from robustlab.models import create_model

MODES = {"fp32": dict(amp="none", channels_last=False, compile=False),
         "bf16": dict(amp="bf16", channels_last=False, compile=False),
         "bf16+cl": dict(amp="bf16", channels_last=True, compile=False),
         "bf16+cl+compile": dict(amp="bf16", channels_last=True, compile=True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cifar_like(n: int, device: torch.device) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("cifar-shaped", x, y, x[:256].float() / 255, y[:256], 10)


def robustlab_training(method: str, mode: dict, n: int, batch: int, device: torch.device, width: int) -> float:
    """Images/s of the Trainer's second epoch (the first warms up and compiles)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(name="bench", out_dir=out, dataset="cifar10", model="resnet18", model_kwargs={"width": width},
                          method=method, method_kwargs={"eps": 8 / 255, "steps": 10} if method == "pgd-at" else {},
                          epochs=2, batch_size=batch, lr=0.05, validation=0, select_best=False, eval_every=2,
                          eval_samples=batch, data_on_device=device.type == "cuda",
                          device=str(device), progress=False, **mode)
        trainer = Trainer(cfg, data=cifar_like(n, device))
        history = trainer.fit()["history"]
    return n / history[-1]["seconds"]


def plain_training(pgd_steps: int, mode: dict, n: int, batch: int, device: torch.device, width: int) -> float:
    """The loop a user would write: same model, SGD, crop-free batches from a device tensor, PGD in plain torch."""
    model = create_model("resnet18", width=width).to(device)
    if mode["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if mode["compile"] else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    data = cifar_like(n, device)
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode["amp"] == "bf16" else nullcontext()
    eps, alpha = 8 / 255, 2 / 255

    def epoch() -> None:
        for s in range(0, n, batch):
            x = x_all[s:s + batch].float() / 255
            y = y_all[s:s + batch]
            if mode["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                if pgd_steps:
                    model.eval()
                    xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
                    for _ in range(pgd_steps):
                        xa.requires_grad_(True)
                        (g,) = torch.autograd.grad(F.cross_entropy(net(xa), y), xa)
                        xa = (x + (xa.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
                    model.train()
                    x = xa.detach()
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch()  # warm-up (and compilation)
    sync(device)
    t = time.perf_counter()
    epoch()
    sync(device)
    return n / (time.perf_counter() - t)


def timed(fn, device: torch.device) -> float:
    fn()  # warm-up
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def attacks(n: int, device: torch.device, width: int) -> list[dict]:
    model = create_model("resnet18", width=width).to(device).eval()
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correctly classified
    rows = []
    ours = create_attack("pgd:norm=linf,eps=8/255,steps=40,step_size=2/255", model)
    t_ours = timed(lambda: ours(x, y), device)
    try:
        import torchattacks

        ref = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=40, random_start=True)
        t_ref: float | None = timed(lambda: ref(x, y), device)
    except ImportError:
        t_ref = None
    rows.append({"attack": "PGD-40 linf 8/255", "robustlab": n / t_ours, "reference": t_ref and n / t_ref,
                 "reference_impl": "torchattacks"})
    aa = AutoAttack(model, norm="linf", eps=8 / 255)
    t_ours = timed(lambda: aa(x, y), device)
    try:
        import logging

        import pyautoattack  # noqa: F401

        logging.getLogger("auto-attack").setLevel(logging.ERROR)
        ref_aa = AutoAttack(model, norm="linf", eps=8 / 255, impl="reference")
        t_ref = timed(lambda: ref_aa(x, y), device)
    except ImportError:
        t_ref = None
    rows.append({"attack": "AutoAttack standard linf 8/255", "robustlab": n / t_ours,
                 "reference": t_ref and n / t_ref, "reference_impl": "pyautoattack"})
    return rows


def detection(n: int, batch: int, device: torch.device, workers: list[int], quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        kwargs = write_standin("voc", Path(folder) / "voc", n, 2, 0, {"image_size": 300,
                                                                     "train_sets": ["2007/trainval"]})
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(name="cwat-fast", out_dir=out, dataset="voc", dataset_kwargs=kwargs,
                              model="ssd300-vgg16", model_kwargs={"width": 0.125} if quick else {},
                              method="cwat-fast", epochs=2, batch_size=batch, lr=1e-3, validation=0,
                              select_best=False, eval_every=2, eval_samples=2, amp="bf16" if device.type == "cuda"
                              else "none", channels_last=True, device=str(device), progress=False,
                              workers=max(workers))
            history = Trainer(cfg).fit()["history"]
        model_rate = n / history[-1]["seconds"]
        data = load_detection_data("voc", **kwargs)
        batches = [torch.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
        loader_rates = {}
        for w in workers:
            loader = EpochLoader(data.train, w, pin_memory=device.type == "cuda", seed=0)
            next(loader.epoch(batches[:1], epoch=99))  # workers started before timing
            t = time.perf_counter()
            read = sum(x.shape[0] for x, _ in loader.epoch(batches, epoch=0))
            loader_rates[w] = read / (time.perf_counter() - t)
            loader.close()
    return {"cwat_fast_images_per_s": model_rate, "loader_images_per_s": loader_rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="(default: cuda)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (checks the script on a CPU)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8, 15],
                    help="DataLoader workers to time (default: 0 4 8 15)")
    ap.add_argument("--json", help="also write the results here (after every section)")
    ap.add_argument("--sections", nargs="+", choices=("training", "attacks", "detection"),
                    default=["training", "attacks", "detection"], help="what to measure (default: all three)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --quick to check the script")
    n, batch, width = (64, 32, 8) if args.quick else (128 * 40, 128, 64)
    modes = {k: v for k, v in MODES.items() if not (args.quick and v["compile"])}  # compile on CPU takes minutes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device: {name}; torch {torch.__version__}; ResNet-18 width {width}, {n} CIFAR-shaped images, batch {batch}")
    training: list[dict] = []
    att: list[dict] = []
    det: dict = {}

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"device": name, "training": training, "attacks": att,
                                                   "detection": det}, indent=2))

    if "training" in args.sections:  # each row printed as it is measured
        print("\n| training | mode | robustlab img/s | plain img/s | ratio |\n|---|---|---|---|---|", flush=True)
        for method, steps in (("standard", 0), ("pgd-at", 10)):
            for mode_name, mode in modes.items():
                ours = robustlab_training(method, mode, n, batch, device, width)
                plain = plain_training(steps, mode, n, batch, device, width)
                r = {"method": method, "mode": mode_name, "robustlab": ours, "plain": plain, "ratio": ours / plain}
                training.append(r)
                print(f"| {method} | {mode_name} | {ours:.0f} | {plain:.0f} | {r['ratio']:.2f} |", flush=True)
                save()
    if "attacks" in args.sections:
        att = attacks(64 if args.quick else 1024, device, width)
        print("\n| attack | robustlab img/s | reference img/s | ratio | reference |\n|---|---|---|---|---|")
        for r in att:
            ref = r["reference"]
            print(f"| {r['attack']} | {r['robustlab']:.1f} | {ref or float('nan'):.1f} | "
                  f"{(r['robustlab'] / ref) if ref else float('nan'):.2f} | {r['reference_impl']} |", flush=True)
        save()
    if "detection" in args.sections:
        det = detection(16 if args.quick else 256, 8 if args.quick else 32, device,
                        [w for w in args.workers if w <= (2 if args.quick else 64)], args.quick)
        print(f"\nSSD300-VGG16 CWAT-fast training: {det['cwat_fast_images_per_s']:.1f} images/s")
        for w, rate in det["loader_images_per_s"].items():
            print(f"VOC-format DataLoader at 300x300, {w} workers: {rate:.1f} images/s", flush=True)
        save()


if __name__ == "__main__":
    main()
