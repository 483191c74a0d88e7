"""Evaluation PGD keeps each sample's first fooling iterate and lets fooled samples leave the batch: never weaker
than the final iterate, fewer passes, and leaving the batch changes no other sample's result."""
from __future__ import annotations

import pytest
import torch

from robustlab import evaluate
from robustlab.attacks import PGD
from robustlab.errors import InputError


def _robust(model, x, y, attack):
    with torch.no_grad():
        return model(attack(x, y)).argmax(1) == y


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0), ("l1", 10.0)])
def test_never_weaker_than_the_final_iterate_and_cheaper(mnist_cnn, mnist, norm, eps):
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    final = PGD(mnist_cnn, norm=norm, eps=eps, steps=20)
    best = PGD(mnist_cnn, norm=norm, eps=eps, steps=20, best_iterate=True)
    rob_final, rob_best = _robust(mnist_cnn, x, y, final), _robust(mnist_cnn, x, y, best)
    assert not (rob_best & ~rob_final).any()  # every sample the final iterate breaks stays broken
    assert rob_best.sum() <= rob_final.sum()
    out = best.run(x, y, with_success=False)
    assert out.backward < final.run(x, y, with_success=False).backward  # fooled samples left the batch
    assert best.threat.contains(out.x_adv, x).all()


def test_on_an_adversarially_trained_model(digits_mlp_at, digits):
    """A robust model, where the final iterate and the best one differ in what they leave standing."""
    x, y = digits.x_test, digits.y_test
    rob_final = _robust(digits_mlp_at, x, y, PGD(digits_mlp_at, eps=0.1, steps=20))
    rob_best = _robust(digits_mlp_at, x, y, PGD(digits_mlp_at, eps=0.1, steps=20, best_iterate=True))
    assert rob_final.float().mean() > 0.2  # there is robustness to measure
    assert not (rob_best & ~rob_final).any() and rob_best.sum() <= rob_final.sum()


def test_leaving_the_batch_changes_no_other_sample(mnist_cnn, mnist):
    """Compaction against the frozen-mask path (the one a per-sample budget takes): the same adversarial
    examples bit for bit on a trained model."""
    x, y = mnist.x_test[:128], mnist.y_test[:128]
    compacted = PGD(mnist_cnn, norm="linf", eps=0.3, steps=15, best_iterate=True)(x, y)
    masked_attack = PGD(mnist_cnn, norm="linf", eps=torch.full((128, 1, 1, 1), 0.3), steps=15, best_iterate=True)
    masked = masked_attack(x, y)
    assert torch.allclose(compacted, masked, atol=1e-6)
    alone = PGD(mnist_cnn, norm="linf", eps=0.3, steps=15, best_iterate=True)(x[:7], y[:7])
    assert torch.allclose(compacted[:7], alone, atol=1e-6)  # a sample's result does not depend on its batch


def test_evaluate_uses_the_best_iterate_unless_the_spec_says_otherwise(mnist_cnn, mnist):
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    r = evaluate(mnist_cnn, x, y, ["pgd:norm=linf,eps=0.3,steps=20", "pgd:norm=linf,eps=0.3,steps=20,best_iterate=false"],
                 checks=False)
    best, final = r["attacks"].values()
    assert best["robust_accuracy"] <= final["robust_accuracy"]
    assert best["best_iterate"] is True and final["best_iterate"] is False


def test_best_iterate_is_refused_with_train_mode_batchnorm(mnist_cnn):
    with pytest.raises(InputError, match="bn_mode=eval"):
        PGD(mnist_cnn, eps=0.3, best_iterate=True, bn_mode="train")
