"""Multibox loss with OHEM and its decomposition (cwat.md 1.5, 2; invariants 5, 6, 8, 11)."""
import math

import pytest
import torch
import torch.nn.functional as F

from robustlab.detection.boxes import TINYSSD_96, make_priors
from robustlab.detection.loss import decompose, hard_negatives, multibox_loss
from robustlab.detection.targets import check_targets, match_targets, pad_targets

from .conftest import perfect_outputs

PRIORS = make_priors(**TINYSSD_96)
K = 4


def _targets(seed=0, empty_image=False):
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for n in [3, 1, 0 if empty_image else 2]:
        xy = torch.rand(n, 2, generator=g) * 0.6
        wh = 0.1 + torch.rand(n, 2, generator=g) * 0.3
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=1)], 1))
        labels.append(torch.randint(0, K, (n,), generator=g))
    return pad_targets(boxes, labels)


def _outputs(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, PRIORS.shape[0], 4, generator=g), torch.randn(b, PRIORS.shape[0], K + 1, generator=g) * 2


def _slow_multibox(loc, conf, targets):
    """Loops over images and anchors, sorts negatives one image at a time."""
    conf_t, loc_t, _ = match_targets(targets, PRIORS)
    total_c, total_r, n_total = 0.0, 0.0, 0
    for b in range(loc.shape[0]):
        pos = [p for p in range(PRIORS.shape[0]) if conf_t[b, p] > 0]
        negs = [p for p in range(PRIORS.shape[0]) if conf_t[b, p] == 0]
        bg = {p: -F.log_softmax(conf[b, p], -1)[0].item() for p in negs}
        negs.sort(key=lambda p: (-bg[p], p))
        keep = negs[:min(3 * len(pos), PRIORS.shape[0] - 1)]
        for p in pos + keep:
            total_c += -F.log_softmax(conf[b, p], -1)[conf_t[b, p]].item()
        for p in pos:
            total_r += F.smooth_l1_loss(loc[b, p], loc_t[b, p], reduction="sum").item()
        n_total += len(pos)
    return total_c / n_total, total_r / n_total


def test_multibox_equals_slow_reference_with_an_empty_image():
    t = _targets(0, empty_image=True)
    loc, conf = _outputs(3)
    loss, lc, lr = multibox_loss(loc, conf, t, PRIORS)
    ref_c, ref_r = _slow_multibox(loc, conf, t)
    assert lc.item() == pytest.approx(ref_c, rel=1e-5) and lr.item() == pytest.approx(ref_r, rel=1e-5)
    assert loss.item() == pytest.approx(ref_c + ref_r, rel=1e-5) and math.isfinite(loss.item())


def test_ohem_ratio_ranking_and_positives():
    t = _targets(1, empty_image=True)
    loc, conf = _outputs(3, seed=2)
    d = decompose(loc, conf, t, PRIORS)
    p = PRIORS.shape[0]
    for b in range(3):
        n_pos = int(d.pos[b].sum())
        assert int(d.neg[b].sum()) == min(3 * n_pos, p - 1)
        assert not (d.neg[b] & d.pos[b]).any()
        bg = d.lc[b].masked_fill(d.pos[b], -math.inf)
        if n_pos:  # the mined negatives are exactly the top background losses
            assert d.lc[b][d.neg[b]].min() >= bg[~d.neg[b] & ~d.pos[b]].max()
    assert int(d.neg[2].sum()) == 0  # the empty image mines nothing


def test_ohem_clamps_at_p_minus_one():
    lc = torch.rand(1, 10)
    pos = torch.zeros(1, 10, dtype=torch.bool)
    pos[0, :5] = True
    neg = hard_negatives(lc, pos)
    assert int(neg.sum()) == 5 and not (neg & pos).any()  # min(15, 9) = 9 requested, only 5 negatives exist


def test_perfect_prediction_has_near_zero_loss():
    t = _targets(2)
    loc, conf = perfect_outputs(t, PRIORS, K)
    loss, _, _ = multibox_loss(loc, conf, t, PRIORS)
    assert loss.item() < 1e-6


def test_no_objects_gives_zero_loss():
    t = pad_targets([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2)
    loc, conf = _outputs(2)
    loss, lc, lr = multibox_loss(loc.requires_grad_(), conf, t, PRIORS)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable
    assert loc.grad.abs().sum() == 0


def test_decomposition_reproduces_the_loss_per_image():
    """Invariant 11: for single-image batches the task losses are L_cls and L_reg."""
    t = _targets(3)
    loc, conf = _outputs(3, seed=4)
    d = decompose(loc, conf, t, PRIORS)
    lcls_b, lreg_b = d.task_losses()
    for b in range(3):
        _, lc, lr = multibox_loss(loc[b:b + 1], conf[b:b + 1], t[b:b + 1], PRIORS)
        assert lcls_b[b].item() == pytest.approx(lc.item(), rel=1e-5)
        assert lreg_b[b].item() == pytest.approx(lr.item(), rel=1e-5)


def test_object_and_class_groupings():
    t = _targets(4)
    loc, conf = _outputs(3, seed=5)
    d = decompose(loc, conf, t, PRIORS)
    m = t.shape[1]
    obj_c, obj_r, count = d.object_losses(m)
    for b in range(3):
        for j in range(m):
            anchors = (d.obj_t[b] == j) & d.pos[b]
            assert count[b, j].item() == anchors.sum().item()
            if anchors.any():
                assert obj_c[b, j].item() == pytest.approx(d.lc[b][anchors].mean().item(), rel=1e-5)
                assert obj_r[b, j].item() == pytest.approx(d.lr[b][anchors].mean().item(), rel=1e-5)
                assert (d.cls_t[b][anchors] == int(t[b, j, 4]) + 1).all()  # the class of each object
            else:
                assert obj_c[b, j] == 0
    counts = d.class_counts(K)
    assert counts.shape == (3, K + 1) and torch.equal(counts.sum(1), d.n_pos.float()) and (counts[:, 0] == 0).all()


def test_targets_validation():
    good = _targets(0)
    check_targets(good, K)
    bad = good.clone()
    bad[0, 0, 2] = bad[0, 0, 0] - 0.1
    with pytest.raises(ValueError, match="x2 < x1"):
        check_targets(bad, K)
    bad = good.clone()
    bad[0, 0, 3] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_targets(bad, K)
    bad = good.clone()
    bad[0, 0, 4] = K
    with pytest.raises(ValueError, match="labels"):
        check_targets(bad, K)
    with pytest.raises(ValueError, match="shape"):
        check_targets(good[..., :5], K)
