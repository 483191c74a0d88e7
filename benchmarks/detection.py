"""Detector training-step cost and evaluation cost.

    python benchmarks/detection.py                               # TinySSD-96, CPU
    python benchmarks/detection.py --model ssd300-vgg16 --device cuda --batch-size 32 [--amp bf16 --channels-last]
    python benchmarks/detection.py --checkpoint runs/det-std/best.safetensors   # post-processing on a trained model
    python benchmarks/detection.py --eval --threads 1 [--checkpoint C]  # evaluation under CWA: records and checks

Reports images/s of one forward+backward of the multibox loss (matching, OHEM, loss) against a bare
forward+backward of the same network on the sum of its outputs, measured in the same process: the ratio is
the loss's overhead. Then the post-processing (decode + per-class NMS) and mAP time per image. An untrained
model passes every candidate through the 0.01 score threshold, the worst case for NMS; pass --checkpoint for
the typical case.

--eval times an evaluation under CWA (PGD-10, eps 8) three ways in the same process, on the same images: a plain
loop (clean forward and post-processing, attack, forward, post-processing per batch, clean and attacked mAP at the
end: the work itself), `evaluate_detector` (which also
checks every adversarial batch against the threat model and keeps per-batch records of detections, passes, |delta|
and statistics) and `evaluate_detector` with a state folder (each record also written to disk): images/s and the
overhead against the plain loop (issue 29: at most 5%).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from robustlab.detection.data import mnist_det
from robustlab.detection.loss import multibox_loss
from robustlab.detection.metrics import detection_map
from robustlab.detection.postprocess import detect
from robustlab.detection.targets import unpad
from robustlab.engine.checkpoint import load_model
from robustlab.models import create_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinyssd-96", help="tinyssd-96, tinyssd-128, ssd300-vgg16, ssd300-resnet50")
    p.add_argument("--checkpoint", help="a trained detector (overrides --model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    p.add_argument("--eval", action="store_true", help="time an evaluation under CWA: plain loop vs evaluate_detector")
    p.add_argument("--n-images", type=int, default=64, help="--eval: MNIST-Det test images")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval:
        return eval_overhead(args)
    dev = args.device
    if args.checkpoint:
        model = load_model(args.checkpoint, map_location=dev)[0]
    else:
        model = create_model(args.model, num_classes=10).to(dev)
    size = model.image_size
    data = mnist_det(preset="voc", n_train=args.batch_size, n_test=args.batch_size, image_size=96)
    x, t = data.train.batch(torch.arange(args.batch_size))
    if size != 96:  # same objects on the model's canvas (boxes are normalised)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x, t = x.to(dev), t.to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    amp = (torch.autocast(torch.device(dev).type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
           if args.amp != "none" else nullcontext())
    model.train()

    def bare():
        model.zero_grad(set_to_none=True)
        with amp:
            loc, conf = model(x)
            (loc.float().sum() + conf.float().sum()).backward()

    def with_loss():
        model.zero_grad(set_to_none=True)
        with amp:
            loc, conf = model(x)
            multibox_loss(loc, conf, t, model.priors)[0].backward()

    n = args.batch_size
    t_bare = _time(bare, dev, args.repeats)
    t_loss = _time(with_loss, dev, args.repeats)
    model.eval()
    with torch.no_grad():
        loc, conf = model(x)
    t_post = _time(lambda: detect(loc, conf, model.priors), dev, args.repeats)
    dets = detect(loc, conf, model.priors)
    gts = unpad(t.cpu())
    t_map = _time(lambda: detection_map(dets, gts, model.num_classes), "cpu", args.repeats)
    result = {
        "model": model.config["name"], "device": dev, "amp": args.amp, "channels_last": args.channels_last,
        "batch_size": n, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "images_per_s_bare_fwd_bwd": n / t_bare, "images_per_s_multibox_fwd_bwd": n / t_loss,
        "loss_overhead_ratio": t_loss / t_bare, "postprocess_ms_per_image": 1e3 * t_post / n,
        "map_ms_per_image": 1e3 * t_map / n, "detections_per_image": sum(len(d.scores) for d in dets) / n,
        "trained": bool(args.checkpoint),
    }
    for k, v in result.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def eval_overhead(args) -> None:
    """Plain loop vs evaluate_detector (records, threat checks) vs with a state folder, under CWA (PGD-10)."""
    import tempfile

    from robustlab.detection.attacks import detection_attacks
    from robustlab.detection.evaluate import evaluate_detector
    from robustlab.engine.tasks import Detection

    dev = args.device
    model = (load_model(args.checkpoint, map_location=dev)[0] if args.checkpoint
             else create_model(args.model, num_classes=10).to(dev)).eval()
    source = mnist_det(preset="voc", n_train=8, n_test=args.n_images, image_size=model.image_size).test
    n, bs = args.n_images, min(args.batch_size, 64)
    attack = detection_attacks(["cwa"], model)["cwa"]

    def plain():  # what an evaluation must do: clean and attacked detections, both mAPs
        clean, dets, gts = [], [], []
        for start in range(0, n, bs):
            x, t = source.batch(torch.arange(start, min(start + bs, n)))
            x, t = x.to(dev), t.to(dev)
            with torch.no_grad():
                loc, conf = model(x)
            clean += detect(loc, conf, model.priors)
            xa = attack(x, t)
            with torch.no_grad():
                loc, conf = model(xa)
            dets += detect(loc, conf, model.priors)
            gts += unpad(t.cpu())
        detection_map(clean, gts, model.num_classes)
        return detection_map(dets, gts, model.num_classes)["map"]

    def robustlab():
        return evaluate_detector(model, source, n, bs, attacks={"cwa": attack})["attacks"]["cwa"]["map"]

    def with_state():
        with tempfile.TemporaryDirectory() as d:
            r = Detection().evaluate(model, source, ["cwa"], n, batch_size=bs, state=f"{d}/s")
        return r["attacks"]["cwa"]["map"]

    assert abs(plain() - robustlab()) < 1e-9  # the same work: the same mAP
    times = {name: _time(fn, dev, args.repeats) for name, fn in
             (("plain loop", plain), ("evaluate_detector", robustlab), ("evaluate_detector --state", with_state))}
    print(f"| {n} images, CWA PGD-10, {model.config['name']}, {torch.get_num_threads()} threads | images/s | "
          "time / plain loop |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {n / t:.1f} | {t / times['plain loop']:.3f} |")


if __name__ == "__main__":
    main()
