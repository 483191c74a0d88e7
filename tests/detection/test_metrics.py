"""Post-processing and mAP (cwat.md 1.6, 5.1; invariants 7-10) against brute-force references and COCOeval."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from robustlab.detection.boxes import TINYSSD_96, make_priors, nms, nms_sorted
from robustlab.detection.metrics import coco_ap50, detection_map
from robustlab.detection.postprocess import detect, top_stable
from robustlab.detection.targets import pad_targets, unpad

from .conftest import perfect_outputs


def _boxes(n, g):
    xy = torch.rand(n, 2, generator=g) * 0.7
    return torch.cat([xy, xy + 0.05 + torch.rand(n, 2, generator=g) * 0.25], 1)


@pytest.mark.parametrize("seed", range(5))
def test_grouped_nms_equals_per_group_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.stack([_boxes(40, g) for _ in range(6)])
    scores = (torch.rand(6, 40, generator=g) * 5).round() / 5  # many ties
    order = scores.sort(dim=1, descending=True, stable=True).indices
    sb = boxes.gather(1, order[..., None].expand(6, 40, 4))
    valid = torch.rand(6, 40, generator=g) > 0.2
    keep = nms_sorted(sb, valid, 0.45)
    for i in range(6):
        cand = order[i][valid[i]]  # greedy NMS on the valid candidates only
        ref = cand[nms(boxes[i][cand], scores[i][cand], 0.45)]
        assert torch.equal(order[i][keep[i]], ref)


def test_grouped_nms_over_several_chunks_equals_each_group_alone():
    """30 groups of 200 candidates: the overlaps are computed 26 groups at a time, and no group sees another."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.stack([_boxes(200, g) for _ in range(30)])
    valid = torch.rand(30, 200, generator=g) > 0.1
    keep = nms_sorted(boxes, valid, 0.45)
    for i in range(30):
        assert torch.equal(keep[i], nms_sorted(boxes[i:i + 1], valid[i:i + 1], 0.45)[0])
    assert 0 < keep.sum() < valid.sum()


@pytest.mark.parametrize("k", [1, 7, 50])
def test_top_stable_is_the_head_of_a_stable_descending_sort(k):
    """With many ties and NaN (ranked as -1): the same values and indices as sorting the whole row."""
    g = torch.Generator().manual_seed(k)
    x = (torch.rand(3, 4, 50, generator=g) * 6).floor() / 6
    x[torch.rand(3, 4, 50, generator=g) < 0.1] = float("nan")
    values, idx = top_stable(x, k)
    ref_values, ref_idx = x.nan_to_num(nan=-1.0).sort(dim=-1, descending=True, stable=True)
    assert torch.equal(values, ref_values[..., :k]) and torch.equal(idx, ref_idx[..., :k])


def test_perfect_outputs_decode_to_the_ground_truth_with_map_one():
    """Invariant 8."""
    priors = make_priors(**TINYSSD_96)
    g = torch.Generator().manual_seed(0)
    boxes = [_boxes(n, g) for n in (3, 1, 2)]
    # keep the objects apart so NMS of one class never merges two of them
    boxes = [torch.tensor([[0.05, 0.05, 0.35, 0.4], [0.55, 0.1, 0.9, 0.45], [0.2, 0.6, 0.5, 0.95]]),
             torch.tensor([[0.3, 0.3, 0.7, 0.8]]), torch.tensor([[0.1, 0.1, 0.3, 0.5], [0.6, 0.5, 0.95, 0.9]])]
    labels = [torch.tensor([0, 1, 0]), torch.tensor([2]), torch.tensor([1, 1])]
    t = pad_targets(boxes, labels)
    loc, conf = perfect_outputs(t, priors, 3)
    dets = detect(loc, conf, priors)
    for d, b, lab in zip(dets, boxes, labels):
        top = d.scores > 0.5
        assert top.sum() == len(b)
        for box, label in zip(b, lab):
            hit = ((d.boxes[top] - box).abs().max(1).values < 1e-4) & (d.labels[top] == label)
            assert hit.any()
    gts = unpad(t)
    for mode in ("11pt", "area", "coco"):
        assert detection_map(dets, gts, 3, mode=mode)["map"] == pytest.approx(1.0)


def _one_class(dets, gt_boxes, difficult=None):
    gts = [(torch.tensor(gt_boxes), torch.zeros(len(gt_boxes), dtype=torch.long),
            torch.tensor(difficult or [False] * len(gt_boxes)))]
    b = torch.tensor([d[0] for d in dets]).reshape(-1, 4)
    return [(b, torch.tensor([d[1] for d in dets]), torch.zeros(len(dets), dtype=torch.long))], gts


GT = [[0.1, 0.1, 0.5, 0.5]]
HIT, MISS = [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]


@pytest.mark.parametrize("mode", ["11pt", "area"])
def test_voc_ap_hand_cases(mode):
    def ap(dets, gt=GT, difficult=None):
        d, g = _one_class(dets, gt, difficult)
        return detection_map(d, g, 1, mode=mode)["ap"][0]

    assert ap([(HIT, 0.9)]) == pytest.approx(1.0)
    assert ap([]) == 0.0
    assert ap([(HIT, 0.9), (MISS, 0.5)]) == pytest.approx(1.0)  # TP then FP
    assert ap([(MISS, 0.9), (HIT, 0.5)]) == pytest.approx(0.5)  # FP then TP: precision 0.5 at recall 1
    # a duplicate hit is a FP: recall stays 1/2 (precision 1 up to there): 6 of 11 points, or area 0.5
    half = 6 / 11 if mode == "11pt" else 0.5
    assert ap([(HIT, 0.9), (HIT, 0.8), (MISS, 0.1)], gt=GT + [[0.6, 0.1, 0.9, 0.4]]) == pytest.approx(half)
    # a hit on a difficult object is ignored, and difficult objects are not counted
    assert ap([(HIT, 0.9), (MISS, 0.8)], gt=GT + [MISS], difficult=[False, True]) == pytest.approx(1.0)


def _voc_eval_reference(dets, gts, c, thr=0.5, use_07=True):
    """The devkit's voc_eval loop, written out (one detection at a time, IoU without the +1 convention)."""
    recs = [(g[0][g[1] == c].numpy(), g[2][g[1] == c].numpy()) for g in gts]
    npos = sum(int((~d).sum()) for _, d in recs)
    found = [np.zeros(len(b), bool) for b, _ in recs]
    items = [(float(s), i, b.numpy()) for i, d in enumerate(dets) for b, s, lab in zip(*d) if int(lab) == c]
    items.sort(key=lambda t: -t[0])
    tp, fp = np.zeros(len(items)), np.zeros(len(items))
    for k, (_, i, bb) in enumerate(items):
        bbgt, diff = recs[i]
        ovmax, jmax = -np.inf, -1
        if len(bbgt):
            ix = np.clip(np.minimum(bbgt[:, 2], bb[2]) - np.maximum(bbgt[:, 0], bb[0]), 0, None)
            iy = np.clip(np.minimum(bbgt[:, 3], bb[3]) - np.maximum(bbgt[:, 1], bb[1]), 0, None)
            inter = ix * iy
            uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (bbgt[:, 2] - bbgt[:, 0]) * (bbgt[:, 3] - bbgt[:, 1]) - inter
            ov = inter / uni
            ovmax, jmax = ov.max(), int(ov.argmax())
        if ovmax > thr:
            if not diff[jmax]:
                if not found[i][jmax]:
                    tp[k], found[i][jmax] = 1, True
                else:
                    fp[k] = 1
        else:
            fp[k] = 1
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return _devkit_voc_ap(rec, prec, use_07)


def _devkit_voc_ap(rec, prec, use_07):
    """The official VOC devkit's AP, transcribed here so that robustlab's `average_precision` is checked against it
    and not against itself: VOC2007's 11-point rule (VOCevaldet.m: for t = 0:0.1:1, the largest precision at
    recall >= t, 0 if none, averaged over the 11 points) and VOC2010's area rule (VOCap.m: recall framed by 0 and
    1, precision by 0 and 0, the precision envelope made monotone from the right, summed over the recall steps)."""
    if use_07:
        total = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = prec[rec >= t]
            total += (above.max() if above.size else 0.0) / 11.0
        return total
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


@pytest.mark.parametrize("use_07", [True, False])
def test_the_transcribed_devkit_ap_on_known_curves(use_07):
    """The transcription itself on curves whose AP is known by hand, so that the cross-check cannot agree on a
    shared mistake: perfect detection, and precision 1/2 at full recall."""
    assert _devkit_voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), use_07) == pytest.approx(1.0)
    assert _devkit_voc_ap(np.array([0.0, 1.0]), np.array([0.0, 0.5]), use_07) == pytest.approx(0.5)
    # recall 1/2 at precision 1, never more: 6 of the 11 points, or area 1/2
    assert _devkit_voc_ap(np.array([0.5]), np.array([1.0]), use_07) == pytest.approx(6 / 11 if use_07 else 0.5)


def _random_problem(seed, n_img=25, k=3, difficult=True):
    g = torch.Generator().manual_seed(seed)
    gts, dets, sizes = [], [], []
    for _ in range(n_img):
        m = int(torch.randint(0, 5, (), generator=g))
        b = _boxes(m, g)
        lab = torch.randint(0, k, (m,), generator=g)
        diff = (torch.rand(m, generator=g) < 0.15) if difficult else torch.zeros(m, dtype=torch.bool)
        gts.append((b, lab, diff))
        n = int(torch.randint(0, 12, (), generator=g))
        src = torch.randint(0, max(m, 1), (n,), generator=g)
        db = (b[src] if m else _boxes(n, g)) + torch.randn(n, 4, generator=g) * 0.04
        db = torch.cat([db[:, :2], torch.maximum(db[:, 2:], db[:, :2] + 0.01)], 1)
        dl = torch.where(torch.rand(n, generator=g) < 0.8, lab[src] if m else torch.zeros(n, dtype=torch.long),
                         torch.randint(0, k, (n,), generator=g))
        dets.append((db, torch.rand(n, generator=g), dl))
        sizes.append((200, 150))
    return dets, gts, sizes


@pytest.mark.parametrize("seed", range(4))
def test_voc_ap_equals_the_devkit_loop(seed):
    dets, gts, _ = _random_problem(seed)
    for mode, use_07 in (("11pt", True), ("area", False)):
        r = detection_map(dets, gts, 3, mode=mode)
        for c in range(3):
            assert r["ap"][c] == pytest.approx(_voc_eval_reference(dets, gts, c, use_07=use_07), abs=1e-12)


def test_shuffled_labels_give_near_zero_map():
    dets, gts, _ = _random_problem(7, n_img=40, k=5, difficult=False)
    perfect = [(b, torch.linspace(1, 0.5, len(lab)), lab) for b, lab, _ in gts]
    assert detection_map(perfect, gts, 5)["map"] == pytest.approx(1.0)
    wrong = [(b, s, (lab + 1) % 5) for b, s, lab in perfect]  # every box carries another class
    assert detection_map(wrong, gts, 5)["map"] < 0.05


BACKENDS = [b for b in ("faster_coco_eval", "pycocotools") if importlib.util.find_spec(b)]
# both are test dependencies: in CI a missing one is a failed install, not a reason to skip the cross-check
MISSING_IN_CI = bool(os.environ.get("CI")) and len(BACKENDS) < 2


def test_the_cocoeval_backends_are_installed_in_ci():
    assert not MISSING_IN_CI, f"COCOeval backends installed: {BACKENDS or 'none'} (CI needs both: scripts/setup.sh --test)"


@pytest.mark.reference
@pytest.mark.skipif(not BACKENDS, reason="neither faster-coco-eval nor pycocotools is installed")
@pytest.mark.parametrize("seed", range(3))
def test_coco_mode_equals_cocoeval_ap50(seed, monkeypatch):
    dets, gts, sizes = _random_problem(seed, difficult=False)
    ours = detection_map(dets, gts, 3, mode="coco")
    for backend in BACKENDS:
        if backend == "pycocotools":  # force the fallback path
            monkeypatch.setitem(__import__("sys").modules, "faster_coco_eval", None)
        ref = coco_ap50(dets, gts, sizes, category_ids=[2, 5, 9])
        assert ref["ap50"] == pytest.approx(ours["map"], abs=1e-9), backend
        assert np.allclose(ref["ap"], ours["ap"], atol=1e-9)


@pytest.mark.reference
@pytest.mark.skipif(not BACKENDS, reason="neither faster-coco-eval nor pycocotools is installed")
def test_cocoeval_perfect_predictions_and_category_ids():
    _, gts, sizes = _random_problem(1, difficult=False)
    perfect = [(b, torch.full((len(lab),), 0.9), lab) for b, lab, _ in gts]
    r = coco_ap50(perfect, gts, sizes, category_ids=[2, 5, 9])
    assert r["ap50"] == pytest.approx(1.0)
    shifted = [(b, s, (lab + 1) % 3) for b, s, lab in perfect]  # wrong category ids
    assert coco_ap50(shifted, gts, sizes, category_ids=[2, 5, 9])["ap50"] < 0.05


def test_bad_inputs():
    with pytest.raises(ValueError, match="AP mode"):
        detection_map([], [], 2, mode="voc12")
    with pytest.raises(ValueError, match="labels"):
        detection_map([(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0))],
                      [(torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([3]))], 2)
    with pytest.raises(ValueError, match="images"):
        detection_map([], [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))], 2)
