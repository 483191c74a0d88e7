"""Compaction (a sample leaves the working batch once fooled) is result-preserving: with it on and off, APGD-CE,
APGD-DLR, APGD-T, FAB-T (within eps) and Square find the same fooled set on a trained model, and it costs fewer
passes. Every sample's state and random stream is its own, which is what makes this hold."""
from __future__ import annotations

import pytest
import torch

from robustlab.attacks import APGD, APGDT, FAB, AutoAttack, Square


def _fooled(model, x, y, attack):
    out = attack.run(x, y, with_success=False)
    with torch.no_grad():
        fooled = model(out.x_adv).argmax(1) != y
    return fooled, out


CASES = {
    "apgd-ce-linf": lambda m, c: APGD(m, norm="linf", eps=0.1, steps=25, compact=c),
    "apgd-ce-l2": lambda m, c: APGD(m, norm="l2", eps=1.0, steps=25, compact=c),
    "apgd-dlr": lambda m, c: APGD(m, norm="linf", eps=0.1, steps=25, loss="dlr", compact=c),
    "apgd-t": lambda m, c: APGDT(m, norm="linf", eps=0.1, steps=25, n_targets=3, compact=c),
    "fab-t-linf": lambda m, c: FAB(m, norm="linf", eps=0.1, steps=20, targeted=True, n_targets=3, compact=c),
    "fab-t-l2": lambda m, c: FAB(m, norm="l2", eps=1.0, steps=20, targeted=True, n_targets=3, compact=c),
    "square-linf": lambda m, c: Square(m, norm="linf", eps=0.1, n_queries=150, compact=c),
    "square-l2": lambda m, c: Square(m, norm="l2", eps=1.0, n_queries=150, compact=c),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_fooled_set_fewer_passes(case, mnist_cnn, mnist):
    x, y = mnist.x_test[:96], mnist.y_test[:96]
    with torch.no_grad():
        correct = mnist_cnn(x).argmax(1) == y
    on, out_on = _fooled(mnist_cnn, x, y, CASES[case](mnist_cnn, True))
    off, out_off = _fooled(mnist_cnn, x, y, CASES[case](mnist_cnn, False))
    assert 0 < int((on & correct).sum()) < int(correct.sum()), "the setting must leave both fooled and robust points"
    assert torch.equal(on, off)
    assert out_on.forward + out_on.backward < out_off.forward + out_off.backward
    attack = CASES[case](mnist_cnn, True)
    assert attack.threat.contains(out_on.x_adv, x).all()


def test_autoattack_same_robust_set_as_without_compaction(mnist_cnn, mnist, monkeypatch):
    """The whole panel, with every component's compaction switched off through its defaults."""
    x, y = mnist.x_test[:64], mnist.y_test[:64]
    kw = dict(norm="linf", eps=0.1, apgd_steps=15, fab_steps=10, square_queries=100, n_targets=3)
    on, _ = _fooled(mnist_cnn, x, y, AutoAttack(mnist_cnn, **kw))
    original = AutoAttack.components

    def uncompacted(self):
        parts = original(self)
        for p in parts:
            p.compact = False
        return parts

    monkeypatch.setattr(AutoAttack, "components", uncompacted)
    off, _ = _fooled(mnist_cnn, x, y, AutoAttack(mnist_cnn, **kw))
    assert torch.equal(on, off)


SIDE_BY_SIDE = {
    "apgd-t-linf": lambda m, k: APGDT(m, norm="linf", eps=0.1, steps=25, n_targets=3, targets_at_once=k),
    "apgd-t-l2": lambda m, k: APGDT(m, norm="l2", eps=1.0, steps=25, n_targets=3, targets_at_once=k),
    "apgd-t-restarts": lambda m, k: APGDT(m, norm="linf", eps=0.1, steps=15, n_targets=3, restarts=2,
                                          targets_at_once=k),
    "fab-t-linf": lambda m, k: FAB(m, norm="linf", eps=0.1, steps=20, targeted=True, n_targets=3, compact=True,
                                   targets_at_once=k),
    "fab-t-l2": lambda m, k: FAB(m, norm="l2", eps=1.0, steps=20, targeted=True, n_targets=3, targets_at_once=k),
}


@pytest.mark.parametrize("case", sorted(SIDE_BY_SIDE))
def test_targets_side_by_side_break_the_same_images(case, mnist_cnn, mnist):
    """targets_at_once=3 runs the three targets as copies of the batch (a copy's start comes from its own stream;
    every copy of an image leaves once one fools the model): the broken set is that of one target at a time."""
    x, y = mnist.x_test[:96], mnist.y_test[:96]
    with torch.no_grad():
        correct = mnist_cnn(x).argmax(1) == y
    one, out_one = _fooled(mnist_cnn, x, y, SIDE_BY_SIDE[case](mnist_cnn, 1))
    three, out_three = _fooled(mnist_cnn, x, y, SIDE_BY_SIDE[case](mnist_cnn, 3))
    assert 0 < int((one & correct).sum()) < int(correct.sum()), "the setting must leave both fooled and robust points"
    assert torch.equal(one, three)
    attack = SIDE_BY_SIDE[case](mnist_cnn, 3)
    assert attack.threat.contains(out_three.x_adv, x).all() and (out_three.x_adv - x)[~three].abs().max() == 0
    if case.startswith("fab"):  # norms: an unbroken image ran every target either way: the same smallest norm
        eps = 0.1 if "linf" in case else 1.0
        kept = correct & ~one
        assert torch.allclose(out_one.norms[kept], out_three.norms[kept], rtol=1e-4)
        assert (out_three.norms[one & correct] <= eps).all() and (out_one.norms[one & correct] <= eps).all()


def test_autoattack_targets_side_by_side_same_robust_set(mnist_cnn, mnist):
    x, y = mnist.x_test[:64], mnist.y_test[:64]
    kw = dict(norm="linf", eps=0.1, apgd_steps=15, fab_steps=10, square_queries=100, n_targets=9)
    one, _ = _fooled(mnist_cnn, x, y, AutoAttack(mnist_cnn, targets_at_once=1, **kw))
    nine, _ = _fooled(mnist_cnn, x, y, AutoAttack(mnist_cnn, targets_at_once=9, **kw))
    assert torch.equal(one, nine)


def test_targets_at_once_is_one_on_a_cpu_and_checked(mnist_cnn, mnist):
    from robustlab.attacks.base import targets_at_once
    from robustlab.errors import InputError

    x = mnist.x_test[:8]
    assert targets_at_once(None, 9, x, 8) == 1 and targets_at_once(4, 9, x, 8) == 4
    with pytest.raises(InputError, match="targets_at_once"):
        APGDT(mnist_cnn, targets_at_once=0)
    with pytest.raises(InputError, match="targeted=True"):
        FAB(mnist_cnn, targets_at_once=3)
    with pytest.raises(InputError, match="targets_at_once"):
        AutoAttack(mnist_cnn, impl="reference", targets_at_once=3)


def test_fab_compaction_needs_a_budget(mnist_cnn):
    from robustlab.errors import InputError

    with pytest.raises(InputError, match="compact"):
        FAB(mnist_cnn, norm="linf", compact=True)
