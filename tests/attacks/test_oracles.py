"""Linear-model oracles (baselines.md section 4): the minimal perturbation is known in closed form."""
import pytest
import torch

from robustlab.attacks import CW, FAB, FGSM, PGD, BrendelBethge, DeepFool
from robustlab.attacks.fab import project_hyperplane_box
from tests.conftest import Linear


def _setup(n=20, d=16, k=3, seed=0):
    model = Linear(d, k, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = 0.4 + 0.2 * torch.rand(n, 1, 1, d, generator=g)  # well inside the box
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correctly classified
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    z = x.flatten(1) @ w.t() + b
    diff_w = w[y][:, None, :] - w[None, :, :]  # (n, k, d): w_y - w_j
    gap = z.gather(1, y[:, None]) - z  # z_y - z_j
    mask = torch.nn.functional.one_hot(y, k).bool()
    d2 = (gap / diff_w.norm(dim=2).clamp_min(1e-12)).masked_fill(mask, float("inf")).amin(1)
    dinf = (gap / diff_w.abs().sum(2).clamp_min(1e-12)).masked_fill(mask, float("inf")).amin(1)
    return model, x, y, d2, dinf


def test_deepfool_l2_is_analytic_after_one_step():
    model, x, y, d2, _ = _setup()
    out = DeepFool(model, norm="l2", num_classes=3).run(x, y)
    assert out.success.all()
    assert torch.allclose(out.norms, 1.02 * (d2 + 1e-4), rtol=1e-3)
    assert out.forward <= x.shape[0] * 4  # clean + one iteration + check (+ no extra iterations)


def test_deepfool_linf_within_5_percent():
    model, x, y, _, dinf = _setup()
    out = DeepFool(model, norm="linf", num_classes=3).run(x, y)
    assert out.success.all()
    ratio = out.norms / dinf
    assert (ratio >= 0.999).all() and (ratio <= 1.05).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fab_finds_minimal_perturbation_within_5_percent(norm):
    model, x, y, d2, dinf = _setup()
    out = FAB(model, norm=norm, steps=100).run(x, y)
    ref = d2 if norm == "l2" else dinf
    assert out.success.all()
    ratio = out.norms / ref
    assert (ratio >= 0.999).all() and (ratio <= 1.05).all(), ratio


@pytest.mark.parametrize("norm,slack", [("l2", 1.01), ("linf", 1.10)])
def test_brendel_bethge_finds_minimal_perturbation(norm, slack):
    """With two classes the boundary is one plane and its closest point is the minimum (with more, the walk can end
    at the foot of the face it started on: a local minimum of the method). foolbox's defaults (1,000 steps); l_inf
    within 10% (foolbox's own l_inf walk ends within 13% here, from the same starts)."""
    model, x, y, d2, dinf = _setup(k=2)
    out = BrendelBethge(model, norm=norm).run(x, y)
    ref = d2 if norm == "l2" else dinf
    assert out.success.all()
    ratio = out.norms / ref
    assert (ratio >= 0.999).all() and (ratio <= slack).all(), ratio


def test_fab_targeted_within_budget_only():
    model, x, y, _, dinf = _setup()
    eps = float(dinf.median())
    out = FAB(model, norm="linf", eps=eps, targeted=True, n_targets=2).run(x, y)
    assert (out.norms[out.success] <= eps + 1e-6).all()
    assert ((x - out.x_adv).flatten(1).abs().amax(1) <= eps + 1e-6).all()
    # points whose minimal distance exceeds the budget can never be fooled
    assert not out.success[dinf > eps * 1.001].any()


def test_cw_within_5_percent_of_analytic():
    model, x, y, d2, _ = _setup()
    out = CW(model, steps=1000, binary_steps=9).run(x, y)
    assert out.success.all()
    ratio = out.norms / d2
    assert (ratio >= 0.999).all() and (ratio <= 1.05).all(), ratio


def test_cw_no_larger_than_pgd_needs(mnist_cnn, mnist):
    """Per sample, the smallest l2 budget at which PGD-L2 succeeds is >= C&W's norm (up to 5%)."""
    x, y = mnist.x_test[:40], mnist.y_test[:40]
    with torch.no_grad():
        ok = mnist_cnn(x).argmax(1) == y
    x, y = x[ok][:24], y[ok][:24]
    cw = CW(mnist_cnn, steps=300, binary_steps=7, initial_const=0.1).run(x, y)
    needed = torch.full((x.shape[0],), float("inf"))
    for eps in [0.25 * i for i in range(1, 17)]:
        s = PGD(mnist_cnn, norm="l2", eps=eps, steps=40, step_size=eps / 10).run(x, y).success
        needed = torch.where(s & torch.isinf(needed), torch.full_like(needed, eps), needed)
    both = cw.success & torch.isfinite(needed)
    assert both.float().mean() > 0.8
    assert (cw.norms[both] <= needed[both] * 1.05).float().mean() >= 0.9
    assert cw.norms[both].median() <= needed[both].median()


def test_fgsm_exact_for_binary_linear_model():
    """K = 2: FGSM lowers the margin by exactly eps * ||w_y - w_other||_1 (box inactive)."""
    model = Linear(16, 2).eval()
    x = 0.4 + 0.2 * torch.rand(10, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
        w = model.fc.weight
        margin = lambda z: z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)  # noqa: E731
        x_adv = FGSM(model, eps=0.05)(x, y)
        drop = margin(model(x)) - margin(model(x_adv))
        expected = 0.05 * (w[0] - w[1]).abs().sum()
    assert torch.allclose(drop, expected.expand_as(drop), rtol=1e-4)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_hyperplane_box_projection_is_feasible_and_minimal(norm):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, 6, generator=g, dtype=torch.float64)
    w = torch.randn(50, 6, generator=g, dtype=torch.float64)
    b = (w * torch.rand(50, 6, generator=g, dtype=torch.float64)).sum(1)  # a reachable hyperplane
    d = project_hyperplane_box(p, w, b, norm)
    assert torch.allclose((w * (p + d)).sum(1), b, atol=1e-9)
    assert ((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()
    # minimality against random feasible points on the same hyperplane (built by moving along the plane)
    q = torch.rand(50, 6, generator=g, dtype=torch.float64)
    t = (b - (w * q).sum(1)) / (w * w).sum(1)
    cand = q + t[:, None] * w  # on the plane, maybe outside the box
    inside = ((cand >= 0) & (cand <= 1)).all(1)
    nd = (d.norm(dim=1) if norm == "l2" else d.abs().amax(1))
    nc = ((cand - p).norm(dim=1) if norm == "l2" else (cand - p).abs().amax(1))
    assert (nd[inside] <= nc[inside] + 1e-9).all()
