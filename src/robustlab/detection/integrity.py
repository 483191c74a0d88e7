"""Integrity checks of a detector evaluation (issue 29, item 4): signs that an mAP under attack is too high to trust,
the detection counterparts of `robustlab.engine.integrity`, run cheaply on a probe of the first batch:

- `zero_gradient`: the share of exactly-zero entries of the input gradient of the detection loss (classification +
  localisation, every matched object) at a random point of the panel's largest l_inf ball: a detector that
  quantises or otherwise masks its input has zero gradient almost everywhere.
- `unbounded`: PGD on A_cls with a budget covering the whole [0, 255] box must drive the probe's mAP near 0; a
  detector that keeps its mAP under it is hiding its gradient (or the attack is broken).
- `monotone`: across the panel, the same attack at a larger budget must not leave a higher mAP.

Each failed check adds a line to `flags`, sets `ok` to false and raises an `IntegrityWarning`.
"""
from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any, Sequence, cast

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import attack_mode
from robustlab.detection.loss import decompose
from robustlab.detection.metrics import detection_map
from robustlab.detection.postprocess import detect
from robustlab.detection.targets import match_targets, unpad
from robustlab.errors import IntegrityWarning

if TYPE_CHECKING:
    from robustlab.detection.models import Detector

# the probe per mode: images of the first batch and steps of the unbounded attack ("quick": under a second for
# TinySSD-96 on a CPU core; "full": the first batch, up to 64 images)
PLANS = {"quick": (16, 20), "full": (64, 50)}
N_PROBE = PLANS["quick"][0]
ZERO_GRADIENT_FLAG = 0.25  # share of exactly-zero gradient entries at random points of the ball
UNBOUNDED_SHARE = 0.25  # an unbounded attack may leave at most this share of the probe's clean mAP ...
UNBOUNDED_FLOOR = 0.02  # ... or this much mAP, whichever is larger
MONOTONE_TOLERANCE = 0.01


def _map(model: Detector, x: Tensor, t: Tensor, ap_mode: str) -> float:
    with torch.no_grad():
        loc, conf = model(x)
    r = detection_map(detect(loc, conf, model.priors), unpad(t.cpu()), model.num_classes, mode=ap_mode)
    return 0.0 if r["map"] != r["map"] else float(r["map"])  # no ground truth in the probe: NaN -> 0


def probe_detector(model: nn.Module, x: Tensor, t: Tensor, budgets: Sequence[float], ap_mode: str = "11pt",
                   mode: str = "quick", seed: int = 0) -> dict[str, Any]:
    """The checks that need the model, on the first images of the first batch (PLANS[mode]; no warnings yet:
    `finish_detector_integrity`). budgets: the panel's l_inf budgets in pixel units (8 when there are none)."""
    from robustlab.detection.attacks import DetPGD

    start = time.perf_counter()
    detector = cast("Detector", model)
    n_probe, steps = PLANS[mode]
    x, t = x[:n_probe], t[:n_probe]
    flags: list[str] = []
    eps = max([b for b in budgets if b], default=8.0)
    gen = rng.device_generator(x.device, seed)
    x0 = (x + eps * (2 * rng.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1)).clamp(0, 255)
    with attack_mode(model):
        x0.requires_grad_(True)
        with torch.enable_grad():
            loc, conf = model(x0)
            lcls, lreg = decompose(loc, conf, t, detector.priors, match_targets(t, detector.priors)).task_losses()
            (g,) = torch.autograd.grad((lcls + lreg).sum(), x0)
        clean = _map(detector, x, t, ap_mode)
        attack = DetPGD(model, objective="cls", eps=255.0, alpha=16.0, steps=steps, seed=seed)
        unbounded = _map(detector, attack(x, t), t, ap_mode)
    zero = float((g == 0).float().mean())
    out: dict[str, Any] = {"mode": mode, "n_probe": int(x.shape[0]),
                           "zero_gradient": {"entries": zero, "at": f"random points of the l_inf ball eps={eps:g}"},
                           "unbounded": {"attack": f"det-pgd A_cls, eps 255, alpha 16, {steps} steps",
                                         "clean_map": clean, "map": unbounded}}
    if zero > ZERO_GRADIENT_FLAG:
        flags.append(f"{zero:.0%} of the detection loss's input-gradient entries are exactly zero: gradient masking "
                     "or a non-differentiable detector; mAP under gradient attacks is overestimated")
    if unbounded > max(UNBOUNDED_FLOOR, UNBOUNDED_SHARE * clean):
        flags.append(f"PGD with an unbounded budget (eps 255) leaves mAP {unbounded:.3f} of the probe's clean "
                     f"{clean:.3f} (expected near 0): gradient masking or a broken attack")
    out["flags"] = flags
    out["seconds"] = time.perf_counter() - start
    return out


def finish_detector_integrity(probe: dict[str, Any], attacks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The probe's result plus the panel-wide check on the final mAPs (`attacks`: name -> {attack, norm, eps, map}):
    the same attack at a larger budget must not leave a higher mAP. Sets `ok` and warns once per flag."""
    out = {**probe, "flags": list(probe["flags"])}
    series: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for name, a in attacks.items():
        if a.get("eps") is not None and a.get("norm"):
            series.setdefault((a["attack"], a["norm"]), []).append((float(a["eps"]), a["map"], name))
    for (kind, norm), pts in series.items():
        pts.sort()
        for (e0, m0, n0), (e1, m1, n1) in zip(pts, pts[1:]):
            if e1 > e0 and m1 > m0 + MONOTONE_TOLERANCE:
                out["flags"].append(f"{kind} {norm}: mAP rises from {m0:.3f} at eps {e0:g} ({n0}) to {m1:.3f} at eps "
                                    f"{e1:g} ({n1})")
    out["ok"] = not out["flags"]
    for f in out["flags"]:
        warnings.warn(f, IntegrityWarning, stacklevel=4)
    return out


__all__ = ["probe_detector", "finish_detector_integrity", "N_PROBE", "PLANS"]
