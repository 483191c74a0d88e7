"""Invariants every attack must satisfy, parametrised over the registry (a registered attack is tested).

For shapes and budgets drawn by hypothesis: x_adv within the ball and [0, 1]. On a trained model with real labels:
accuracy on x_adv never above clean accuracy, the loss never lower, and an unbounded budget drives accuracy to ~0.
Model mode and requires_grad restored (also when the attack raises); seeded runs repeat; parameters, gradients and
BatchNorm buffers untouched.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    "gaussian-noise": {"l2": {"repeats": 10}},
    "brendel-bethge": {"linf": {"steps": 10}, "l2": {"steps": 10}},
    "pixel-ag": {"linf": {"steps": 3, "cam_layer": "conv"}},
}
CLASSIFIER_ATTACKS = [n for n in ATTACKS.names() if getattr(ATTACKS.get(n), "task", "classification") == "classification"]
# Settings of an attack with their own code path, checked as attacks of their own ("name:option=value" specs)
VARIANTS = {
    "apgd-t:targeting=malt": {"linf": {"steps": 4, "n_targets": 2}, "l2": {"steps": 4, "n_targets": 2}},
    "autoattack:version=fast": {"linf": {"apgd_steps": 3, "malt_targets": 2}, "l2": {"apgd_steps": 3, "malt_targets": 2}},
    "apgd-ce:loss=pm": {"linf": {"steps": 5}, "l2": {"steps": 5}},
}
FAST.update(VARIANTS)
CASES = [(name, norm) for name in [*CLASSIFIER_ATTACKS, *VARIANTS] for norm in FAST.get(name, {})]


def _base(name: str) -> str:
    """The registry name of a case ("apgd-t:targeting=malt" -> "apgd-t")."""
    return name.partition(":")[0]


def test_every_registered_attack_has_a_case():  # detection attacks: tests/detection/test_attacks.py
    missing = [n for n in CLASSIFIER_ATTACKS if n not in FAST]
    assert not missing, f"add fast settings for {missing}"


def _make(name, norm, model, eps):
    kwargs = dict(FAST[name][norm])
    if _base(name) in ("cw", "critic", "ead", "salt-pepper", "gaussian-noise"):
        kwargs["eps"] = eps
    elif name == "pixel-ag":  # eps on CAM-important pixels, 7/8 of it elsewhere (PART's ratio)
        kwargs.update(eps=eps, eps_low=0.875 * eps)
    elif name == "deepfool":
        kwargs.update(norm=norm, eps=eps, num_classes=4)
    elif name == "brendel-bethge":  # a minimal attack of either norm
        kwargs.update(norm=norm, eps=eps)
    else:
        kwargs.update(norm=norm, eps=eps)
    return create_attack(name, model, **kwargs)


@pytest.mark.parametrize("name,norm", CASES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 5), c=st.sampled_from([1, 3]), hw=st.integers(6, 10), eps_unit=st.floats(0.0, 1.0),
       seed=st.integers(0, 1000))
def test_in_ball_and_in_box_for_any_shape_and_budget(name, norm, n, c, hw, eps_unit, seed):
    torch.manual_seed(seed)
    model = TinyCNN(c=c, k=10).eval()
    eps = eps_unit * {"linf": 0.3, "l2": 2.0, "l1": 8.0}[norm]
    x = torch.rand(n, c, hw, hw)
    y = torch.randint(0, 10, (n,))
    attack = _make(name, norm, model, eps)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert make_threat(norm, eps).contains(x_adv, x, tol=1e-5).all()


# Attacks that return their final iterate for every sample (the others keep x where they fail): these may move an
# already misclassified image anywhere in the ball, including back to the right class.
FINAL_ITERATE = ("fgsm", "pgd", "mma", "pixel-ag")
BUDGET = {"linf": 0.1, "l2": 1.0, "l1": 4.0}  # on the 8x8 digits: strong enough to fool part of the test images


def _predict(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name,norm", CASES)
def test_on_a_trained_model_accuracy_never_rises_and_the_loss_never_falls(name, norm, digits_tiny_cnn, digits):
    """On a trained model and real labels: adversarial accuracy <= clean accuracy (over every image, misclassified
    ones included), the mean cross-entropy does not fall, and attacks that keep x where they fail never turn a
    wrong prediction right."""
    model = digits_tiny_cnn
    x, y = digits.x_test[:64], digits.y_test[:64]
    eps = BUDGET[norm]
    x_adv = _make(name, norm, model, eps)(x, y)
    assert make_threat(norm, eps).contains(x_adv, x, tol=1e-5).all()
    clean, adv = _predict(model, x), _predict(model, x_adv)
    clean_ok, adv_ok = clean.argmax(1) == y, adv.argmax(1) == y
    assert clean_ok.float().mean() > 0.8  # the fixture is a trained model
    assert adv_ok.sum() <= clean_ok.sum()
    assert F.cross_entropy(adv, y) >= F.cross_entropy(clean, y) - 1e-4
    if _base(name) not in FINAL_ITERATE:
        assert not (adv_ok & ~clean_ok).any()


# Settings under which each attack can reach any point of the box (eps covering [0, 1]^d, or no budget for minimal
# attacks): accuracy must fall to ~0 on a trained model. FGSM takes one step, so only most images fall.
UNBOUNDED = {
    "fgsm": {"linf": {"eps": 1.0}, "l2": {"eps": 8.0}},
    "pgd": {"linf": {"eps": 1.0, "steps": 20}, "l2": {"eps": 8.0, "steps": 20}, "l1": {"eps": 64.0, "steps": 20}},
    "apgd-ce": {"linf": {"eps": 1.0, "steps": 20}, "l2": {"eps": 8.0, "steps": 20}},
    "apgd-dlr": {"linf": {"eps": 1.0, "steps": 20}, "l2": {"eps": 8.0, "steps": 20}},
    "apgd-t": {"linf": {"eps": 1.0, "steps": 20, "n_targets": 3}, "l2": {"eps": 8.0, "steps": 20, "n_targets": 3}},
    "fab": {"linf": {"steps": 50, "targeted": True, "n_targets": 9}, "l2": {"steps": 50}},
    "square": {"linf": {"eps": 1.0, "n_queries": 200}, "l2": {"eps": 8.0, "n_queries": 200}},
    "autoattack": {"linf": {"eps": 1.0, "apgd_steps": 10, "fab_steps": 10, "square_queries": 50, "n_targets": 3},
                   "l2": {"eps": 8.0, "apgd_steps": 10, "fab_steps": 10, "square_queries": 50, "n_targets": 3}},
    "mma": {"linf": {"eps": 1.0, "steps": 20, "k": 3}},
    "cw": {"l2": {"steps": 200, "binary_steps": 6}},
    "deepfool": {"l2": {"steps": 50}, "linf": {"steps": 50}},
    "critic": {"l2": {"steps": 100}},
    "ead": {"l1": {"steps": 100, "binary_steps": 4}},
    "salt-pepper": {"l1": {"steps": 200}},
    "gaussian-noise": {"l2": {"eps": 8.0, "repeats": 100}},
    "brendel-bethge": {"linf": {"steps": 100}, "l2": {"steps": 100}},
    "pixel-ag": {"linf": {"eps": 1.0, "eps_low": 1.0, "steps": 20, "step_size": 0.1, "cam_layer": "conv"}},
    "apgd-t:targeting=malt": {"linf": {"eps": 1.0, "steps": 20, "n_targets": 3},
                              "l2": {"eps": 8.0, "steps": 20, "n_targets": 3}},
    "autoattack:version=fast": {"linf": {"eps": 1.0, "apgd_steps": 10, "malt_targets": 3},
                                "l2": {"eps": 8.0, "apgd_steps": 10, "malt_targets": 3}},
    "apgd-ce:loss=pm": {"linf": {"eps": 1.0, "steps": 20}, "l2": {"eps": 8.0, "steps": 20}},
}


def test_every_attack_has_an_unbounded_case():
    assert [c for c in CASES if c[1] not in UNBOUNDED.get(c[0], {})] == []


@pytest.mark.parametrize("name,norm", CASES)
def test_unbounded_budget_reaches_zero_accuracy_on_a_trained_model(name, norm, digits_tiny_cnn, digits):
    model = digits_tiny_cnn
    x, y = digits.x_test[:64], digits.y_test[:64]
    kwargs = dict(UNBOUNDED[name][norm])
    if _base(name) in ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack", "fab", "deepfool",
                       "brendel-bethge"):
        kwargs["norm"] = norm
    if name == "deepfool":
        kwargs["num_classes"] = 10
    out = create_attack(name, model, **kwargs).run(x, y)
    pred = _predict(model, out.x_adv).argmax(1)
    acc = (pred == y).float().mean().item()
    assert acc <= (0.25 if name == "fgsm" else 0.02), acc
    # the success flags tell the truth on the images that were correct (unbounded FAB-T used to report success
    # without attacking at all)
    correct = _predict(model, x).argmax(1) == y
    assert torch.equal(out.success[correct], (pred != y)[correct])


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
