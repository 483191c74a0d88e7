"""Detection mAP (cwat.md 5.1).

* `mode="11pt"` (default, the seed's metric): PASCAL VOC2007 11-point interpolated AP at IoU > 0.5 with VOC
  matching (each detection takes the ground truth it overlaps most; a second hit on a matched one is a false
  positive; hits on `difficult` objects are ignored and those objects are not counted).
* `mode="area"`: the same matching with the all-point (area under the precision envelope) AP of VOC2010+.
* `mode="coco"`: COCO's rules at one IoU threshold (IoU >= t; each detection takes the best still-unmatched
  ground truth; at most `max_dets` detections per image and class; 101-point interpolation). With t = 0.5 it
  equals pycocotools' AP50 (`coco_ap50` below runs COCOeval itself, for COCO-format reporting).

Inputs are per image: detections `(boxes (n, 4), scores (n,), labels (n,))` and ground truth
`(boxes (m, 4), labels (m,), difficult (m,))`, boxes in corner form in any one coordinate system (IoU is
invariant to per-axis scaling, so normalised boxes give the same AP as original pixels).
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Sequence

import numpy as np

from robustlab.errors import InputError, MissingDependencyError

MODES = ("11pt", "area", "coco")


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (n, m) without the +1 pixel convention; 0 where the union is empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray, mode: str = "11pt") -> float:
    """AP from cumulative recall/precision (detections in score order)."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if mode == "11pt":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # the VOC devkit's thresholds, float rounding included
            ap += (np.max(precision[recall >= t]) if np.any(recall >= t) else 0.0) / 11.0
        return float(ap)
    if mode == "area":
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    if mode == "coco":
        pr = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
        idx = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
        q = np.zeros(101)
        reached = idx < pr.size  # recall thresholds never reached count as precision 0
        q[reached] = pr[idx[reached]]
        return float(np.mean(q))
    raise InputError(f"AP mode must be one of {', '.join(MODES)}, got {mode!r}")


def _voc_class(dets, gts, c: int, thr: float) -> tuple[np.ndarray, np.ndarray, int]:
    """tp, fp (in descending score order) and npos for class c under VOC matching, vectorised: a detection
    whose best ground truth is a non-difficult object with IoU > thr is a TP iff it is the first such hit."""
    imgs, scores, boxes = [], [], []
    for i, (b, s, lab) in enumerate(dets):
        m = lab == c
        imgs.append(np.full(int(m.sum()), i))
        scores.append(s[m])
        boxes.append(b[m].reshape(-1, 4))
    img, score, box = np.concatenate(imgs), np.concatenate(scores), np.concatenate(boxes)
    gt_sel = [(g[lab == c].reshape(-1, 4), d[lab == c]) for g, lab, d in gts]
    npos = int(sum((~d).sum() for _, d in gt_sel))
    order = np.argsort(-score, kind="stable")
    img, box = img[order], box[order]
    nd = img.size
    m = max([1] + [g.shape[0] for g, _ in gt_sel])
    gtb = np.zeros((len(gts), m, 4))
    gtv = np.zeros((len(gts), m), bool)
    gtd = np.zeros((len(gts), m), bool)
    for i, (g, d) in enumerate(gt_sel):
        gtb[i, : len(g)], gtv[i, : len(g)], gtd[i, : len(g)] = g, True, d
    if nd == 0:
        return np.zeros(0), np.zeros(0), npos
    lt = np.maximum(box[:, None, :2], gtb[img, :, :2])
    rb = np.minimum(box[:, None, 2:], gtb[img, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_d = np.clip(box[:, 2] - box[:, 0], 0, None) * np.clip(box[:, 3] - box[:, 1], 0, None)
    gb = gtb[img]
    area_g = np.clip(gb[..., 2] - gb[..., 0], 0, None) * np.clip(gb[..., 3] - gb[..., 1], 0, None)
    union = area_d[:, None] + area_g - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    iou = np.where(gtv[img], iou, -np.inf)
    jmax = iou.argmax(1)
    ovmax = iou[np.arange(nd), jmax]
    hit = ovmax > thr
    difficult = gtd[img, jmax] & hit
    cand = hit & ~difficult
    key = img * m + jmax
    first = np.zeros(nd, bool)
    ci = np.nonzero(cand)[0]
    _, at = np.unique(key[ci], return_index=True)  # first hit (in score order) of each object
    first[ci[at]] = True
    tp = first.astype(np.float64)
    fp = (~hit | (cand & ~first)).astype(np.float64)
    return tp, fp, npos


def _coco_class(dets, gts, c: int, thr: float, max_dets: int) -> tuple[np.ndarray, np.ndarray, int]:
    """tp, fp and npos for class c under COCOeval's matching at one IoU threshold (difficult = ignored)."""
    scores, tps, fps = [], [], []
    npos = 0
    t = min(thr, 1 - 1e-10)
    for (b, s, lab), (g, glab, gd) in zip(dets, gts):
        dm = lab == c
        db, ds = b[dm].reshape(-1, 4), s[dm]
        order = np.argsort(-ds, kind="mergesort")[:max_dets]
        db, ds = db[order], ds[order]
        gm = glab == c
        gb, gi = g[gm].reshape(-1, 4), gd[gm]
        go = np.argsort(gi, kind="mergesort")  # non-ignored objects first
        gb, gi = gb[go], gi[go]
        npos += int((~gi).sum())
        iou = _iou(db, gb) if len(db) and len(gb) else np.zeros((len(db), len(gb)))
        taken = np.zeros(len(gb), bool)
        for d in range(len(db)):
            best, mbest = t, -1
            for j in range(len(gb)):
                if taken[j]:
                    continue
                if mbest > -1 and not gi[mbest] and gi[j]:
                    break
                if iou[d, j] < best:
                    continue
                best, mbest = iou[d, j], j
            ignored = mbest > -1 and gi[mbest]
            if mbest > -1:
                taken[mbest] = True
            scores.append(ds[d])
            tps.append(mbest > -1 and not ignored)
            fps.append(mbest == -1)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    return np.asarray(tps, np.float64)[order], np.asarray(fps, np.float64)[order], npos


def _prepare(detections, ground_truth):
    dets = []
    for d in detections:
        if hasattr(d, "boxes"):
            d = (d.boxes, d.scores, d.labels)
        b, s, lab = d
        dets.append((_np(b).reshape(-1, 4).astype(np.float64), _np(s).reshape(-1).astype(np.float64),
                     _np(lab).reshape(-1).astype(np.int64)))
    gts = []
    for g in ground_truth:
        b, lab = g[0], g[1]
        diff = g[2] if len(g) > 2 and g[2] is not None else np.zeros(len(_np(lab)), bool)
        gts.append((_np(b).reshape(-1, 4).astype(np.float64), _np(lab).reshape(-1).astype(np.int64),
                    _np(diff).reshape(-1).astype(bool)))
    if len(dets) != len(gts):
        raise InputError(f"{len(dets)} detection lists for {len(gts)} images")
    return dets, gts


def detection_map(detections: Sequence[Any], ground_truth: Sequence[Any], num_classes: int,
                  iou_threshold: float = 0.5, mode: str = "11pt", max_dets: int = 100) -> dict[str, Any]:
    """mAP and per-class AP (NaN for classes without ground truth, which the mean skips)."""
    if mode not in MODES:
        raise InputError(f"AP mode must be one of {', '.join(MODES)}, got {mode!r}")
    dets, gts = _prepare(detections, ground_truth)
    for _, lab, _ in gts:
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise InputError(f"ground-truth labels must be in 0..{num_classes - 1}, got {sorted(set(lab.tolist()))}")
    aps, npos_all = [], []
    for c in range(num_classes):
        if mode == "coco":
            tp, fp, npos = _coco_class(dets, gts, c, iou_threshold, max_dets)
        else:
            tp, fp, npos = _voc_class(dets, gts, c, iou_threshold)
        npos_all.append(npos)
        if npos == 0:
            aps.append(float("nan"))
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(average_precision(rec, prec, mode))
    valid = [a for a in aps if not math.isnan(a)]
    return {"map": float(np.mean(valid)) if valid else float("nan"), "ap": aps, "npos": npos_all, "mode": mode,
            "iou_threshold": iou_threshold, "n_images": len(gts)}


def coco_ap50(detections: Sequence[Any], ground_truth: Sequence[Any], image_sizes: Sequence[tuple[int, int]],
              category_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """COCOeval (bbox) on in-memory results: boxes normalised to [0, 1] are scaled to each image's (width,
    height) pixels; contiguous labels map back to `category_ids`. Uses faster-coco-eval when installed, else
    pycocotools (`pip install robustlab[coco]`). Returns stats[1] (AP at IoU 0.5, all areas, 100 dets), the
    full stats and per-class AP50."""
    dets, gts = _prepare(detections, ground_truth)
    k = 1 + max([int(lab.max()) for _, lab, _ in gts if lab.size] + [int(lab.max()) for _, _, lab in dets if lab.size] + [0])
    cats = list(category_ids) if category_ids is not None else list(range(1, k + 1))
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, ((db, ds, dl), (gb, gl, gd), (w, h)) in enumerate(zip(dets, gts, image_sizes)):
        scale = np.array([w, h, w, h], dtype=np.float64)
        images.append({"id": i + 1, "width": int(w), "height": int(h)})
        for b, lab, d in zip(gb * scale, gl, gd):
            x1, y1, x2, y2 = b.tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cats[lab], "iscrowd": int(d),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        for b, s, lab in zip(db * scale, ds, dl):
            x1, y1, x2, y2 = b.tolist()
            results.append({"image_id": i + 1, "category_id": cats[lab], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(s)})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}
    try:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
        backend = "faster-coco-eval"
    except ImportError:
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            backend = "pycocotools"
        except ImportError:
            raise MissingDependencyError("COCO-style evaluation needs faster-coco-eval or pycocotools "
                              "(pip install 'robustlab[coco]')") from None
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = np.asarray(ev.eval["precision"])[0, :, :, 0, -1]  # IoU 0.5, all recall thresholds, classes, all areas
    per_class = [float(np.mean(prec[:, j])) if (prec[:, j] > -1).any() else float("nan") for j in range(len(cats))]
    return {"ap50": float(ev.stats[1]), "stats": [float(s) for s in ev.stats], "ap": per_class, "backend": backend}
