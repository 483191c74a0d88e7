"""evaluate(): the result contract, union/average/per-class arithmetic, threat checks and setup warnings."""
import warnings

import pytest
import torch
from torch import nn

from robustlab import evaluate
from robustlab.attacks import PGD, Attack, AttackOut
from robustlab.threat import ThreatViolation, make_threat
from tests.conftest import TinyCNN


def test_result_contract_and_arithmetic(mnist_cnn, mnist):
    x, y = mnist.x_test[:120], mnist.y_test[:120]
    r = evaluate(mnist_cnn, x, y, ["pgd:norm=linf,eps=0.1,steps=10", "pgd:norm=l2,eps=1.0,steps=10",
                                   "deepfool"], keep_records=True)
    for key in ("clean_accuracy", "attacks", "union_accuracy", "average_accuracy", "per_class", "n_samples",
                "confusion", "per_norm"):
        assert key in r
    assert r["n_samples"] == 120
    accs = {k: v["robust_accuracy"] for k, v in r["attacks"].items()}
    assert set(accs) == {"pgd-linf", "pgd-l2", "deepfool"}
    a = r["attacks"]["pgd-linf"]
    assert a["norm"] == "linf" and a["eps"] == 0.1 and a["passes"]["forward"] > 0
    assert all(0 <= v <= r["clean_accuracy"] for v in accs.values())
    rec = r["records"]
    rob = torch.tensor([rec["robust"][k] for k in accs]).all(0)
    assert r["union_accuracy"] == pytest.approx(rob.float().mean().item())
    assert r["union_accuracy"] <= min(accs.values())
    assert r["average_accuracy"] == pytest.approx(sum(accs.values()) / 3)
    n_per_class = sum(c["n"] for c in r["per_class"].values())
    assert n_per_class == 120
    weighted = sum(c["clean_accuracy"] * c["n"] for c in r["per_class"].values()) / 120
    assert weighted == pytest.approx(r["clean_accuracy"])
    clean_cm = torch.tensor(r["confusion"]["clean"])
    assert clean_cm.sum() == 120 and clean_cm.diag().sum() / 120 == pytest.approx(r["clean_accuracy"])
    pert = r["attacks"]["deepfool"]["perturbation"]
    assert pert["median_l2"] > 0 and pert["rho"] > 0 and pert["n_failed"] == 0


def test_dataloader_input_matches_tensors(mnist_cnn, mnist):
    x, y = mnist.x_test[:64], mnist.y_test[:64]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    a = evaluate(mnist_cnn, x, y, ["fgsm:eps=0.1"], batch_size=20)
    b = evaluate(mnist_cnn, loader, attacks=["fgsm:eps=0.1"])
    assert a["clean_accuracy"] == b["clean_accuracy"] and a["union_accuracy"] == b["union_accuracy"]


class _Cheater(Attack):
    """Returns points outside its own ball: the evaluator must refuse the number."""

    name = "cheater"

    def __init__(self, model):
        super().__init__(model)
        self.threat = make_threat("linf", 0.01)

    def _run(self, counter, x, y, target, gen):
        return AttackOut((x + 0.5).clamp(0, 1), None)


def test_evaluator_checks_the_threat_model(mnist_cnn, mnist):
    with pytest.raises(ThreatViolation, match="outside its linf ball"):
        evaluate(mnist_cnn, mnist.x_test[:20], mnist.y_test[:20], [_Cheater(mnist_cnn)])


class _EnvelopeCheater(Attack):
    """Pixel-AG-like: reports a per-element budget (0.3 on the top half, 0.05 elsewhere) but moves every pixel by
    0.3. Inside the scalar envelope, outside the budget it actually used."""

    name = "envelope-cheater"

    def __init__(self, model):
        super().__init__(model)
        self.threat = make_threat("linf", 0.3)  # the envelope

    def _run(self, counter, x, y, target, gen):
        budget = torch.full_like(x, 0.05)
        budget[..., : x.shape[-2] // 2, :] = 0.3
        x_adv = (x + 0.3 * torch.sign(torch.randn(x.shape, generator=gen))).clamp(0, 1)
        return AttackOut(x_adv, None, threat=make_threat("linf", budget))


def test_evaluator_checks_the_per_element_budget_the_attack_used(mnist_cnn, mnist):
    with pytest.raises(ThreatViolation, match="per-element budget"):
        evaluate(mnist_cnn, mnist.x_test[:20], mnist.y_test[:20], [_EnvelopeCheater(mnist_cnn)])


def test_pixel_ag_is_checked_against_its_budget_map(mnist_cnn, mnist):
    """The honest Pixel-AG passes the per-element check of its own CAM budget map."""
    from robustlab.attacks import create_attack

    atk = create_attack("pixel-ag", mnist_cnn, eps=0.3, eps_low=0.1, steps=3, step_size=0.1, cam_layer="body.8")
    out = atk.run(mnist.x_test[:8], mnist.y_test[:8])
    assert out.threat is not None and out.threat.eps.shape == mnist.x_test[:8].shape
    assert out.threat.contains(out.x_adv, mnist.x_test[:8]).all()
    r = evaluate(mnist_cnn, mnist.x_test[:20], mnist.y_test[:20], [atk], checks=False)
    assert r["attacks"]["pixel-ag"]["robust_accuracy"] <= r["clean_accuracy"]


def test_warns_on_train_mode_and_restores_it():
    torch.manual_seed(0)
    m = TinyCNN().train()
    with pytest.warns(RuntimeWarning, match="train mode"):
        evaluate(m, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), [PGD(m, eps=0.1, steps=2)])
    assert m.training


def test_warns_on_softmax_outputs():
    torch.manual_seed(0)
    m = nn.Sequential(TinyCNN(), nn.Softmax(dim=1)).eval()
    with pytest.warns(RuntimeWarning, match="probabilities"):
        evaluate(m, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), [PGD(m, eps=0.1, steps=2)])


def test_warns_on_zero_gradients():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN()

        def forward(self, x):
            return self.net(torch.round(x * 4) / 4 + (x - x.detach()) * 0)  # piecewise constant in x

    m = Masked().eval()
    with pytest.warns(RuntimeWarning, match="gradient is exactly zero"):
        evaluate(m, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), [PGD(m, eps=0.1, steps=2)])


def test_warns_on_random_forward():
    class Noisy(TinyCNN):
        def forward(self, x):
            return super().forward(x + 0.1 * torch.randn_like(x))

    m = Noisy().eval()
    with pytest.warns(RuntimeWarning, match="randomised"):
        evaluate(m, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), [PGD(m, eps=0.1, steps=2)])


def test_no_warning_on_a_clean_setup(mnist_cnn, mnist):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(mnist_cnn, mnist.x_test[:10], mnist.y_test[:10], ["fgsm:eps=0.1"])


def test_attack_bound_to_other_model_rejected(mnist_cnn, mnist):
    other = TinyCNN()
    with pytest.raises(ValueError, match="different model"):
        evaluate(mnist_cnn, mnist.x_test[:4], mnist.y_test[:4], [PGD(other, eps=0.1)])
