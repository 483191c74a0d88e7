"""The adversary critic defense and the baselines of its Table 1 (critic.md 4, 6, 7, 9, 11)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.critic import find_targets, high_confidence_attack
from robustlab.data import load_dataset
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer
from robustlab.methods import Batch, StepContext, create_method
from robustlab.methods.critic import Critic, RunningConfidence, critic_logit, gradient_penalty
from robustlab.models.classifiers import create_model


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def _subset(data, n_train, n_test=None):
    import copy

    d = copy.copy(data)
    d.x_train, d.y_train = data.x_train[:n_train], data.y_train[:n_train]
    if n_test is not None:
        d.x_test, d.y_test = data.x_test[:n_test], data.y_test[:n_test]
    return d


def _cfg(method, tmp_path, epochs, hidden=128, **kw):
    critic = method == "critic"
    base = dict(name=method, method=method, model="mlp", model_kwargs={"hidden": hidden, "init": "he"},
                epochs=epochs, batch_size=100, optimizer="adam", lr=5e-4 if critic else 1e-3,
                betas=(0.5, 0.999) if critic else (0.9, 0.999), weight_decay=0.0,
                schedule="constant" if critic else "exponential", gamma=0.95, eval_every=1000, eval_samples=50,
                eval_attack="deepfool:steps=5", out_dir=str(tmp_path), seed=0, select_best=False)
    base.update(kw)
    return TrainConfig(**base)


# -- parts ---------------------------------------------------------------------------------------
def test_running_confidence_first_update_absent_classes_and_decay():
    m = RunningConfidence(4)
    m.update(torch.tensor([0.9, 0.7, 0.6]), torch.tensor([0, 0, 2]))
    v = m.value
    assert v[0].item() == pytest.approx(0.8) and v[2].item() == pytest.approx(0.6)
    assert v[1].item() == pytest.approx(0.7) and v[3].item() == pytest.approx(0.7)  # unseen: mean of the seen
    m.update(torch.tensor([0.5]), torch.tensor([2]))
    v2 = m.value
    # zero-debiased EMA with decay 0.5: (0.25 * 0.6 + 0.5 * 0.5) / 0.75
    assert v2[2].item() == pytest.approx((0.25 * 0.6 + 0.5 * 0.5) / 0.75)
    assert v2[0].item() == pytest.approx(0.8)  # absent from this batch: unchanged


def test_critic_outputs_noise_and_gradient_penalty_of_a_linear_critic():
    torch.manual_seed(0)
    c = Critic(16, 10, hidden=32)
    x = torch.rand(5, 1, 4, 4)
    a, b = c(x), c(x)
    assert a.shape == (5, 10) and not torch.allclose(a, b)
    c.noise = False
    assert torch.equal(c(x), c(x))

    class LinearCritic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x, generator=None):
            return self.fc(x.flatten(1))

    lin = LinearCritic()
    cls = torch.tensor([0, 1, 2, 1, 0])
    want = ((lin.fc.weight[cls].norm(dim=1) - 1) ** 2).mean()
    assert torch.allclose(gradient_penalty(lin, x, cls), want)
    assert gradient_penalty(lin, x, cls).requires_grad  # it trains the critic


def test_margin_regularizer_vanishes_when_the_logits_do_not_depend_on_x():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(10))

        def forward(self, x):
            return self.b.expand(x.shape[0], 10) + 0 * x.flatten(1).sum(1, keepdim=True)

    m = create_method("margin", lam=0.1)
    x = torch.rand(4, 1, 4, 4).requires_grad_(True)
    model = Constant()
    reg = m.regularizer(model(x), x, torch.tensor([0, 1, 2, 3]))
    assert torch.allclose(reg, torch.zeros(4))
    # and it is the squared norm of the logit-gradient difference for a linear model
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    y = torch.tensor([0, 1, 2, 0])
    reg = m.regularizer(lin(x), x, y)
    W = lin[1].weight
    want = torch.stack([max(((W[y[i]] - W[k]) ** 2).sum() for k in range(3)) for i in range(4)])
    assert torch.allclose(reg, want)


def test_vat_and_fgsm_at_perturbation_sizes():
    torch.manual_seed(0)
    model = create_model("mlp", hidden=32)
    x = 0.5 + 0.01 * torch.randn(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    ctx = StepContext(0, 0, torch.Generator().manual_seed(0))
    r = create_method("vat", eps=2.0).perturbation(model, x, ctx.generator)
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((6,), 2.0), atol=1e-5)
    fgsm = create_method("fgsm-at", eps=0.1)
    x_adv = fgsm._pgd(model, x, y, ctx, step_size=0.1)
    assert torch.allclose((x_adv - x).abs().flatten(1).amax(1), torch.full((6,), 0.1), atol=1e-6)


def test_bad_settings_give_clear_errors():
    for key in ("lam", "lam_rec", "lam_grad"):
        with pytest.raises(ValueError, match=key):
            create_method("critic", **{key: -0.1})
    with pytest.raises(ValueError, match="target selection"):
        create_method("critic", target="nearest")
    with pytest.raises(ValueError, match="lam"):
        create_method("margin", lam=-1.0)


# -- training ------------------------------------------------------------------------------------
def test_one_pretraining_and_one_training_epoch_run_with_finite_losses(mnist, tmp_path):
    cfg = _cfg("critic", tmp_path, epochs=2, method_kwargs={"critic_hidden": 128})
    t = Trainer(cfg, data=_subset(mnist, 1000))
    hist = t.fit()["history"]
    assert "train_critic_loss" not in hist[0]  # epoch 1 is pretraining: no critic yet
    row = hist[1]
    for k in ("train_ce", "train_gan", "train_cycle", "train_critic_loss"):
        assert math.isfinite(row[k]), k
    assert row["train_critic_accuracy"] > 0.5
    assert row["train_attack_success"] > 0.5


def test_gradients_flow_from_the_critic_term_through_the_attack_into_the_classifier():
    torch.manual_seed(0)
    model = create_model("mlp", hidden=32, input_size=8).double()
    critic = Critic(64, 10, hidden=16).double()
    critic.noise = False
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    t = find_targets(model, x)
    c = torch.full((6,), 0.9, dtype=torch.float64)
    for create_graph in (True, False):
        model.zero_grad()
        x_adv = high_confidence_attack(model, x, t, c, steps=3, create_graph=create_graph)
        if not create_graph:
            assert not x_adv.requires_grad  # a constant: the critic term alone could not train the classifier
            continue
        gan = F.binary_cross_entropy_with_logits(critic_logit(critic, x_adv, t), torch.ones(6, dtype=torch.float64))
        gan.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() == 2)


EPOCHS_CRITIC = 5


def test_the_critic_learns_to_separate_natural_from_adversarial_images(mnist):
    """A fixed (standard-trained) classifier; only the critic trains on natural vs A_f images."""
    torch.manual_seed(0)
    model = create_model("mlp", hidden=128)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = mnist.x_train[:2000], mnist.y_train[:2000]
    for _ in range(2):
        for i in range(0, 2000, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(False)

    def adversarial(xb):
        t = find_targets(model, xb)
        return high_confidence_attack(model, xb, t, torch.full((xb.shape[0],), 0.9), steps=5,
                                      create_graph=False).clamp(0, 1), t

    critic = Critic(784, 10, hidden=256)
    copt = torch.optim.Adam(critic.parameters(), 1e-3, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(0)
    adv = [adversarial(x[i:i + 100]) for i in range(0, 1800, 100)]  # the classifier is fixed: attack once
    for _ in range(EPOCHS_CRITIC):
        for i in range(0, 1800, 100):
            xb, yb = x[i:i + 100], y[i:i + 100]
            xa, ta = adv[i // 100]
            loss = (F.binary_cross_entropy_with_logits(critic_logit(critic, xb, yb, gen), torch.ones(100))
                    + F.binary_cross_entropy_with_logits(critic_logit(critic, xa, ta, gen), torch.zeros(100))
                    + 10 * (gradient_penalty(critic, xb, yb, gen) + gradient_penalty(critic, xa, ta, gen)))
            copt.zero_grad()
            loss.backward()
            copt.step()
    xh, yh = mnist.x_test[:200], mnist.y_test[:200]
    xa, ta = adversarial(xh)
    with torch.no_grad():
        acc = 0.5 * ((critic_logit(critic, xh, yh, gen) > 0).float().mean()
                     + (critic_logit(critic, xa, ta, gen) <= 0).float().mean()).item()
    assert acc > 0.75, acc


def test_resume_restores_the_critic_its_optimiser_and_the_running_mean(mnist, tmp_path):
    data = _subset(mnist, 300)
    kw = dict(method_kwargs={"critic_hidden": 32, "attack_steps": 2}, hidden=32)
    full = Trainer(_cfg("critic", tmp_path / "a", epochs=3, **kw), data=data)
    full.fit()
    part = Trainer(_cfg("critic", tmp_path / "b", epochs=3, **kw), data=data)
    with pytest.raises(KeyboardInterrupt):
        part.fit(stop_at_step=7)  # inside the second training epoch (3 steps per epoch)
    resumed = Trainer(_cfg("critic", tmp_path / "b", epochs=3, **kw), data=data)
    resumed.fit(resume=True)
    # the run was interrupted mid-epoch: it resumes from the end of the last finished epoch, bit-exactly
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(full.method.critic.state_dict().items(), resumed.method.critic.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(full.method.confidence.value, resumed.method.confidence.value)


def test_the_critic_needs_one_process(mnist):
    m = create_method("critic")

    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self):  # noqa: D107  (no process group needed to test the guard)
            nn.Module.__init__(self)

    with pytest.raises(ValueError, match="one process"):
        m.train_step(FakeDDP(), Batch(mnist.x_train[:2], mnist.y_train[:2]), None,
                     StepContext(1, 0, torch.Generator()), lambda loss: None)


@pytest.mark.slow
def test_critic_is_more_robust_than_standard_training_under_deepfool_and_cw(mnist, tmp_path):
    """CI scale (2,000 images, MLP 3x256, 1 + 5 epochs): the critic defense's rho (mean ||r|| / ||x||) under
    DeepFool and C&W exceeds standard training's by a clear margin (measured 0.136 vs 0.096 and 0.143 vs 0.101).
    Against FGSM-AT the seed's ordering needs the quick scale of docs/results.md (MLP 3x1200, 4,000 images,
    20 epochs, about 25 minutes), where it was measured with the commands given there."""
    from robustlab import evaluate

    data = _subset(mnist, 2000)
    x, y = mnist.x_test[:100], mnist.y_test[:100]
    rho = {}
    for method, kw in (("standard", {}), ("critic", {"critic_hidden": 256})):
        t = Trainer(_cfg(method, tmp_path / method, epochs=6, hidden=256, method_kwargs=kw), data=data)
        t.fit()
        model = t.model.eval()
        df = evaluate(model, x, y, ["deepfool:steps=100,max_step=0.1,project=true"], checks=False)
        cw = evaluate(model, x[:50], y[:50], ["cw:steps=500,binary_steps=6"], checks=False)
        assert df["clean_accuracy"] > 0.9, (method, df["clean_accuracy"])
        rho[method] = (df["attacks"]["deepfool"]["perturbation"]["rho"], cw["attacks"]["cw"]["perturbation"]["rho"])
    assert rho["critic"][0] > rho["standard"][0] + 0.02, rho
    assert rho["critic"][1] > rho["standard"][1] + 0.02, rho


@pytest.mark.slow
def test_margin_maximisation_is_more_robust_than_standard_training(mnist, tmp_path):
    """The l_2 margin baseline (lambda 0.1) against standard training, both with the Table-1 MLP settings."""
    from robustlab import evaluate

    data = _subset(mnist, 2000)
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    acc = {}
    for method, kw in (("standard", {}), ("margin", {"lam": 0.1})):
        t = Trainer(_cfg(method, tmp_path / method, epochs=4, hidden=128, method_kwargs=kw), data=data)
        t.fit()
        r = evaluate(t.model.eval(), x, y, ["pgd:norm=l2,eps=1.5,steps=10,step_size=0.3"], checks=False)
        acc[method] = (r["clean_accuracy"], r["union_accuracy"])
    assert acc["margin"][0] > 0.85, acc
    assert acc["margin"][1] >= acc["standard"][1] + 0.1, acc
