"""WPGD on mnist5k at CI scale (small CNN, 3 epochs, l_inf eps 0.2): the accuracy gap between a PGD-trained and a
CE-trained model correlates negatively with the visual metric of a linear CE model (the seed's Table 1 on MNIST),
WPGD trains a model more robust than standard training, and with p = 2.5 (the seed's Fig. 11 setting) its
adversarial mistakes should land on nearer classes than PGD-AT's (lower weighted robustness score S): measured here,
not asserted, since on one seed the S margin is small (it changes sign on half the test split) and at p = 10 the
direction does not hold (S rises with the adversarial error); docs/results.md has the measured numbers."""
import pytest

from robustlab import evaluate
from robustlab.analysis.wpgd import accuracy_gap, weighted_score
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer
from robustlab.label_metrics.visual import visual_metric

EPS = 0.2
N_EVAL = 1000  # the whole mnist5k test split, as in docs/results.md (on the first 500, S's sign flips)


def _train(method, kw, out, model="small-cnn", model_kwargs=None, epochs=3):
    cfg = TrainConfig(name=method, method=method, method_kwargs=kw, dataset="mnist5k", model=model,
                      model_kwargs=model_kwargs if model_kwargs is not None else {"width": 8, "hidden": 64},
                      epochs=epochs, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, schedule="cosine",
                      eval_every=100, eval_samples=50, eval_attack=f"pgd:norm=linf,eps={EPS},steps=10",
                      select_best=False, out_dir=str(out), seed=0, progress=False)  # the final weights are used
    t = Trainer(cfg)
    t.fit()
    return t.model.eval(), t.data


@pytest.fixture(scope="session")  # session: built once per xdist worker even if modules interleave
def wpgd_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("wpgd")
    linear, data = _train("standard", {}, out / "lin", model="mlp", model_kwargs={"depth": 0}, epochs=5)
    x, y = data.x_test[:N_EVAL], data.y_test[:N_EVAL]
    metric, _ = visual_metric(linear, x, y, 10, method="linear_exact")
    pgd_kw = {"eps": EPS, "steps": 5, "step_size": 2.5 * EPS / 5, "eps_ramp_epochs": 1}
    models = {"ce": _train("standard", {}, out / "ce")[0], "pgd": _train("pgd-at", pgd_kw, out / "pgd")[0],
              "wpgd-p2.5": _train("wpgd", {**pgd_kw, "metric": metric.tolist(), "p": 2.5}, out / "wpgd")[0]}
    return models, metric, x, y


def test_accuracy_gap_correlates_negatively_with_the_visual_metric(wpgd_models, tmp_path):
    models, metric, x, y = wpgd_models
    r = accuracy_gap(models["ce"], models["pgd"], x, y, metric, tmp_path / "gap.png")
    assert r["pearson"] < 0 and r["spearman"] < 0, r


def test_wpgd_beats_standard_training_and_its_weighted_score_is_measured(wpgd_models, tmp_path):
    """S's sign is not asserted: on one seed its margin is small and it flips on half the test split, so one run is
    no evidence either way; `robustlab repeat` over seeds decides it (docs/results.md, claims over seeds). What is
    asserted: WPGD's robustness over standard training, and S computed as defined (reference difference, range)."""
    models, metric, x, y = wpgd_models
    attack = f"pgd:norm=linf,eps={EPS},steps=20,step_size={2.5 * EPS / 20}"
    rob = {k: evaluate(m, x, y, [attack], checks=False)["union_accuracy"] for k, m in models.items()}
    assert rob["wpgd-p2.5"] >= rob["ce"] + 0.2, rob
    s = weighted_score({"pgd": models["pgd"], "wpgd-p2.5": models["wpgd-p2.5"]}, x, y, metric, tmp_path / "s.png",
                       eps=EPS, steps=20)
    m = s["models"]
    assert m["wpgd-p2.5"]["S_minus_reference"] == pytest.approx(m["wpgd-p2.5"]["S"] - m["pgd"]["S"])
    k, top = metric.shape[0], float(metric.max())
    for v in m.values():  # S = sum_ij C_ij M_ij, M row-normalised: 0 < S <= k * error * max C (C_ii = 0)
        assert v["adversarial_error"] > 0.05 and 0 < v["S"] <= k * v["adversarial_error"] * top + 1e-9, m
