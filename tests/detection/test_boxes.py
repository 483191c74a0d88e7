"""SSD box geometry against brute-force references (cwat.md 1.2-1.6)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustlab.detection.boxes import (
    SSD300_COCO,
    SSD300_VOC,
    TINYSSD_96,
    batched_nms,
    box_iou,
    center_to_corner,
    check_boxes,
    decode,
    encode,
    make_priors,
    match,
    nms,
)


def _random_boxes(n, seed, min_size=0.02):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.8
    wh = min_size + torch.rand(n, 2, generator=g) * 0.2
    return torch.cat([xy, (xy + wh).clamp(max=1.0)], 1)


def test_prior_counts_and_range():
    assert make_priors(**SSD300_VOC).shape == (8732, 4)
    assert make_priors(**SSD300_COCO).shape == (8732, 4)
    p = make_priors(**TINYSSD_96)
    assert p.shape == (866, 4) and p.min() >= 0 and p.max() <= 1
    first = make_priors(**SSD300_VOC)[:6]
    s, s2 = 30 / 300, (30 * 60) ** 0.5 / 300
    assert torch.allclose(first[0], torch.tensor([4 / 300, 4 / 300, s, s]), atol=1e-6)  # (j+0.5)/g, g = 300/8
    assert torch.allclose(first[1, 2:], torch.tensor([s2, s2]), atol=1e-6)
    assert torch.allclose(first[2, 2:], torch.tensor([s * 2 ** 0.5, s / 2 ** 0.5]), atol=1e-6)


def test_iou_against_bruteforce():
    a, b = _random_boxes(7, 0), _random_boxes(5, 1)
    iou = box_iou(a, b)
    for i in range(7):
        for j in range(5):
            ix = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            iy = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = ix * iy
            ua = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter
            assert iou[i, j].item() == pytest.approx(float(inter / ua), abs=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 20), st.integers(0, 1000))
def test_encode_decode_round_trip(n, seed):
    priors = make_priors(**TINYSSD_96)
    gt = _random_boxes(n, seed)
    idx = torch.randint(0, priors.shape[0], (n,), generator=torch.Generator().manual_seed(seed))
    p = priors[idx]
    loc = torch.stack([encode(gt[i:i + 1], p[i:i + 1])[0] for i in range(n)])
    back = torch.stack([decode(loc[i:i + 1], p[i:i + 1])[0] for i in range(n)])
    assert torch.allclose(back, gt, atol=1e-5)


def test_matching_assigns_every_object_and_respects_threshold():
    priors = make_priors(**TINYSSD_96)
    gt = torch.stack([_random_boxes(4, 3), _random_boxes(4, 4)])
    labels = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])  # image 2 has 2 objects
    conf_t, loc_t, obj_t = match(gt, labels, valid, priors)
    for b in range(2):
        for j in range(4):
            if valid[b, j]:
                assert (obj_t[b] == j).any(), f"object {j} of image {b} got no anchor"
                assert (conf_t[b][obj_t[b] == j] == labels[b, j] + 1).all()
        assert not ((obj_t[b] >= 0) & ~valid[b].gather(0, obj_t[b].clamp_min(0))).any()  # padding never matched
    iou = box_iou(gt[0], center_to_corner(priors))
    forced = iou.argmax(1)
    pos = conf_t[0] > 0
    strong = iou.max(0).values >= 0.5
    assert torch.equal(pos, strong | torch.zeros_like(pos).index_fill(0, forced, True))
    assert torch.equal(obj_t >= 0, conf_t > 0)


def test_matching_image_without_objects():
    priors = make_priors(**TINYSSD_96)
    conf_t, _, obj_t = match(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long),
                             torch.zeros(1, 1, dtype=torch.bool), priors)
    assert (conf_t == 0).all() and (obj_t == -1).all()


def _greedy_reference(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= thr]
    return keep


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 40), st.integers(0, 10_000), st.sampled_from([0.3, 0.45, 0.7]))
def test_nms_equals_bruteforce(n, seed, thr):
    boxes = _random_boxes(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    scores = torch.randint(0, 5, (n,), generator=g).float()  # many ties: index order must decide
    assert nms(boxes, scores, thr).tolist() == _greedy_reference(boxes, scores, thr)


def test_nms_iou_exactly_at_threshold_survives():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]])  # IoU 0.5
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]


def test_batched_nms_never_crosses_classes():
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]])
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.45)
    assert sorted(keep.tolist()) == [0, 1]


def test_bad_boxes_give_clear_errors():
    with pytest.raises(ValueError, match="x2 < x1"):
        check_boxes(torch.tensor([[0.5, 0.1, 0.2, 0.3]]))
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        check_boxes(torch.tensor([[0.1, 0.1, 1.5, 0.3]]))
    with pytest.raises(ValueError, match="shape"):
        check_boxes(torch.zeros(3))
    check_boxes(torch.zeros(0, 4))  # an image without objects is valid
