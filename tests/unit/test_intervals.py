"""The interval code of `robustlab repeat` / `compare-runs` against scipy's t interval and exact binomial values."""
import math

import pytest
from scipy import stats

from robustlab.analysis.intervals import NO_DIFFERENCE, clopper_pearson, paired_difference, sampling_error, t_interval


def test_t_interval_matches_scipy():
    values = [0.412, 0.438, 0.401, 0.455, 0.423]
    got = t_interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 5, scale=stats.sem(values))
    assert got["ci"] == pytest.approx([lo, hi], abs=1e-12)
    assert got["std"] == pytest.approx(stats.tstd(values), abs=1e-12)
    assert t_interval([0.5])["ci"] == [None, None]  # one run: no spread to speak of


def test_clopper_pearson_on_known_values():
    # the exact interval's textbook values (e.g. Clopper & Pearson 1934; Brown, Cai & DasGupta 2001)
    assert clopper_pearson(0, 10) == pytest.approx([0.0, 0.30850], abs=1e-5)
    assert clopper_pearson(5, 10) == pytest.approx([0.18709, 0.81291], abs=1e-5)
    assert clopper_pearson(10, 10) == pytest.approx([0.69150, 1.0], abs=1e-5)
    r = stats.binomtest(412, 1000).proportion_ci(0.95, method="exact")
    assert clopper_pearson(412, 1000) == pytest.approx([r.low, r.high], abs=1e-10)
    with pytest.raises(ValueError):
        clopper_pearson(11, 10)


def test_sampling_error_is_the_binomial_std():
    got = sampling_error([0.4, 0.5], 1000)
    assert got["binomial_std"] == pytest.approx(math.sqrt(0.45 * 0.55 / 1000))
    assert got["per_seed_ci"][0] == clopper_pearson(400, 1000)


def test_paired_difference_verdicts():
    a, b = [0.50, 0.52, 0.51], [0.40, 0.43, 0.41]
    assert paired_difference(a, b)["verdict"] == "A better"
    assert paired_difference(b, a)["verdict"] == "B better"
    assert paired_difference([0.5, 0.4, 0.6], [0.45, 0.5, 0.5])["verdict"] == NO_DIFFERENCE
    assert paired_difference([0.5], [0.4])["verdict"].startswith(NO_DIFFERENCE)
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.0967, abs=1e-3)


def _detector_result(clean_map, ap):
    return {"n_images": 200, "clean": {"map": clean_map, "ap": [0.8, 0.6]},
            "attacks": {"cwa": {"map": sum(ap) / 2, "ap": ap}}}


def test_repeats_of_a_detector_aggregate_map_and_per_class_evenness(tmp_path):
    """Detector results (mAP, per-class AP) aggregate without a binomial error (mAP is not a share of images), and
    compare-runs judges the per-class AP spread lower-is-better."""
    import json

    from robustlab.analysis.repeat import aggregate, compare_runs, metrics_of

    r = _detector_result(0.7, [0.5, 0.3])
    m = metrics_of(r)
    assert m["clean_map"] == 0.7 and m["attacks.cwa"] == 0.4 and m["attacks.cwa.ap_min"] == 0.3
    assert m["attacks.cwa.ap_std"] == pytest.approx(0.1)
    agg = aggregate({0: r, 1: _detector_result(0.72, [0.5, 0.35])})
    assert agg["n_images"] == 200 and agg["metrics"]["clean_map"]["sampling"] is None
    for name, spreads in (("even", [0.02, 0.03, 0.025]), ("uneven", [0.2, 0.22, 0.21])):  # A more even than B
        for s, d in enumerate(spreads):
            (tmp_path / name / f"seed-{s}").mkdir(parents=True)
            (tmp_path / name / f"seed-{s}" / "result.json").write_text(
                json.dumps(_detector_result(0.7, [0.4 + d, 0.4 - d])))
    cmp = compare_runs(tmp_path / "even", tmp_path / "uneven")
    spread = cmp["metrics"]["attacks.cwa.ap_std"]["difference"]
    assert spread["mean"] < 0 and spread["ci"][1] < 0 and spread["verdict"] == "A better"


def test_rho_is_a_metric_only_for_minimal_attacks_without_a_budget():
    """Under a budget rho averages over the images fooled within it (a different set per model: the fewer an attack
    fools, the smaller their perturbations), so compare-runs would read it as the paper's rho: left out there."""
    from robustlab.analysis.repeat import metrics_of

    def attack(eps, rho):
        return {"robust_accuracy": 0.0 if eps is None else 0.6, "eps": eps, "perturbation": {"rho": rho, "n_failed": 0}}

    result = {"clean_accuracy": 0.9, "n_samples": 200,
              "attacks": {"deepfool": attack(None, 0.2), "cw": attack(2.0, 0.1), "pgd": {"robust_accuracy": 0.5}}}
    m = metrics_of(result)
    assert m["attacks.deepfool.rho"] == 0.2 and "attacks.cw.rho" not in m
    assert m["attacks.cw"] == 0.6 and m["attacks.pgd"] == 0.5
