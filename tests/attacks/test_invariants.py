"""Invariants every attack must satisfy, parametrised over the registry (a registered attack is tested).

For shapes and budgets drawn by hypothesis: x_adv within the ball and [0, 1]; accuracy on x_adv never
above clean accuracy; model mode and requires_grad restored (also when the attack raises); seeded
runs repeat; parameters, gradients and BatchNorm buffers untouched.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import robustlab.methods  # noqa: F401  (registers pixel-ag: the registry must not depend on collection order)
from robustlab.attacks import create_attack
from robustlab.registry import ATTACKS
from robustlab.threat import make_threat

from tests.conftest import TinyCNN

# Fast settings per attack and norm (the algorithms are unchanged; only iteration counts are small).
FAST = {
    "fgsm": {"linf": {}, "l2": {}},
    "pgd": {"linf": {"steps": 3}, "l2": {"steps": 3}, "l1": {"steps": 3, "q": 0.9}},
    "apgd-ce": {"linf": {"steps": 5}, "l2": {"steps": 5}},
    "apgd-dlr": {"linf": {"steps": 5}, "l2": {"steps": 5}},
    "apgd-t": {"linf": {"steps": 4, "n_targets": 2}, "l2": {"steps": 4, "n_targets": 2}},
    "fab": {"linf": {"steps": 4, "targeted": True, "n_targets": 2}, "l2": {"steps": 4}},
    "square": {"linf": {"n_queries": 20}, "l2": {"n_queries": 20}},
    "autoattack": {"linf": {"apgd_steps": 3, "fab_steps": 3, "square_queries": 10, "n_targets": 2},
                   "l2": {"apgd_steps": 3, "fab_steps": 3, "square_queries": 10, "n_targets": 2}},
    "mma": {"linf": {"steps": 3, "k": 2}},
    "cw": {"l2": {"steps": 10, "binary_steps": 2}},
    "deepfool": {"l2": {"steps": 5}, "linf": {"steps": 5}},
    "critic": {"l2": {"steps": 5}},
    "ead": {"l1": {"steps": 10, "binary_steps": 2}},
    "salt-pepper": {"l1": {"steps": 20}},
    "pixel-ag": {"linf": {"steps": 3, "cam_layer": "conv"}},
}
CLASSIFIER_ATTACKS = [n for n in ATTACKS.names() if getattr(ATTACKS.get(n), "task", "classification") == "classification"]
CASES = [(name, norm) for name in CLASSIFIER_ATTACKS for norm in FAST.get(name, {})]


def test_every_registered_attack_has_a_case():  # detection attacks: tests/detection/test_attacks.py
    missing = [n for n in CLASSIFIER_ATTACKS if n not in FAST]
    assert not missing, f"add fast settings for {missing}"


def _make(name, norm, model, eps):
    kwargs = dict(FAST[name][norm])
    if name in ("cw", "critic", "ead", "salt-pepper"):
        kwargs["eps"] = eps
    elif name == "pixel-ag":  # eps on CAM-important pixels, 7/8 of it elsewhere (PART's ratio)
        kwargs.update(eps=eps, eps_low=0.875 * eps)
    elif name == "deepfool":
        kwargs.update(norm=norm, eps=eps, num_classes=4)
    else:
        kwargs.update(norm=norm, eps=eps)
    return create_attack(name, model, **kwargs)


@pytest.mark.parametrize("name,norm", CASES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 5), c=st.sampled_from([1, 3]), hw=st.integers(6, 10), eps_unit=st.floats(0.0, 1.0),
       seed=st.integers(0, 1000))
def test_in_ball_in_box_and_no_accuracy_gain(name, norm, n, c, hw, eps_unit, seed):
    torch.manual_seed(seed)
    model = TinyCNN(c=c, k=10).eval()
    eps = eps_unit * {"linf": 0.3, "l2": 2.0, "l1": 8.0}[norm]
    x = torch.rand(n, c, hw, hw)
    y = torch.randint(0, 10, (n,))
    attack = _make(name, norm, model, eps)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert make_threat(norm, eps).contains(x_adv, x, tol=1e-5).all()
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        adv_ok = model(x_adv).argmax(1) == y
    # robust accuracy (clean-correct and adversarial-correct) can never exceed clean accuracy; attacks that
    # return x for failures keep misclassified points misclassified
    assert (clean_ok & adv_ok).sum() <= clean_ok.sum()
    if name not in ("fgsm", "pgd", "mma"):  # attacks that keep only successes never flip a wrong point to right
        assert not (adv_ok & ~clean_ok).any()


@pytest.mark.parametrize("name,norm", CASES)
def test_state_restored_and_no_side_effects(name, norm):
    torch.manual_seed(0)
    model = TinyCNN().train()
    model.fc.weight.requires_grad_(False)  # a mixed requires_grad pattern must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    _make(name, norm, model, {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm])(x, y)
    assert model.training and model.bn.training
    assert model.conv.weight.requires_grad and not model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed (BatchNorm statistics must not move in eval mode)"


class Exploding(TinyCNN):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= 1:  # the first forward inside the attack raises
            raise RuntimeError("boom")
        return super().forward(x)


@pytest.mark.parametrize("name,norm", CASES)
def test_state_restored_when_the_attack_raises(name, norm):
    model = Exploding().train()
    x, y = torch.rand(3, 1, 8, 8), torch.randint(0, 10, (3,))
    attack = _make(name, norm, model, {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm])
    with pytest.raises(RuntimeError, match="boom"):
        attack(x, y)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name,norm", CASES)
def test_seeded_runs_repeat(name, norm):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    eps = {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm]
    a = _make(name, norm, model, eps)(x, y)
    torch.manual_seed(123)  # the global RNG must not matter
    b = _make(name, norm, model, eps)(x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,norm", [c for c in CASES if c[0] not in ("cw", "deepfool")])
def test_eps_zero_returns_x(name, norm):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = torch.rand(3, 1, 8, 8), torch.randint(0, 10, (3,))
    assert torch.allclose(_make(name, norm, model, 0.0)(x, y), x, atol=1e-7)


def test_passes_are_counted():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    out = create_attack("pgd", model, steps=7, eps=0.1).run(x, y, with_success=False)
    assert (out.forward, out.backward) == (35, 35)
