"""MNG-AC and the multi-perturbation baselines (spec mng_ac.md section 7): the JS consistency loss, the noise
generator and its fitting, SAT's draw, Adv_avg / Adv_max / MSD, and the meta step (only the generator moves;
the second-order gradient against finite differences)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.base import PassCounter
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import lr_factor
from robustlab.methods import Batch, StepContext, create_method
from robustlab.methods.mng_ac import NoiseGenerator
from robustlab.methods.msd import msd_attack
from robustlab.methods.multi_norm import MultiNormAttacks
from robustlab.methods.sat import fit_noise, js_divergence
from robustlab.threat import make_threat, per_sample_norm
from robustlab.threat.lp import l1_threshold, project_l1_ball
from tests.conftest import TinyCNN

MNIST = dict(eps_linf=0.3, eps_l2=2.0, eps_l1=10.0, steps_linf=3, steps_l2=3, steps_l1=4,
             step_size_linf=0.1, step_size_l2=0.6, step_size_l1=2.0)


def _ctx(seed=0, epoch=0, step=0):
    return StepContext(epoch, step, torch.Generator().manual_seed(seed))


def _sgd_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt, step


# -- threat-model pieces used by the methods --------------------------------------------------------------

def test_l1_threshold_is_zero_inside_and_projection_keeps_inside_samples_bit_identical():
    torch.manual_seed(0)
    v = torch.randn(6, 3, 4, 4)
    v[::2] *= 0.01  # inside a ball of radius 2
    eps = torch.tensor(2.0)
    theta = l1_threshold(v, eps)
    inside = per_sample_norm(v, "l1") <= 2.0
    assert inside.any() and (~inside).any()
    assert (theta[inside] == 0).all() and (theta[~inside] > 0).all()
    p = project_l1_ball(v, eps)
    assert torch.equal(p[inside], v[inside])
    assert torch.allclose(per_sample_norm(p[~inside], "l1"), torch.full(((~inside).sum(),), 2.0), rtol=1e-5)
    assert (p.abs() <= v.abs() + 1e-7).all() and ((p == 0) | (p.sign() == v.sign())).all()


# -- adversarial consistency ------------------------------------------------------------------------------

def test_js_divergence_properties():
    torch.manual_seed(0)
    a, b, c = (torch.randn(5, 4) * 3 for _ in range(3))
    js = js_divergence(a, b, c)
    assert js >= 0 and js <= math.log(3) + 1e-6
    assert torch.allclose(js, js_divergence(c, a, b)) and torch.allclose(js, js_divergence(b, c, a))
    assert js_divergence(a, a, a).abs() < 1e-6
    p = [F.softmax(t, 1) for t in (a, b, c)]
    m = ((p[0] + p[1] + p[2]) / 3).clamp(1e-7, 1)
    explicit = sum((q * (q.log() - m.log())).sum(1).mean() for q in p) / 3
    assert torch.allclose(js, explicit, atol=1e-6)
    # extremes: three different one-hot predictions reach log 3
    big = torch.eye(3)[:, :3] * 60
    assert abs(js_divergence(big[[0]], big[[1]], big[[2]]).item() - math.log(3)) < 1e-4


# -- the generator and the fitting of its noise -----------------------------------------------------------

def test_generator_shapes_parameter_count_and_stochasticity():
    g = NoiseGenerator(3, image_input=False)
    assert sum(p.numel() for p in g.parameters()) == 4183  # the official architecture (mng_ac.md 4.1)
    gi = NoiseGenerator(3, image_input=True)
    assert sum(p.numel() for p in gi.parameters()) == 4183 + 3 * 20  # x enters the first 1x1 conv
    x = torch.rand(4, 3, 8, 8)
    a, b = gi(x), gi(x)
    assert a.shape == x.shape and not torch.equal(a, b)
    gen1, gen2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(gi(x, gen1), gi(x, gen2))
    # input dependence: the same noise with a different image gives a different output
    assert not torch.equal(gi(x, torch.Generator().manual_seed(1)), gi(1 - x, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5), ("l1", 6.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fitted_noise_lies_in_ball_and_box(norm, eps, dtype):
    torch.manual_seed(0)
    x = torch.rand(17, 3, 6, 6, dtype=dtype)
    v = torch.randn(17, 3, 6, 6, dtype=dtype) * 3
    x_aug = fit_noise(x, v, norm, eps)
    assert make_threat(norm, eps).contains(x_aug, x, tol=1e-5).all()
    if norm == "l2":  # on the sphere whenever the box allows it (mng_ac.md 4.2)
        assert torch.allclose(per_sample_norm(x_aug - x, "l2"), torch.full((17,), eps, dtype=dtype), rtol=1e-4)


def test_l2_fit_saturates_when_the_box_cannot_hold_eps_and_is_differentiable():
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    v = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]], dtype=torch.float64, requires_grad=True)
    out = fit_noise(x, v, "l2", 10.0)  # 3 moving coordinates with room 0.5 each: at most sqrt(0.75)
    assert torch.allclose(out.detach(), torch.tensor([[[[1.0, 0.0], [1.0, 0.5]]]], dtype=torch.float64))
    small = fit_noise(x, v, "l2", 0.3)
    assert abs(per_sample_norm(small - x, "l2").item() - 0.3) < 1e-9
    (g,) = torch.autograd.grad(small.sum(), v)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# -- SAT ---------------------------------------------------------------------------------------------------

def test_sat_draw_is_seeded_and_uniform():
    sat = create_method("sat", **MNIST)
    draws = torch.stack([sat.draw(_ctx(seed=s), 4)[0] for s in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / 3000
    assert (freq - 1 / 3).abs().max() < 0.03, freq
    again = torch.stack([sat.draw(_ctx(seed=s), 4)[0] for s in range(50)])
    assert torch.equal(draws[:50], again)
    assert (sat.draw(_ctx(seed=7), 4) == sat.draw(_ctx(seed=7), 4)[0]).all()  # one norm for the whole batch
    per_sample = create_method("sat", sat_granularity="sample", **MNIST).draw(_ctx(seed=0), 300)
    assert len(set(per_sample.tolist())) == 3


@pytest.mark.parametrize("seed", range(6))
def test_sat_runs_exactly_one_attack_per_minibatch(seed):
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    sat = create_method("sat", **MNIST)
    _, step = _sgd_step(model)
    ctx = _ctx(seed)
    norm = sat.norms[int(sat.draw(_ctx(seed), 8)[0])]
    sat.train_step(model, Batch(x, y), None, ctx, step)
    assert ctx.passes[1] == sat.attacks.steps[norm] * 8  # input-gradient passes of that one attack only


# -- Adv_avg, Adv_max, MSD ---------------------------------------------------------------------------------

def test_adv_avg_loss_is_the_mean_of_the_three_attack_losses():
    torch.manual_seed(0)
    model = TinyCNN().eval()  # eval: the three views see the same BatchNorm statistics
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    m = create_method("adv-avg", attack_bn_mode="eval", **MNIST)
    out = m.loss(model, Batch(x, y), _ctx(3))
    advs = []
    ctx = _ctx(3)
    for n in m.norms:
        advs.append(m.attacks.attack(model, x, y, n, ctx))
    expected = torch.stack([F.cross_entropy(model(a), y) for a in advs]).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_adv_max_trains_each_sample_on_its_worst_attack(monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    m = create_method("adv-max", attack_bn_mode="eval", **MNIST)
    # hand-made adversarial batches: attack k moves sample i by k-th offset; the CE decides per sample
    offsets = {"linf": torch.tensor([0.9, 0.0, 0.0]), "l2": torch.tensor([0.0, 0.9, 0.0]), "l1": torch.tensor([0.0, 0.0, 0.9])}
    monkeypatch.setattr(m.attacks, "attack", lambda model_, x_, y_, n, ctx, keep_buffers=False:
                        (x_ + offsets[n].view(-1, 1, 1, 1)).clamp(0, 1))
    out = m.loss(model, Batch(x, y), _ctx())
    cands = torch.stack([(x + offsets[n].view(-1, 1, 1, 1)).clamp(0, 1) for n in m.norms])
    with torch.no_grad():
        ce = torch.stack([F.cross_entropy(model(c), y, reduction="none") for c in cands])
    worst = cands[ce.argmax(0), torch.arange(3)]
    assert torch.allclose(out.loss, F.cross_entropy(model(worst), y), atol=1e-6)
    assert out.loss >= ce.mean(0).mean() - 1e-6


def test_msd_output_lies_in_one_of_the_balls_and_is_the_best_iterate(monkeypatch):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = torch.rand(7, 1, 8, 8), torch.randint(0, 10, (7,))
    attacks = MultiNormAttacks(attack_bn_mode="eval", **MNIST)
    sizes = {"linf": 0.05, "l2": 0.4, "l1": 1.5}
    losses = []
    real_ce = F.cross_entropy

    def spy(logits, target, reduction="mean", **kw):
        out = real_ce(logits, target, reduction=reduction, **kw)
        if reduction == "none":
            losses.append(out.detach())
        return out

    monkeypatch.setattr(F, "cross_entropy", spy)
    x_adv = msd_attack(model, x, y, attacks, 8, sizes, PassCounter(model))
    monkeypatch.undo()
    inside = torch.zeros(7, dtype=torch.bool)
    for t in attacks.threats.values():
        inside |= t.contains(x_adv, x)
    assert inside.all()
    with torch.no_grad():
        final = F.cross_entropy(model(x_adv), y, reduction="none")
    # per iteration: the loss at the current point (for its gradient), then the three candidates' losses
    per_iter = torch.stack(losses).view(8, 4, 7)[:, 1:]
    chosen = per_iter.amax(1)  # MSD keeps the candidate with the largest loss
    assert torch.allclose(final, chosen.amax(0).clamp_min(0), atol=1e-5)


# -- the meta step -----------------------------------------------------------------------------------------

class _TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def test_meta_step_moves_only_the_generator_and_the_outer_step_only_the_classifier():
    torch.manual_seed(0)
    model = _TinyBN().train()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 4, (8,))
    m = create_method("mng-ac", eps_linf=0.3, eps_l2=1.0, eps_l1=3.0, steps_linf=2, steps_l2=2, steps_l1=2,
                      step_size_linf=0.1, step_size_l2=0.5, step_size_l1=1.0)
    gen = m._ensure(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g_before = {k: v.clone() for k, v in gen.state_dict().items()}
    ctx = _ctx(1)
    x_adv, draw = m.sat_adversarial(model, x, y, ctx, keep_buffers=True)
    m.meta_step(model, x, y, x_adv, draw, 0.1, ctx.generator)
    m.generator_optimizer.param_groups[0]["lr"] = 0.1
    m.generator_optimizer.step()
    for k, v in model.state_dict().items():  # weights and BatchNorm buffers: untouched by attack and meta step
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(v, g_before[k]) for k, v in gen.state_dict().items())
    # a full training step: the generator moves only in its meta step, the classifier in the outer step
    g_mid = {k: v.clone() for k, v in gen.state_dict().items()}
    seen = {}

    def step(loss):
        seen["gen"] = {k: v.clone() for k, v in gen.state_dict().items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.train_step(model, Batch(x, y), opt, _ctx(2), step)
    after_gen = {k: v.clone() for k, v in gen.state_dict().items()}
    assert all(torch.equal(after_gen[k], seen["gen"][k]) for k in after_gen)  # unchanged by the classifier step
    assert any(not torch.equal(seen["gen"][k], g_mid[k]) for k in g_mid)  # changed by the meta step
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "weight" in k)


def _meta_loss_and_grad(m, model, x, y, x_adv, draw, lr, seed):
    m.generator_optimizer.zero_grad(set_to_none=True)
    loss, g = m.meta_step(model, x, y, x_adv, draw, lr, torch.Generator().manual_seed(seed))
    return loss.item(), g


# l_1's fitting treats its threshold as a constant (mng_ac.md 4.2), so its gradient is not the total derivative:
# there the check is that the second-order gradient is non-zero.
@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_meta_gradient_matches_finite_differences_and_is_second_order(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 9, 3)).double()
    x = torch.rand(4, 1, 3, 3, dtype=torch.float64) * 0.5 + 0.25
    y = torch.tensor([0, 1, 2, 0])
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    eps = {"linf": 1.0, "l2": 0.2, "l1": 0.4}[norm]  # the trained norm's budget only: the others would be refused
    m = create_method("mng-ac", norms=(norm,), **{f"eps_{norm}": eps}, generator_width=3)
    gen = m._ensure(x.float())
    gen.double()
    draw = torch.zeros(4, dtype=torch.long)
    lr = 0.5
    loss, g = _meta_loss_and_grad(m, model, x, y, x_adv, draw, lr, seed=5)
    assert g.abs().sum() > 0  # the second-order term is there
    u = torch.randn(g.shape, dtype=torch.float64)
    h = 1e-6
    params = list(gen.parameters())

    def shift(s):
        off = 0
        with torch.no_grad():
            for p in params:
                p.add_(s * u[off:off + p.numel()].view_as(p))
                off += p.numel()

    shift(h)
    lp, _ = _meta_loss_and_grad(m, model, x, y, x_adv, draw, lr, seed=5)
    shift(-2 * h)
    lm, _ = _meta_loss_and_grad(m, model, x, y, x_adv, draw, lr, seed=5)
    shift(h)
    fd = (lp - lm) / (2 * h)
    assert norm == "l1" or abs(fd - (g @ u).item()) <= 1e-4 * max(abs(fd), 1e-8), (fd, (g @ u).item())
    # theta' by hand, and the first-order (detached) variant gives exactly zero generator gradient
    params_c = dict(model.named_parameters())
    x_aug = m._fit(x, gen(x, torch.Generator().manual_seed(5)), draw)
    inner = F.cross_entropy(torch.func.functional_call(model, params_c, (x_aug,)), y)
    grads = torch.autograd.grad(inner, list(params_c.values()), create_graph=True)
    detached = {k: p - lr * gr.detach() for (k, p), gr in zip(params_c.items(), grads)}
    meta = F.cross_entropy(torch.func.functional_call(model, detached, (x_adv,)), y)
    g0 = torch.autograd.grad(meta, params, allow_unused=True)
    assert all(t is None or (t == 0).all() for t in g0)


def test_cyclic_schedule_matches_mng_ac():
    cfg = TrainConfig(epochs=30, schedule="cyclic", cyclic_peak=0.4, lr=0.21)
    total = 30 * 100
    # step i uses the schedule at (i + 1) / total, as train_MNG.py's lr_schedule(epoch + (i + 1) / n): the first
    # step (and so the first meta step) already has a positive lr, the peak is reached at the end of epoch 12
    assert lr_factor(cfg, 0, total) == pytest.approx(1 / 1200)
    assert abs(lr_factor(cfg, 1199, total) - 1) < 1e-12
    assert abs(lr_factor(cfg, 599, total) - 0.5) < 1e-12 and abs(lr_factor(cfg, 2099, total) - 0.5) < 1e-12
    assert lr_factor(cfg, total - 1, total) == 0
    with pytest.raises(Exception, match="cyclic_peak"):
        TrainConfig(schedule="cyclic", cyclic_peak=1.0)


def test_sat_epoch_draw_follows_the_run_seed():
    """sat_granularity=epoch draws one norm per epoch from (run seed, epoch): two runs with different seeds do not
    share the sequence (it used to be seeded by the epoch alone)."""
    sat = create_method("sat", sat_granularity="epoch", **MNIST)

    def sequence(seed):
        return [int(sat.draw(StepContext(e, 0, torch.Generator().manual_seed(99), seed=seed), 2)[0]) for e in range(40)]

    assert sequence(0) == sequence(0)
    assert sequence(0) != sequence(1)
    assert sat.draw(StepContext(3, 0, torch.Generator().manual_seed(1), seed=5), 2).tolist() == \
        sat.draw(StepContext(3, 7, torch.Generator().manual_seed(2), seed=5), 2).tolist()  # fixed within an epoch


def test_mng_ac_defaults_to_the_official_input_independent_generator():
    m = create_method("mng-ac", **MNIST)
    assert m.generator_input == "noise"
    m._ensure(torch.rand(2, 3, 8, 8))
    assert sum(p.numel() for p in m.generator.parameters()) == 4183  # mng_ac.md 4.1, C = 3


def test_first_mng_ac_step_of_a_cyclic_run_moves_the_generator(tmp_path):
    """With the cyclic schedule the first step's lr is positive (the official loop evaluates the schedule at
    (i + 1) / n), so the very first meta step already trains the generator."""
    from robustlab.data import ImageData
    from robustlab.engine.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    data = ImageData("toy", torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g),
                     torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g), 10)
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": 16, "depth": 1}, method="mng-ac", method_kwargs=MNIST,
                      epochs=3, batch_size=32, schedule="cyclic", cyclic_peak=0.4, lr=0.2, validation=0,
                      select_best=False, eval_every=100, out_dir=str(tmp_path), progress=False)
    t = Trainer(cfg, data=data)
    snapshots = []
    real_step = t.method.meta_step

    def recording(*args, **kwargs):
        before = [p.detach().clone() for p in t.method.generator.parameters()]
        out = real_step(*args, **kwargs)
        snapshots.append((before, args[5]))  # the lookahead lr of this meta step
        return out

    t.method.meta_step = recording
    with pytest.raises(KeyboardInterrupt):
        t.fit(stop_at_step=1)
    (before, lr), = snapshots
    assert lr > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, t.method.generator.parameters()))


def test_mng_ac_checkpoint_round_trip():
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    m = create_method("mng-ac", **MNIST)
    opt, step = _sgd_step(model)
    m.train_step(model, Batch(x, y), opt, _ctx(), step)
    saved = {k: v.clone() for k, v in m.state_tensors().items()}
    assert any(k.startswith("generator/") for k in saved) and any(k.startswith("generator_optim/") for k in saved)
    m2 = create_method("mng-ac", **MNIST)
    m2.load_state_tensors(saved)
    m2._ensure(x)
    assert all(torch.equal(v, m2.state_tensors()[k]) for k, v in saved.items())


# -- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"norms": ("linf", "l3")}, "unknown norm 'l3'"),
    ({"norms": ()}, "empty"),
    ({"norms": ("l2", "l2")}, "repeated"),
    ({"eps_l1": 0.0}, "eps_l1 must be > 0"),
    ({"eps_linf": -0.1}, "eps"),
    ({"steps_l2": 0}, "steps_l2"),
    ({"attack_bn_mode": "frozen"}, "attack_bn_mode"),
    ({"generator_input": "text"}, "generator_input"),
    ({"sat_granularity": "never"}, "sat_granularity"),
])
def test_bad_multi_norm_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_method("mng-ac", **kwargs)


def test_multi_norm_panel_expands_and_rejects_bad_options():
    from robustlab.attacks.spec import expand_panels

    specs = expand_panels(["multi-norm:eps_linf=0.3,eps_l2=2.0,eps_l1=10"])
    names = [s.split(":")[0] for s in specs]
    assert names.count("pgd") == 3 and names.count("autoattack") == 2 and "ead" in names and "salt-pepper" in names
    # the l_2 group of the protocol (mng_ac.md 6.1): C&W with foolbox's settings and additive Gaussian noise
    assert "cw:eps=2.0,steps=200,binary_steps=5" in specs and "gaussian-noise:eps=2.0,repeats=100" in specs
    # Brendel-Bethge in the l_inf and l_2 groups, foolbox's 1,000 steps
    assert "brendel-bethge:norm=linf,eps=0.3,steps=1000" in specs and "brendel-bethge:norm=l2,eps=2.0,steps=1000" in specs
    assert [s.split(":")[0] for s in expand_panels(["multi-norm:bb_steps=10,autoattack=false"])][:4] == \
        ["pgd", "brendel-bethge", "pgd", "brendel-bethge"]
    quick = expand_panels(["multi-norm:autoattack=false,brendel_bethge=false"])
    assert not any(s.startswith(("autoattack", "brendel-bethge")) for s in quick) and len(quick) == len(specs) - 4
    with pytest.raises(ValueError, match="multi-norm"):
        expand_panels(["multi-norm:eps_l0=3"])
