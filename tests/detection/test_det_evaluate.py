"""Detector evaluation checks what it reports (issue 29, items 2-3): every adversarial image against its attack's
threat model (the l_inf ball in pixel units and the [0, 255] box; the box alone for unbounded DAG), mAP under
every registered detection attack no higher than clean, and the attacks' passes, seconds, |delta| and statistics in
the result and the printed table."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from robustlab.attacks.spec import create_attack
from robustlab.detection.attacks import DetPGD, detection_attacks
from robustlab.detection.evaluate import evaluate_detector
from robustlab.detection.report import ap_table
from robustlab.registry import ATTACKS
from robustlab.threat import ThreatViolation
from robustlab.types import AttackOut

N = 24
SHORT = {"det-pgd": "det-pgd:objective=cls,steps=3", "det-fgsm": "det-fgsm:objective=reg", "owa": "owa:steps=3",
         "cwa": "cwa:steps=3", "mda": "mda:steps=3", "dag": "dag:max_iter=20"}


def test_every_registered_detection_attack_is_covered():
    registered = {n for n in ATTACKS.names() if getattr(ATTACKS.get(n), "task", "classification") == "detection"}
    assert registered == set(SHORT)


@pytest.fixture(scope="module")
def result(trained_std_detector):
    model, data, _ = trained_std_detector
    return evaluate_detector(model, data.test, N, batch_size=8, attacks=detection_attacks(list(SHORT.values()), model))


def test_every_attack_stays_in_its_threat_and_lowers_map(result):
    clean = result["clean"]["map"]
    assert clean > 0.1
    for name, a in result["attacks"].items():
        assert a["map"] <= clean + 1e-9, (name, a["map"], clean)
        if a["eps"] is not None:  # checked per batch by the evaluator; the record agrees
            assert a["perturbation"]["max_abs"] <= a["eps"] + 1e-4, (name, a["perturbation"])
        assert 0 <= a["perturbation"]["mean_abs"] <= a["perturbation"]["max_abs"]
        assert a["passes"]["forward"] >= N and a["passes"]["per_image"] > 0 and a["seconds"] > 0


def test_the_attacks_statistics(result):
    attacks = result["attacks"]
    dag = attacks[SHORT["dag"]]
    assert dag["eps"] is None and dag["norm"] is None  # unbounded: box only, and the JSON says so
    assert 0 <= dag["stats"]["n_fooled"] <= N and 0 <= dag["stats"]["fooled_fraction"] <= 1
    mda = attacks[SHORT["mda"]]["stats"]
    assert mda["n_chose_cls"] + mda["n_chose_reg"] == N
    for name in ("owa", "cwa"):
        assert 0 <= attacks[SHORT[name]]["stats"]["clipped_fraction"] <= 1
    assert "clipped_fraction" not in attacks[SHORT["det-pgd"]]["stats"]  # A_cls clips nothing
    table = ap_table(result)
    assert "passes/img" in table and "unbounded ([0, 255] box only)" in table and "n_chose_cls" in table


class Overshoots(DetPGD):
    """A broken attack: steps twice its budget out of the ball (and past the box on bright pixels)."""

    name = "overshoots"

    def _run(self, counter, x, y, target, gen):
        return AttackOut((x + 2 * self.eps).clamp(0, 255), None)


def test_an_attack_outside_its_ball_fails_loudly(trained_std_detector):
    model, data, _ = trained_std_detector
    with pytest.raises(ThreatViolation, match="'bad'.*outside its linf ball"):
        evaluate_detector(model, data.test, 8, attacks={"bad": Overshoots(model, eps=4.0)})


def test_dag_is_box_only_without_eps_and_bounded_with_it(trained_std_detector):
    model, _, _ = trained_std_detector
    assert create_attack("dag", model).threat is None
    bounded = create_attack("dag:eps=4", model)
    assert bounded.threat is not None and bounded.describe()["eps"] == 4.0
    x = torch.rand(2, 3, 96, 96) * 255
    assert bounded.threat.contains((x + 4).clamp(0, 255), x).all()


class Quantise(nn.Module):
    """Rounds the (mean-subtracted) image to steps of 64 grey levels: zero gradient everywhere."""

    def forward(self, x):
        return torch.round(x / 64) * 64


def test_integrity_flags_a_quantising_detector_and_not_an_honest_one(trained_std_detector):
    """Item 4: an honest detector raises no alarm; one that quantises its input does (exactly-zero gradients, mAP
    kept under an unbounded attack), in the JSON, as warnings and in the table."""
    from robustlab.engine.tasks import Detection
    from robustlab.errors import IntegrityWarning

    model, data, _ = trained_std_detector
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrityWarning)
        honest = Detection().evaluate(model, data.test, ["cwa:steps=2"], 16)["integrity"]
    assert honest["ok"] and honest["unbounded"]["map"] <= 0.25 * honest["unbounded"]["clean_map"], honest
    quantising = copy.deepcopy(model)
    quantising.backbone = nn.Sequential(Quantise(), quantising.backbone)
    with pytest.warns(IntegrityWarning):
        r = Detection().evaluate(quantising, data.test, ["cwa:steps=2"], 16)
    integ = r["integrity"]
    assert not integ["ok"] and integ["zero_gradient"]["entries"] > 0.9
    assert any("exactly zero" in f for f in integ["flags"]) and any("unbounded" in f for f in integ["flags"])
    assert "DO NOT TRUST" in ap_table(r)


def test_a_panel_whose_map_rises_with_eps_is_flagged():
    from robustlab.detection.integrity import finish_detector_integrity

    probe = {"flags": []}
    attacks = {"a": {"attack": "cwa", "norm": "linf", "eps": 4.0, "map": 0.1},
               "b": {"attack": "cwa", "norm": "linf", "eps": 8.0, "map": 0.3}}
    with pytest.warns(Warning, match="mAP rises"):
        assert not finish_detector_integrity(probe, attacks)["ok"]
