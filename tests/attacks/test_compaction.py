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


def test_fab_compaction_needs_a_budget(mnist_cnn):
    from robustlab.errors import InputError

    with pytest.raises(InputError, match="compact"):
        FAB(mnist_cnn, norm="linf", compact=True)
