"""Randomised defenses (issue 28): `autoattack:version=rand` (APGD-CE and APGD-DLR, each step's gradient averaged
over 20 passes, as the reference's rand version) is never weaker than `pyautoattack` version='rand' on models with
noise in their forward pass, judged the same way (expected accuracy over 50 fresh draws); an iterate fools a
randomised model only by the EoT estimate (the share of the eot passes), so a point leaves the batch only when
every pass is fooled and compaction changes nothing; `evaluate` judges a randomised model's adversarial images by
`draws` forward passes, seeded per batch; deterministic models are untouched (tests/attacks/test_compaction.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab import evaluate
from robustlab.attacks import APGD, APGDT, PGD, AutoAttack
from robustlab.errors import InputError
from tests.conftest import require


class Noisy(nn.Module):
    """A randomised defense: Gaussian noise on the input of a trained classifier, fresh on every forward."""

    def __init__(self, net: nn.Module, sigma: float = 0.15) -> None:
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


def _expected_accuracy(model, x, y, draws: int = 50) -> float:
    """Accuracy of a randomised model averaged over `draws` forward passes (seeded, the same for every x)."""
    torch.manual_seed(123)
    with torch.no_grad():
        return sum((model(x).argmax(1) == y).float().mean().item() for _ in range(draws)) / draws


@pytest.mark.parametrize("sigma", [0.05, 0.15])
def test_rand_version_is_never_weaker_than_the_reference(sigma, digits_mlp_at, digits):
    """Within 1 point of pyautoattack's rand version or below it. Measured below it (docs/attacks.md: 80.1 vs
    81.8% at sigma 0.05, 74.8 vs 81.5% at 0.15): the reference lets an image leave at the first iterate that fools
    one draw and keeps that image's last such iterate, often a weak one; robustlab keeps attacking until every
    pass of an iterate is fooled."""
    require("pyautoattack")
    model = Noisy(digits_mlp_at, sigma).eval()
    x, y = digits.x_test[:100], digits.y_test[:100]
    torch.manual_seed(0)
    ours = AutoAttack(model, eps=0.1, version="rand")(x, y)
    torch.manual_seed(0)
    ref = AutoAttack(model, eps=0.1, version="rand", impl="reference")(x, y)
    acc_ours, acc_ref = _expected_accuracy(model, ours, y), _expected_accuracy(model, ref, y)
    clean = _expected_accuracy(model, x, y)
    assert acc_ours < clean - 0.1  # the attack has work to do and does it
    assert acc_ours <= acc_ref + 0.01, (acc_ours, acc_ref)
    assert ((ours - x).abs().amax() <= 0.1 + 1e-6) and ours.min() >= 0 and ours.max() <= 1


@pytest.mark.parametrize("attack", ["apgd", "apgd-t", "pgd"])
def test_compaction_keeps_a_randomised_result(attack, digits_mlp_at, digits):
    """With eot=20, compact on (samples leave the batch) and off give the same expected accuracy within 1 point:
    a sample leaves only once every pass is fooled (before: at the first fooling draw, 8-12 points too high)."""
    model = Noisy(digits_mlp_at, 0.15).eval()
    x, y = digits.x_test[:100], digits.y_test[:100]
    accs = []
    for compact in (True, False):
        torch.manual_seed(0)
        if attack == "pgd":
            atk = PGD(model, eps=0.1, steps=20, eot=20, best_iterate=compact)
        elif attack == "apgd":
            atk = APGD(model, eps=0.1, steps=20, eot=20, compact=compact)
        else:
            atk = APGDT(model, eps=0.1, steps=10, eot=20, n_targets=3, compact=compact)
        accs.append(_expected_accuracy(model, atk(x, y), y))
    assert abs(accs[0] - accs[1]) <= 0.01, accs
    assert accs[0] < _expected_accuracy(model, x, y) - 0.05


class Coin(nn.Module):
    """A model whose prediction of an image does not depend on it: class 0, flipped to class 1 on a share
    `p` of the forward passes. One draw fools it often; the EoT estimate of its accuracy is about 1 - p."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        flip = (torch.rand(x.shape[0]) < self.p).float()
        z = x.flatten(1).sum(1) * self.w
        return torch.stack([1.0 + z, 2.0 * flip + z], 1)


@pytest.mark.parametrize("make", [lambda m, e: APGD(m, eps=0.1, steps=10, eot=e),
                                  lambda m, e: PGD(m, eps=0.1, steps=10, eot=e, best_iterate=True)])
def test_a_point_leaves_only_on_the_eot_estimate(make):
    """On a model fooled by 30% of its draws, one draw fools every image within a few iterates: with eot=1 the
    images leave early and count as broken. With eot=20 no iterate fools every pass, so no image leaves the
    batch (every step is paid) and the estimate returned is about 0.7, not a broken image."""
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 4, 4), torch.zeros(16, dtype=torch.long)
    model = Coin().eval()
    atk = make(model, 1)
    one = atk.run(x, y)
    assert one.backward < 10 * 16  # the images left the batch early
    if isinstance(atk, APGD):  # and count as broken (PGD's flags are one more draw)
        assert one.success.all()
    out = make(model, 20).run(x, y)
    assert out.backward == 20 * 10 * 16 + (20 * 16 if isinstance(out.accuracy, torch.Tensor) else 0)
    if out.accuracy is not None:  # APGD returns its estimates: the lowest share over 11 iterates of 20 passes
        assert ((out.accuracy > 0.2) & (out.accuracy < 1)).all(), out.accuracy
        assert out.success.float().mean() < 0.5


def test_evaluate_judges_a_randomised_model_by_draws(digits_mlp_at, digits, tmp_path):
    """Expected accuracy over `draws` passes with its spread, in the JSON and the log; each batch seeded, so the
    global seed, shards and a merge change nothing; a deterministic model is judged as before (no such keys)."""
    from robustlab.engine.evaluator import without_seconds
    from robustlab.engine.tasks import merge_evaluations
    from robustlab.reports.markdown import attack_log

    model = Noisy(digits_mlp_at, 0.15).eval()
    x, y = digits.x_test[:40], digits.y_test[:40]
    specs = ["autoattack:norm=linf,eps=0.1,version=rand,apgd_steps=5", "pgd:eps=0.1,steps=5,eot=4"]
    kw = dict(integrity=False, checks=False, progress=False, batch_size=20, keep_records=True)
    torch.manual_seed(1)
    r = evaluate(model, x, y, specs, draws=8, **kw)
    torch.manual_seed(2)
    assert without_seconds(evaluate(model, x, y, specs, draws=8, **kw)) == without_seconds(r)
    assert r["randomised"]["draws"] == 8 and 0 < r["randomised"]["clean_accuracy_expected"] <= 1
    for name, entry in r["attacks"].items():
        spread = entry["expected_over_draws"]
        assert spread["draws"] == 8 and spread["min"] <= entry["robust_accuracy"] <= spread["max"]
        rob = torch.tensor(r["records"]["robust"][name])
        assert abs(rob.mean().item() - entry["robust_accuracy"]) < 1e-6
        assert ((rob > 0) & (rob < 1)).any()  # shares, not one draw's verdict
        assert entry["passes"]["forward"] > 0
    assert r["union_accuracy"] <= min(e["robust_accuracy"] for e in r["attacks"].values()) + 1e-6
    log = "\n".join(attack_log(r, "autoattack"))
    assert "judged as the expected accuracy over 8 forward passes" in log
    for i in range(2):
        evaluate(model, x, y, specs, draws=8, state=tmp_path / f"s{i}", shard=(i, 2), **kw)
    assert without_seconds(merge_evaluations([tmp_path / "s0", tmp_path / "s1"], keep_records=True)) == \
        without_seconds(r)
    from robustlab.reports.store import leaderboard, record

    record(tmp_path / "r.sqlite", model_digest="noisy", model_name="noisy", data="digits:test", result=r,
           specs=specs, version="test")  # the store keeps the shares: best-known = evaluate's union
    (row,) = leaderboard(tmp_path / "r.sqlite")
    assert row["best_known_accuracy"] == pytest.approx(r["union_accuracy"], abs=1e-6)
    plain = evaluate(digits_mlp_at, x, y, specs[1:], draws=8, **kw)
    assert "randomised" not in plain and "expected_over_draws" not in plain["attacks"]["pgd"]
    assert set(r["records"]["robust"]) == set(r["attacks"])
    with pytest.raises(InputError, match="draws"):
        evaluate(model, x, y, specs, draws=0, **kw)


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
