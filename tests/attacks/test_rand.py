"""Randomised defenses: `autoattack:version=rand` (APGD-CE and APGD-DLR, each step's gradient averaged over 20
passes, as the reference's rand version) agrees with `pyautoattack` version='rand' within 2 points on a model with
noise in its forward pass; `eot=K` averages PGD's and APGD's gradients; the evaluator says to use them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab import evaluate
from robustlab.attacks import APGD, PGD, AutoAttack


class Noisy(nn.Module):
    """A randomised defense: Gaussian noise on the input of a trained classifier, fresh on every forward."""

    def __init__(self, net: nn.Module, sigma: float = 0.15) -> None:
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


def _expected_accuracy(model, x, y, draws: int = 20) -> float:
    """Accuracy of a randomised model averaged over `draws` forward passes (seeded, the same for every x)."""
    torch.manual_seed(123)
    with torch.no_grad():
        return sum((model(x).argmax(1) == y).float().mean().item() for _ in range(draws)) / draws


def test_rand_version_agrees_with_the_reference(digits_mlp_at, digits):
    pytest.importorskip("pyautoattack")
    model = Noisy(digits_mlp_at).eval()
    x, y = digits.x_test[:100], digits.y_test[:100]
    torch.manual_seed(0)
    ours = AutoAttack(model, eps=0.1, version="rand")(x, y)
    torch.manual_seed(0)
    ref = AutoAttack(model, eps=0.1, version="rand", impl="reference")(x, y)
    acc_ours, acc_ref = _expected_accuracy(model, ours, y), _expected_accuracy(model, ref, y)
    clean = _expected_accuracy(model, x, y)
    assert acc_ours < clean - 0.1  # the attack has work to do and does it
    assert abs(acc_ours - acc_ref) <= 0.02, (acc_ours, acc_ref)
    assert ((ours - x).abs().amax() <= 0.1 + 1e-6) and ours.min() >= 0 and ours.max() <= 1


def test_rand_components_and_log(digits_mlp_at, digits):
    model = Noisy(digits_mlp_at).eval()
    aa = AutoAttack(model, eps=0.1, version="rand", apgd_steps=5)
    parts = aa.components()
    assert [(p.name, p.loss_name, p.eot) for p in parts] == [("apgd-ce", "ce", 20), ("apgd-ce", "dlr", 20)]
    out = aa.run(digits.x_test[:20], digits.y_test[:20])
    assert [s["attack"] for s in aa.last_log] == ["apgd-ce", "apgd-dlr"][:len(aa.last_log)]
    assert out.backward >= 20 * 5  # 20 gradient passes per step


@pytest.mark.parametrize("attack", [PGD, APGD])
def test_eot_averages_gradients(attack, digits_mlp_at, digits):
    """On a deterministic model EoT repeats the same gradient: K times the passes, the same result."""
    x, y = digits.x_test[:32], digits.y_test[:32]
    one = attack(digits_mlp_at, eps=0.1, steps=5).run(x, y)
    three = attack(digits_mlp_at, eps=0.1, steps=5, eot=3).run(x, y)
    assert torch.allclose(one.x_adv, three.x_adv, atol=1e-6)
    assert three.backward == 3 * one.backward


def test_the_evaluator_says_to_use_them(digits_mlp_at, digits):
    model = Noisy(digits_mlp_at).eval()
    with pytest.warns(RuntimeWarning, match="version=rand"):
        evaluate(model, digits.x_test[:32], digits.y_test[:32], ["pgd:eps=0.1,steps=3"], integrity=False)
