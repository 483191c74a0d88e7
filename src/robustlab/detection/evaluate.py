"""mAP of a detector on a split, clean and under detection attacks (`Attack` objects bound to the detector), with
per-class AP. Batched: one forward and one batched post-processing per batch. Every adversarial batch is checked
against its attack's threat model (the l_inf ball in pixel units and the [0, 255] box; the box alone for an
unbounded attack): a violation is a bug in the attack and raises `ThreatViolation`. Per attack the result also
holds its passes, seconds, mean and max |delta| and the attack's own statistics."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping, cast

import torch
from torch import Tensor, nn

from robustlab.data.loading import EpochLoader
from robustlab.detection.data import DetData, DetSource
from robustlab.detection.metrics import detection_map
from robustlab.detection.postprocess import Detections, detect
from robustlab.detection.targets import check_targets, unpad
from robustlab.errors import DataError, InputError
from robustlab.threat import check_within
from robustlab.utils import progress_bar

if TYPE_CHECKING:
    from robustlab.attacks.base import Attack
    from robustlab.detection.models import Detector


def check_detection_images(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise DataError(f"detection images must be (B, 3, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DataError("detection images contain NaN or inf")
    if x.min() < 0 or x.max() > 255:
        raise DataError(f"detection images must be pixel-scale values in [0, 255], got [{x.min():.3g}, {x.max():.3g}]")


def _attack_batch(atk: Attack, name: str, x: Tensor, t: Tensor, work: dict[str, Any]) -> Tensor:
    """One attack on one batch: its adversarial images, checked against the attack's threat model, with the passes,
    |delta| and statistics added to `work`."""
    out = atk.run(x, t)
    check_within(out.x_adv, x, atk.threat, getattr(atk, "box", (0.0, 255.0)), name)
    work["forward"] += out.forward
    work["backward"] += out.backward
    delta = (out.x_adv - x).abs().flatten(1)
    work["abs_sum"] += float(delta.mean(1).sum())
    work["abs_max"] = max(work["abs_max"], float(delta.max()) if delta.numel() else 0.0)
    for key, value in out.stats.items():  # counts ("n_...") summed; per-batch means weighted by the batch's images
        if key.startswith("n_"):
            work["counts"][key] = work["counts"].get(key, 0) + value
        else:
            work["sums"][key] = work["sums"].get(key, 0.0) + value * x.shape[0]
    return out.x_adv


def evaluate_detector(model: nn.Module, source: DetSource | DetData, n_images: int | None = None, batch_size: int = 32,
                      ap_mode: str = "11pt", attacks: Mapping[str, Attack] | None = None,
                      max_per_image: int | None = None, keep_examples: int = 0,
                      progress: bool | None = False, workers: int = 0) -> dict[str, Any]:
    """{"clean": {map, ap}, "attacks": {name: {map, ap, attack, norm, eps, passes, seconds, perturbation, stats}},
    n_images, class_names, ...}. attacks: detection attacks bound to `model` (`detection_attacks`); passes are the
    attack's image-passes (forward, backward, per image), perturbation the mean over images of mean |delta| and the
    largest |delta| (pixel units), stats the attack's own (counts summed, means weighted by images). `keep_examples`
    keeps the first images with their detections (clean and attacked) for reports. At most `max_per_image` detections
    per image: 100 under COCO rules (COCOeval's maxDets), else 200 (the SSD reference). A file-backed source is
    decoded by `workers` DataLoader processes ahead of the model."""
    detector = cast("Detector", model)  # a robustlab detector (num_classes, priors, class_names)
    if max_per_image is None:
        max_per_image = 100 if ap_mode == "coco" else 200
    if isinstance(source, DetData):
        source = source.test
    n = len(source) if n_images is None else min(int(n_images), len(source))
    if n < 1:
        raise DataError("nothing to evaluate: the split has no images")
    attacks = dict(attacks or {})
    for label, atk in attacks.items():
        if atk.model is not model:
            raise InputError(f"attack {label!r} is bound to a different model than the one evaluated")
    names = ["clean"] + list(attacks)
    work: dict[str, dict[str, Any]] = {
        name: {"forward": 0, "backward": 0, "abs_sum": 0.0, "abs_max": 0.0, "counts": {}, "sums": {}}
        for name in attacks}
    dets: dict[str, list[Detections]] = {k: [] for k in names}
    gts: list[tuple[Tensor, Tensor, Tensor]] = []
    examples: dict[str, Any] = {"images": {k: [] for k in names}, "detections": {k: [] for k in names}, "targets": []}
    seconds = {k: 0.0 for k in names}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    k = detector.num_classes
    try:
        index_batches = [torch.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        batches = (EpochLoader(source, workers, persistent=False).epoch(index_batches) if source.streams and workers
                   else map(source.batch, index_batches))
        with progress_bar(len(index_batches), "evaluate", progress) as bar:
            for idx, (x, t) in zip(index_batches, batches):
                start = int(idx[0])
                check_detection_images(x)
                check_targets(t, k)
                x, t = x.to(device), t.to(device)
                gts += [(b.cpu(), lab.cpu(), d.cpu()) for b, lab, d in unpad(t)]
                keep = max(0, keep_examples - start)
                if keep:
                    examples["targets"] += [g for g in gts[start:start + keep]]
                for name in names:
                    t0 = time.perf_counter()
                    xa = x if name == "clean" else _attack_batch(attacks[name], name, x, t, work[name])
                    with torch.no_grad():
                        loc, conf = model(xa)
                    d = detect(loc, conf, detector.priors, max_per_image=max_per_image)
                    seconds[name] += time.perf_counter() - t0
                    dets[name] += d
                    if keep:
                        examples["images"][name].append(xa[:keep].detach().cpu())
                        examples["detections"][name] += d[:keep]
                bar.update(1)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"n_images": n, "ap_mode": ap_mode, "class_names": list(detector.class_names), "attacks": {}}
    for name in names:
        r = detection_map(dets[name], gts, k, mode=ap_mode)
        entry = {"map": r["map"], "ap": r["ap"], "seconds": seconds[name]}
        if name == "clean":
            out["clean"] = entry
            out["npos"] = r["npos"]
        else:
            w = work[name]
            describe = attacks[name].describe()
            entry.update({"attack": describe["attack"], "norm": describe["norm"], "eps": describe["eps"],
                          "passes": {"forward": w["forward"], "backward": w["backward"],
                                     "per_image": (w["forward"] + w["backward"]) / n},
                          "perturbation": {"mean_abs": w["abs_sum"] / n, "max_abs": w["abs_max"]},
                          "stats": {**w["counts"], **{key: v / n for key, v in w["sums"].items()}}})
            out["attacks"][name] = entry
    if keep_examples:
        examples["images"] = {k_: torch.cat(v) for k_, v in examples["images"].items() if v}
        out["examples"] = examples
    return out
