"""The multi-perturbation methods on mnist5k at CI scale (small CNN, the 4,000 training images, 3 epochs, the MNIST
budgets l_inf 0.3 / l_2 2.0 / l_1 10): every method beats standard training, single-norm training is weak on the
other norms, and the multi-norm methods beat the single-norm ones that collapse. Not asserted because it does not
hold at this scale: MNG-AC's union above Adv_inf's (measured 0.23 vs 0.28 here: at MNIST budgets the union is
bound by l_inf, which Adv_inf trains on every step and MNG-AC on a third). docs/results.md has the full comparison."""
import pytest

from robustlab import evaluate
from robustlab.data import load_dataset
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer

BUDGETS = dict(eps_linf=0.3, eps_l2=2.0, eps_l1=10.0)
# CI-sized training attacks: 2 steps (l_1: 3) and MSD 3 iterations (the docs' runs use 5 / 5 / 10 and MSD 20); SAT
# alone keeps 3 steps (l_1: 5), as its union at 2 falls to 0.135, under the asserted 0.15. Measured 2026-12-07 at
# these settings (unions; at 3 steps and 5 iterations): Adv_avg 0.245 (0.295), Adv_max 0.275 (0.345), MSD 0.215
# (0.265), SAT+AC 0.25 (0.27), MNG-AC 0.23 (0.265), SAT 0.195; the fixture takes about a third less CPU.
MULTI = dict(BUDGETS, steps_linf=2, steps_l2=2, steps_l1=3, step_size_linf=0.2, step_size_l2=1.25, step_size_l1=5.0,
             eps_ramp_epochs=1)
KWARGS = {
    "standard": {},
    "adv-inf": dict(eps=0.3, steps=2, step_size=0.2, eps_ramp_epochs=1),
    "adv-l2": dict(eps=2.0, steps=2, step_size=1.25, eps_ramp_epochs=1),
    "adv-l1": dict(eps=10.0, steps=3, step_size=5.0, eps_ramp_epochs=1),
    "trades-inf": dict(eps=0.3, steps=2, step_size=0.2, eps_ramp_epochs=1),
    **{m: MULTI for m in ("adv-avg", "adv-max", "sat-ac")},
    "sat": dict(BUDGETS, steps_linf=3, steps_l2=3, steps_l1=5, step_size_linf=0.15, step_size_l2=1.0, step_size_l1=3.0,
                eps_ramp_epochs=1),
    "msd": dict(BUDGETS, eps_ramp_epochs=1, msd_steps=3, msd_step_size_linf=0.15, msd_step_size_l2=1.0,
                msd_step_size_l1=5.0),  # MSD has no per-norm PGD steps of its own
    "mng-ac": dict(MULTI, generator_lr=0.05, lookahead_lr=0.05),
}
# PGD-20 for l_inf and l_2; SLIDE with saturated pixels masked (foolbox's SparseL1Descent rule, the stronger one here)
PANEL = ["pgd:norm=linf,eps=0.3,steps=20,step_size=0.0375", "pgd:norm=l2,eps=2.0,steps=20,step_size=0.25",
         "pgd:norm=l1,eps=10,steps=20,step_size=1.0,mask_saturated=true"]
N_EVAL = 200


# session scope: under xdist other modules' tests may run between this module's on the same worker, and a
# module-scoped fixture would then be built twice (it takes minutes)
@pytest.fixture(scope="session")
def multi_norm_trained(tmp_path_factory):
    """{method: (final model, evaluation on the PGD/SLIDE panel)}."""
    data = load_dataset("mnist5k")
    out = {}
    for method, kw in KWARGS.items():
        cfg = TrainConfig(name=method, method=method, method_kwargs=kw, dataset="mnist5k", model="small-cnn",
                          model_kwargs={"width": 8, "hidden": 64}, epochs=3, batch_size=64, optimizer="adam", lr=2e-3,
                          weight_decay=0.0, schedule="cosine", eval_every=100, eval_samples=50,
                          eval_attack=PANEL[0], select_best=False, out_dir=str(tmp_path_factory.mktemp(method)),
                          seed=0, progress=False)  # the final weights are evaluated: no validation split
        t = Trainer(cfg, data=data)
        t.fit()
        model = t.model.eval()
        out[method] = (model, evaluate(model, data.x_test[:N_EVAL], data.y_test[:N_EVAL], PANEL, checks=False))
    return out


@pytest.fixture(scope="session")
def multi_norm_results(multi_norm_trained):
    return {m: r for m, (_, r) in multi_norm_trained.items()}


def _summary(results):
    return {m: (round(r["clean_accuracy"], 3), {k: round(v, 3) for k, v in r["per_norm"].items()},
                round(r["union_accuracy"], 3)) for m, r in results.items()}


def test_metrics_are_consistent(multi_norm_results):
    for r in multi_norm_results.values():
        accs = {name: a["robust_accuracy"] for name, a in r["attacks"].items()}
        assert r["union_accuracy"] <= min(r["per_norm"].values()) + 1e-9
        assert all(v <= r["clean_accuracy"] + 1e-9 for v in accs.values())
        assert abs(r["norm_average_accuracy"] - sum(r["per_norm"].values()) / 3) < 1e-9


@pytest.mark.parametrize("method,norm", [("adv-inf", "linf"), ("adv-l2", "l2"), ("adv-l1", "l1"), ("trades-inf", "linf")])
def test_single_norm_training_beats_standard_on_its_norm(multi_norm_results, method, norm):
    r, std = multi_norm_results[method], multi_norm_results["standard"]
    assert r["per_norm"][norm] >= std["per_norm"][norm] + 0.15, _summary(multi_norm_results)


def test_single_norm_training_is_weak_on_another_norm(multi_norm_results):
    # l_1 and l_2 training leave l_inf at eps 0.3 (nearly) unprotected
    for method in ("adv-l1", "adv-l2"):
        assert multi_norm_results[method]["per_norm"]["linf"] <= 0.1, _summary(multi_norm_results)


@pytest.mark.parametrize("method", ["adv-avg", "adv-max", "msd", "sat", "sat-ac", "mng-ac"])
def test_multi_norm_training_protects_every_norm(multi_norm_results, method):
    res = multi_norm_results
    r = res[method]
    assert r["union_accuracy"] >= res["standard"]["union_accuracy"] + 0.15, _summary(res)
    # union beats every single-norm method that collapses on a norm it was not trained for
    assert r["union_accuracy"] > max(res["adv-l1"]["union_accuracy"], res["adv-l2"]["union_accuracy"]) + 0.1, _summary(res)


def test_slide_is_no_weaker_than_foolbox_sparse_l1_descent(multi_norm_trained):
    """robustlab's evaluation SLIDE (saturated pixels masked, the default) against foolbox 3's SparseL1Descent on a
    multi-norm-trained model at the MNIST l_1 budget: robustlab's robust accuracy is never more than 1 point above
    the reference's. (Without the mask, on MNIST's many pixels at exactly 0 or 1, SLIDE wasted its sparse steps on
    pixels that cannot move and overstated l_1 robustness by several points.)"""
    import foolbox as fb
    import torch

    from robustlab.attacks import create_attack

    model, _ = multi_norm_trained["mng-ac"]
    data = load_dataset("mnist5k")
    x, y = data.x_test[:N_EVAL], data.y_test[:N_EVAL]
    eps, steps, step = 10.0, 100, 10.0 * 255 / 2000  # the multi-norm panel's SLIDE-100
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    ours = create_attack("pgd", model, norm="l1", eps=eps, steps=steps, step_size=step)(x, y)
    with torch.no_grad():
        acc = (clean & (model(ours).argmax(1) == y)).float().mean().item()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    ref = []
    for random_start in (False, True):
        _, adv, _ = fb.attacks.SparseL1DescentAttack(quantile=0.99, abs_stepsize=step, steps=steps,
                                                     random_start=random_start)(fmodel, x, y, epsilons=eps)
        with torch.no_grad():
            ref.append((clean & (model(adv).argmax(1) == y)).float().mean().item())
    assert 0.2 < min(ref) < 0.9, ("the model should be partly robust at l_1 10, or the comparison says nothing", ref)
    assert acc <= min(ref) + 0.01, (acc, ref)
