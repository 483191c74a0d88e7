"""mAP of a detector on a split, clean and under detection attacks (`Attack` objects bound to the detector), with
per-class AP. Batched: one forward and one batched post-processing per batch. Every adversarial batch is checked
against its attack's threat model (the l_inf ball in pixel units and the [0, 255] box; the box alone for an
unbounded attack): a violation is a bug in the attack and raises `ThreatViolation`. Per attack the result also
holds its passes, seconds, mean and max |delta| and the attack's own statistics."""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Mapping, cast

import torch
from torch import Tensor, nn

from robustlab.data.loading import EpochLoader
from robustlab.detection.data import DetData, DetSource
from robustlab.detection.metrics import detection_map
from robustlab.detection.models import class_names_of
from robustlab.detection.postprocess import Detections, detect
from robustlab.detection.targets import check_targets, unpad
from robustlab.errors import DataError, InputError, ResumeError
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


def _attack_record(atk: Attack, name: str, model: nn.Module, x: Tensor, t: Tensor, max_per_image: int,
                   keep: int) -> dict[str, Any]:
    """One attack on one batch: its detections (the adversarial images checked against the attack's threat model
    first), passes, seconds, |delta| and the attack's statistics (counts summed, means weighted by images)."""
    detector = cast("Detector", model)
    start = time.perf_counter()
    out = atk.run(x, t)
    check_within(out.x_adv, x, atk.threat, getattr(atk, "box", (0.0, 255.0)), name)
    delta = (out.x_adv - x).abs().flatten(1)
    with torch.no_grad():
        loc, conf = model(out.x_adv)
    d = detect(loc, conf, detector.priors, max_per_image=max_per_image)
    rec: dict[str, Any] = {"dets": _plain(d), "passes": [out.forward, out.backward], "counts": {}, "sums": {},
                           "abs_sum": float(delta.mean(1).sum()), "abs_max": float(delta.max()) if delta.numel() else 0.0}
    for key, value in out.stats.items():
        if key.startswith("n_"):
            rec["counts"][key] = int(value)
        else:
            rec["sums"][key] = float(value) * x.shape[0]
    rec["seconds"] = time.perf_counter() - start  # float() above waited for the device
    if keep:
        rec["examples"] = out.x_adv[:keep].detach().cpu()
    return rec


def _plain(dets: list[Detections]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Detections as plain tensors on the host (what a state folder stores and the AP code reads)."""
    return [(d.boxes.cpu(), d.scores.cpu(), d.labels.cpu()) for d in dets]


def _digest(x: Tensor, t: Tensor) -> str:
    """The batch's images and targets as a SHA-256 (a resumed run refuses a folder written on other data)."""
    h = hashlib.sha256()
    for v in (x, t):
        h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def detector_batch(k: int, x: Tensor, t: Tensor, model: nn.Module, attacks: Mapping[str, Attack],
                   max_per_image: int, keep: int, state: Any = None) -> dict[str, Any]:
    """Batch k of a detector evaluation: {"k", "clean": {gts, dets, seconds, ...}, "attacks": [record per attack]},
    each record loaded from `state` (an `EvalState`: `load(name)`, `save(name, record)`) when it holds it and
    otherwise computed and saved there the moment it is done. keep: the batch's first images kept for a report."""
    detector = cast("Detector", model)
    digest = _digest(x, t) if state is not None else None
    clean = state.load(state.clean_name(k)) if state is not None else None
    if clean is not None and clean["data_sha256"] != digest:
        raise ResumeError(f"state folder {state.folder}: batch {k} holds different images or targets than this run's "
                          "(the data changed); use a new folder")
    if clean is None:
        start = time.perf_counter()
        with torch.no_grad():
            loc, conf = model(x)
        d = detect(loc, conf, detector.priors, max_per_image=max_per_image)
        clean = {"k": k, "gts": [(b.cpu(), lab.cpu(), dif.cpu()) for b, lab, dif in unpad(t)], "dets": _plain(d),
                 "data_sha256": digest, "seconds": time.perf_counter() - start}
        if keep:
            clean["examples"] = x[:keep].detach().cpu()
        if state is not None:
            state.save(state.clean_name(k), clean)
    records = []
    for j, (name, atk) in enumerate(attacks.items()):
        rec = state.load(state.attack_name(k, j)) if state is not None else None
        if rec is None:
            rec = _attack_record(atk, name, model, x, t, max_per_image, keep)
            if state is not None:
                state.save(state.attack_name(k, j), rec)
        records.append(rec)
    return {"k": k, "clean": clean, "attacks": records}


def detector_panel(attacks: Mapping[str, Attack]) -> list[dict[str, Any]]:
    """What the aggregation needs of each attack, as plain data (kept in a state's manifest)."""
    out = []
    for name, atk in attacks.items():
        describe = atk.describe()
        out.append({"name": name, "attack": describe["attack"], "norm": describe["norm"], "eps": describe["eps"],
                    "describe": {k: v for k, v in describe.items() if k != "attack"}})
    return out


def detector_result(panel: list[dict[str, Any]], batches: list[dict[str, Any]], *, ap_mode: str,
                    class_names: list[str], keep_examples: int = 0) -> dict[str, Any]:
    """The result of a detector evaluation from its batch records (in batch order): mAP and per-class AP clean and
    per attack from the merged detections; the same function for a single run, a resumed one and merged shards."""
    k = len(class_names)
    gts = [g for b in batches for g in b["clean"]["gts"]]
    n = len(gts)
    out: dict[str, Any] = {"n_images": n, "ap_mode": ap_mode, "class_names": list(class_names), "attacks": {}}
    r = detection_map([d for b in batches for d in b["clean"]["dets"]], gts, k, mode=ap_mode)
    out["clean"] = {"map": r["map"], "ap": r["ap"], "seconds": sum(b["clean"]["seconds"] for b in batches)}
    out["npos"] = r["npos"]
    for j, m in enumerate(panel):
        recs = [b["attacks"][j] for b in batches]
        r = detection_map([d for rec in recs for d in rec["dets"]], gts, k, mode=ap_mode)
        forward, backward = sum(rec["passes"][0] for rec in recs), sum(rec["passes"][1] for rec in recs)
        counts: dict[str, int] = {}
        sums: dict[str, float] = {}
        for rec in recs:
            for key, v in rec["counts"].items():
                counts[key] = counts.get(key, 0) + v
            for key, v in rec["sums"].items():
                sums[key] = sums.get(key, 0.0) + v
        out["attacks"][m["name"]] = {
            "map": r["map"], "ap": r["ap"], "seconds": sum(rec["seconds"] for rec in recs),
            "attack": m["attack"], "norm": m["norm"], "eps": m["eps"],
            "passes": {"forward": forward, "backward": backward, "per_image": (forward + backward) / n},
            "perturbation": {"mean_abs": sum(rec["abs_sum"] for rec in recs) / n,
                             "max_abs": max(rec["abs_max"] for rec in recs)},
            "stats": {**counts, **{key: v / n for key, v in sums.items()}}}
    if keep_examples:
        first = [b for b in batches if "examples" in b["clean"]]
        names = ["clean"] + [m["name"] for m in panel]
        images = {"clean": [b["clean"]["examples"] for b in first]}
        detections: dict[str, list[Any]] = {"clean": []}
        for b in first:
            n_keep = b["clean"]["examples"].shape[0]
            detections["clean"] += [Detections(*d) for d in b["clean"]["dets"][:n_keep]]
            for j, m in enumerate(panel):
                images.setdefault(m["name"], []).append(b["attacks"][j]["examples"])
                detections.setdefault(m["name"], []).extend(Detections(*d) for d in b["attacks"][j]["dets"][:n_keep])
        targets = [g for b in first for g in b["clean"]["gts"][:b["clean"]["examples"].shape[0]]]
        out["examples"] = {"images": {nm: torch.cat(images[nm]) for nm in names if images.get(nm)},
                           "detections": detections, "targets": targets}
    return out


def evaluate_detector(model: nn.Module, source: DetSource | DetData, n_images: int | None = None, batch_size: int = 32,
                      ap_mode: str = "11pt", attacks: Mapping[str, Attack] | None = None,
                      max_per_image: int | None = None, keep_examples: int = 0,
                      progress: bool | None = False, workers: int = 0, state: Any = None,
                      shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """{"clean": {map, ap}, "attacks": {name: {map, ap, attack, norm, eps, passes, seconds, perturbation, stats}},
    n_images, class_names, ...}. attacks: detection attacks bound to `model` (`detection_attacks`); passes are the
    attack's image-passes (forward, backward, per image), perturbation the mean over images of mean |delta| and the
    largest |delta| (pixel units), stats the attack's own (counts summed, means weighted by images). `keep_examples`
    keeps the first images with their detections (clean and attacked) for reports. At most `max_per_image` detections
    per image: 100 under COCO rules (COCOeval's maxDets), else 200 (the SSD reference). A file-backed source is
    decoded by `workers` DataLoader processes ahead of the model.
    state (an `EvalState`, made by the engine) keeps each batch's records the moment they are computed and resumes
    from them; shard=(I, N) evaluates only batches k with k % N == I and returns {"shard", "batches", "n_batches"}
    (the engine merges the shards' folders with `detector_result`)."""
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
    shard_i, n_shards = shard
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    k = detector.num_classes
    records = []
    index_batches = [torch.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    mine = [(j, idx) for j, idx in enumerate(index_batches) if j % n_shards == shard_i]
    try:
        loaded = (EpochLoader(source, workers, persistent=False).epoch([idx for _, idx in mine])
                  if source.streams and workers else map(source.batch, [idx for _, idx in mine]))
        with progress_bar(len(mine), "evaluate", progress) as bar:
            for (j, idx), (x, t) in zip(mine, loaded):
                check_detection_images(x)
                check_targets(t, k)
                x, t = x.to(device), t.to(device)
                keep = max(0, min(keep_examples - int(idx[0]), x.shape[0]))
                bar.set_postfix(batch=j)
                records.append(detector_batch(j, x, t, model, attacks, max_per_image, keep, state))
                bar.update(1)
    finally:
        model.train(was_training)
    if n_shards > 1:
        return {"shard": [shard_i, n_shards], "batches": [r["k"] for r in records], "n_batches": len(index_batches)}
    return detector_result(detector_panel(attacks), records, ap_mode=ap_mode, class_names=class_names_of(detector),
                           keep_examples=keep_examples)
