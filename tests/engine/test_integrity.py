"""The integrity checks of `evaluate` (robustlab.engine.integrity): a model that masks its gradients is flagged,
honest trained models are not."""
import warnings

import pytest
import torch
from torch import nn

from robustlab import evaluate
from robustlab.errors import IntegrityWarning

PGD = "pgd:norm=linf,eps=0.3,steps=40,step_size=0.01"


class Quantising(nn.Module):
    """Rounds the upper three quarters of the image to 8 grey levels before the classifier: the gradient there is
    exactly zero, so gradient attacks only move the bottom rows, while a 0.3 budget easily crosses the 1/8 levels."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x):
        h = 3 * x.shape[-2] // 4
        q = torch.round(x[..., :h, :] * 8) / 8
        return self.base(torch.cat([q, x[..., h:, :]], -2))


class Softmax(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x):
        return torch.softmax(self.base(x), 1)


def _evaluate(model, x, y, attacks):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = evaluate(model, x, y, attacks, progress=False)
    return r, [w for w in caught if issubclass(w.category, IntegrityWarning)]


@pytest.fixture(scope="module")
def quantised_result(mnist_cnn, mnist):
    return _evaluate(Quantising(mnist_cnn).eval(), mnist.x_test[:200], mnist.y_test[:200], [PGD])


def test_partial_quantisation_is_flagged(quantised_result, mnist_cnn, mnist):
    r, caught = quantised_result
    integ = r["integrity"]
    # the white-box number looks robust; the black-box attack shows it is not
    assert r["attacks"]["pgd"]["robust_accuracy"] > 0.3
    assert not integ["ok"] and caught
    assert integ["zero_gradient"]["entries"] > 0.5
    bb = integ["per_norm"]["linf"]["black_box"]
    assert bb["broken"] > 0.5 * bb["candidates"]
    assert any("Square" in f for f in integ["flags"]) and any("exactly zero" in f for f in integ["flags"])
    assert "DO NOT TRUST" in __import__("robustlab.reports.markdown", fromlist=["eval_table"]).eval_table(r)


def test_probability_outputs_are_flagged(mnist_cnn, mnist):
    r, caught = _evaluate(Softmax(mnist_cnn).eval(), mnist.x_test[:100], mnist.y_test[:100], [PGD])
    assert r["integrity"]["output_probabilities"] and not r["integrity"]["ok"]
    assert any("probabilities" in str(w.message) for w in caught)


@pytest.mark.parametrize("which", ["standard", "adversarially trained"])
def test_honest_models_raise_no_false_alarm(which, mnist_cnn, mnist, digits_mlp_at, digits):
    if which == "standard":
        model, x, y, attacks = mnist_cnn, mnist.x_test[:200], mnist.y_test[:200], [PGD, "pgd:norm=l2,eps=2.0,steps=20"]
    else:
        model, x, y = digits_mlp_at, digits.x_test[:200], digits.y_test[:200]
        attacks = ["pgd:norm=linf,eps=0.1,steps=40,step_size=0.01", "apgd-ce:norm=linf,eps=0.1,steps=20"]
    r, caught = _evaluate(model, x, y, attacks)
    integ = r["integrity"]
    assert integ["ok"], integ["flags"]
    assert not caught
    for norm, entry in integ["per_norm"].items():
        assert entry["unbounded_accuracy"] <= 0.02
        acc = entry["eps_curve"]["accuracy"]
        assert all(b <= a + 0.01 for a, b in zip(acc, acc[1:])), (norm, acc)


def test_a_panel_whose_accuracy_rises_with_eps_is_flagged(mnist_cnn, mnist):
    """Across the panel: the same attack at a larger budget must not leave more images robust (here a deliberately
    broken PGD: a step size of 0 at the larger budget, so it never moves from its random start)."""
    r, _ = _evaluate(mnist_cnn, mnist.x_test[:100], mnist.y_test[:100],
                     ["pgd:norm=linf,eps=0.1,steps=10", "pgd:norm=linf,eps=0.2,steps=10,step_size=0.0"])
    assert any("rises from" in f for f in r["integrity"]["flags"]), r["integrity"]["flags"]


def test_integrity_can_be_turned_off_and_is_off_in_training_evaluations(mnist_cnn, mnist):
    r = evaluate(mnist_cnn, mnist.x_test[:20], mnist.y_test[:20], ["fgsm:eps=0.1"], integrity=False)
    assert "integrity" not in r
    r = evaluate(mnist_cnn, mnist.x_test[:20], mnist.y_test[:20], ["fgsm:eps=0.1"], checks=False)
    assert "integrity" not in r


def test_the_probe_costs_a_share_of_the_panel():
    """quick: the probe's passes within a quarter of the panel's (down to MIN_PLAN); an AutoAttack-sized panel
    affords the full probe; full: always FULL_PLAN."""
    from robustlab.engine.integrity import FULL_PLAN, MIN_PLAN, PROBE_SHARE, probe_plan

    pgd10 = 100 * 22  # PGD-10 on 100 images
    for panel, norms in ((pgd10, 1), (20 * pgd10, 2), (10**9, 1)):
        plan = probe_plan("quick", panel, norms)
        assert plan.passes(norms) <= max(PROBE_SHARE * panel, MIN_PLAN.passes(norms)), (panel, plan)
    assert probe_plan("quick", 100 * 3000, 1, 3000) == FULL_PLAN  # AutoAttack: ~3,000 passes per attacked image
    assert probe_plan("full", pgd10, 1) == FULL_PLAN
    assert probe_plan("quick", 0, 1) == MIN_PLAN


def test_integrity_modes_in_evaluate(mnist_cnn, mnist):
    """The result names the mode and the plan and times the probe; "off" by name warns; a bad mode is refused."""
    from robustlab.engine.integrity import FULL_PLAN
    from robustlab.errors import InputError

    x, y = mnist.x_test[:50], mnist.y_test[:50]
    quick = evaluate(mnist_cnn, x, y, ["pgd:eps=0.1,steps=5"], progress=False)["integrity"]
    full = evaluate(mnist_cnn, x, y, ["pgd:eps=0.1,steps=5"], progress=False, integrity="full")["integrity"]
    assert quick["mode"] == "quick" and quick["plan"]["n_probe"] < FULL_PLAN.n_probe and quick["seconds"] > 0
    assert full["mode"] == "full" and full["plan"] == FULL_PLAN.__dict__ and full["seconds"] > quick["seconds"]
    with pytest.warns(RuntimeWarning, match="gradient masking goes unchecked"):
        r = evaluate(mnist_cnn, x, y, ["pgd:eps=0.1,steps=5"], progress=False, integrity="off")
    assert "integrity" not in r
    with pytest.raises(InputError, match="integrity"):
        evaluate(mnist_cnn, x, y, ["pgd:eps=0.1,steps=5"], progress=False, integrity="fast")


def test_a_log_hears_from_a_long_job_every_interval(monkeypatch, capsys):
    """Off a terminal, progress prints at least every ROBUSTLAB_PROGRESS_SECONDS even when the job itself reports
    nothing (one long attack inside a batch)."""
    import time

    from robustlab.utils import progress_bar

    monkeypatch.setenv("ROBUSTLAB_PROGRESS_SECONDS", "0.2")
    with progress_bar(total=10, desc="evaluate") as bar:
        bar.set_postfix(attack="apgd-t")
        time.sleep(1.1)  # no update at all
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate:")]
    assert len(lines) >= 4 and "apgd-t" in lines[0], lines
