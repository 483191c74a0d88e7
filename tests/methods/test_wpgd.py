"""WPGD (spec wpgd.md section 8): the closed-form Wasserstein loss against the transport LP, its gradient, the
stable log form, soft-target OT, label metrics and their validation, and the inner maximisation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.base import PassCounter
from robustlab.attacks.pgd import pgd
from robustlab.label_metrics.metric import (
    CIFAR10_WORDNET_DISTANCES,
    MetricError,
    check_metric,
    cifar10_wordnet,
    get_metric,
    load_metric_file,
    metric_power,
    resolve_synsets,
    uniform_metric,
    wordnet_metric,
)
from robustlab.label_metrics.visual import linear_pair_distances, targeted_deepfool, visual_metric
from robustlab.losses import ce_loss
from robustlab.losses.wasserstein import WassersteinAttackLoss, log_wasserstein_onehot, wasserstein_onehot
from robustlab.methods import Batch, StepContext, create_method
from robustlab.threat import make_threat


def _random_metric(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(k, k, generator=g, dtype=torch.float64)
    c = (a + a.T) / 2
    c.fill_diagonal_(0)
    return c


def _lp(q, t, c):
    """The exact transport cost between q and t under c, by POT (the field's OT library, test-only)."""
    import ot

    return float(ot.emd2(np.ascontiguousarray(q, dtype=np.float64), np.ascontiguousarray(t, dtype=np.float64),
                         np.ascontiguousarray(c, dtype=np.float64)))


@pytest.mark.parametrize("k", [2, 3, 5, 10])
@pytest.mark.parametrize("p", [1.0, 2.5, 10.0])
def test_closed_form_equals_the_transport_lp_for_one_hot_targets(k, p):
    torch.manual_seed(k)
    cost = metric_power(_random_metric(k, seed=k), p)
    logits = torch.randn(6, k, dtype=torch.float64) * 2
    y = torch.randint(0, k, (6,))
    ours = wasserstein_onehot(logits, y, cost)
    q = F.softmax(logits, 1).numpy()
    for i in range(6):
        t = np.eye(k)[int(y[i])]
        assert abs(ours[i].item() - _lp(q[i], t, cost.numpy())) < 1e-6


def test_gradient_matches_the_formula_and_the_loss_is_linear_in_the_cost():
    torch.manual_seed(0)
    k, lam = 5, 0.3
    cost = _random_metric(k)
    z = torch.randn(4, k, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 4, 1])
    loss = wasserstein_onehot(z, y, cost, entropy_weight=lam)
    (g,) = torch.autograd.grad(loss.sum(), z)
    q = F.softmax(z, 1).detach()
    c = cost[y]
    cbar = (c * q).sum(1, keepdim=True)
    h = -(q * q.log()).sum(1, keepdim=True)
    a = lam / math.log(k)
    assert torch.allclose(g, q * (c - cbar) + a * q * (q.log() + h), atol=1e-10)
    z0 = z.detach()
    assert torch.allclose(wasserstein_onehot(z0, y, 2 * cost) + wasserstein_onehot(z0, y, cost),
                          wasserstein_onehot(z0, y, 3 * cost))
    assert (wasserstein_onehot(z0, y, torch.zeros(k, k, dtype=torch.float64)) == 0).all()
    ent = wasserstein_onehot(z0, y, cost) - wasserstein_onehot(z0, y, cost, entropy_weight=1.0)
    assert ((ent >= 0) & (ent <= 1 + 1e-9)).all()  # the entropy term lies in [0, 1/lambda]


def test_log_form_is_finite_for_saturated_models():
    cost = cifar10_wordnet().float()
    z = torch.zeros(3, 10)
    z[:, 0] = 200.0  # p_other underflows in float32
    z.requires_grad_(True)
    y = torch.zeros(3, dtype=torch.long)
    plain = wasserstein_onehot(z, y, cost)
    (gp,) = torch.autograd.grad(plain.sum(), z)
    assert (gp == 0).all()  # the reason for the log form: sign-PGD would freeze
    logw = log_wasserstein_onehot(z, y, cost)
    (gl,) = torch.autograd.grad(logw.sum(), z)
    assert torch.isfinite(logw).all() and torch.isfinite(gl).all() and (gl.abs().sum(1) > 0).all()
    assert torch.allclose(logw, torch.log(wasserstein_onehot(z.detach().double(), y, cost.double())).float(), atol=1e-3)


class _Lin(nn.Module):
    def __init__(self, d=16, k=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, k).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _attack(model, x, y, loss_fn, seed=0, steps=5):
    return pgd(PassCounter(model), x, y, threat=make_threat("linf", 0.1), loss_fn=loss_fn, steps=steps,
               step_size=0.03, generator=torch.Generator().manual_seed(seed)).x_adv


def test_log_space_and_plain_sign_pgd_give_identical_examples():
    torch.manual_seed(0)
    model = _Lin()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    cost = metric_power(_random_metric(4), 2.5)
    a = _attack(model, x, y, WassersteinAttackLoss(cost))
    b = _attack(model, x, y, lambda z, yy, t=None: wasserstein_onehot(z, yy, cost))
    assert torch.equal(a, b)


def test_uniform_metric_ranks_like_one_minus_p_true_and_reduces_to_pgd():
    torch.manual_seed(0)
    cost = uniform_metric(4)
    z = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (50,))
    lw = wasserstein_onehot(z, y, cost)
    assert torch.allclose(lw, 1 - F.softmax(z, 1)[torch.arange(50), y])
    # log(1 - p_y) and CE = -log p_y have positively proportional gradients: sign-PGD takes the same steps
    model = _Lin()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    yy = torch.randint(0, 4, (8,))
    assert torch.equal(_attack(model, x, yy, WassersteinAttackLoss(cost)), _attack(model, x, yy, ce_loss))


def test_large_p_concentrates_the_inner_loss_on_distant_classes():
    c = cifar10_wordnet()
    row = metric_power(c, 10.0)[3]  # cat
    far = c[3] >= 17 / 19  # airplane, automobile, ship, truck
    assert row[5] < 1e-5  # cat -> dog (distance 4/19) costs nearly nothing at p = 10
    assert row[far].sum() / row.sum() > 0.95  # the attacker's objective lives on the distant classes


# -- label metrics -------------------------------------------------------------------------------------------

def test_cifar10_metric_is_the_spec_matrix():
    c = cifar10_wordnet()
    assert torch.equal(c * 19, torch.tensor(CIFAR10_WORDNET_DISTANCES, dtype=torch.float64))
    assert c.max() == 1 and (c.diagonal() == 0).all() and torch.equal(c, c.T)


@pytest.mark.parametrize("matrix,match", [
    ([[0, 1], [2, 0]], "symmetric"),
    ([[0, -1], [-1, 0]], "non-negative"),
    ([[1, 1], [1, 0]], "zero diagonal"),
    ([[0, 1, 1], [1, 0, 1]], "square"),
    ([[0, float("nan")], [float("nan"), 0]], "NaN"),
])
def test_bad_metrics_are_rejected(matrix, match):
    with pytest.raises(MetricError, match=match):
        check_metric(matrix)


def test_metric_size_must_match_the_classes(tmp_path):
    with pytest.raises(MetricError, match="10 x 10 but the model has 4 classes"):
        get_metric("cifar10-wordnet", 4)
    p = tmp_path / "m.csv"
    p.write_text("0,1,2\n1,0,1\n2,1,0\n")
    assert torch.equal(load_metric_file(p, 3), torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=torch.float64))
    np.save(tmp_path / "m.npy", np.array([[0.0, 3.0], [3.0, 0.0]]))
    assert get_metric(str(tmp_path / "m.npy"), 2, normalize="max").max() == 1
    with pytest.raises(MetricError, match="does not exist"):
        load_metric_file(tmp_path / "missing.npy")
    with pytest.raises(MetricError, match="p must be > 0"):
        create_method("wpgd", p=0.0)
    with pytest.raises(MetricError, match="unknown label metric"):
        get_metric("imagenet-wordnet", 10)


class _FakeSynset:
    def __init__(self, name, depth):
        self.name, self.depth = name, depth

    def shortest_path_distance(self, other):
        return abs(self.depth - other.depth) + 2


class _FakeWordNet:
    """Stands in for NLTK's reader: the mapping logic and errors are robustlab's, not WordNet's."""

    table = {"dog.n.01": 3, "cat.n.01": 4, "car.n.01": 9}

    def synset(self, name):
        if name not in self.table:
            raise ValueError(name)
        return _FakeSynset(name, self.table[name])

    def synsets(self, word, pos=None):
        return [self.synset(f"{word}.n.01")] if f"{word}.n.01" in self.table else []

    def synset_from_pos_and_offset(self, pos, offset):
        if offset == 2084071:
            return self.synset("dog.n.01")
        raise ValueError(offset)


def test_wordnet_mapping_and_its_errors(tmp_path, monkeypatch):
    wn = _FakeWordNet()
    m = wordnet_metric(["dog", "cat.n.01", "car"], root=tmp_path, wordnet=wn, normalize=None)
    assert torch.equal(m, torch.tensor([[0, 3, 8], [3, 0, 7], [8, 7, 0]], dtype=torch.float64))
    assert resolve_synsets(wn, ["n02084071"])[0].name == "dog.n.01"
    with pytest.raises(MetricError, match="'unicorn'"):
        wordnet_metric(["dog", "unicorn"], root=tmp_path, wordnet=wn)
    import builtins

    real_import = builtins.__import__

    def no_nltk(name, *a, **k):
        if name.startswith("nltk"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_nltk)
    with pytest.raises(MetricError, match="needs nltk"):
        wordnet_metric(["dog", "cat"], root=tmp_path)


def test_visual_metric_linear_exact_equals_targeted_deepfool():
    torch.manual_seed(0)
    two = _Lin(d=16, k=2).float()  # two classes: DeepFool's first linear step lands exactly past the boundary
    x = torch.rand(300, 1, 4, 4) * 0.6 + 0.2
    y = two(x).argmax(1)
    exact = linear_pair_distances(two.fc.weight, two.fc.bias, x)
    for i in (0, 1):
        xi = x[y == i]
        src, tgt = torch.full((xi.shape[0],), i), torch.full((xi.shape[0],), 1 - i)
        dist, ok = targeted_deepfool(two, xi, src, tgt, overshoot=0.02)
        ref = exact[y == i][:, i, 1 - i]
        small = ok & (ref < 0.15)  # inputs lie in [0.2, 0.8]: the clip to [0, 1] cannot bind this close
        assert small.sum() > 5
        # one step of the shared DeepFool: (distance + 1e-4) along w / ||w|| (the DeepFool authors' code), overshoot 2%
        assert torch.allclose(dist[small].double(), 1.02 * (ref[small] + 1e-4), rtol=1e-4)
    model = _Lin(d=16, k=3).float()
    y3 = model(x).argmax(1)
    m, info = visual_metric(model, x, y3, 3, method="linear_exact")
    assert torch.equal(m, m.T) and (m.diagonal() == 0).all() and m.max() == 1
    md, info_d = visual_metric(model, x, y3, 3, method="deepfool")
    assert torch.equal(md, md.T) and md.max() == 1
    # DeepFool needs at least the exact distance: the visual metrics agree on the ordering of the pairs
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.corrcoef(torch.stack([m[off], md[off]]))[0, 1] > 0.9


# -- the method ----------------------------------------------------------------------------------------------

class _Recorder(nn.Module):
    """The model, keeping every input it is given (the attack's iterates and the training point)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, z):
        self.seen.append(z.detach().clone())
        return self.net(z)


def test_wpgd_step_stays_in_the_ball_and_checks_the_metric_size():
    torch.manual_seed(0)
    model = _Recorder(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 10, (6,))
    m = create_method("wpgd", eps=0.1, steps=3, p=2.5)
    out = m.loss(model, Batch(x, y), StepContext(0, 0, torch.Generator().manual_seed(0)))
    assert torch.isfinite(out.loss)
    # every point the model saw (iterates, then the training point) lies in the l_inf ball and the box, and the
    # attack moved: the training point is not x
    assert len(model.seen) >= 4
    for z in model.seen:  # (a first call on x[:1] reads the number of classes)
        assert (z - x[: z.shape[0]]).abs().max() <= 0.1 + 1e-6 and z.min() >= 0 and z.max() <= 1
    assert (model.seen[-1] - x).abs().max() > 0.05
    bad = create_method("wpgd", eps=0.1, metric="cifar10-wordnet")
    small = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(MetricError, match="model has 4 classes"):
        bad.loss(small, Batch(x, y % 4), StepContext(0, 0, torch.Generator().manual_seed(0)))
