"""Threat models: exact projections, random starts inside the set, SLIDE steps, budgets, union."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from robustlab.errors import InputError
from robustlab.threat import L1Ball, L2Ball, LinfBall, make_threat, per_sample_norm
from robustlab.threat.lp import project_l1_ball


def _batch(n, c=1, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g, dtype=torch.float64)


def _l1_projection_bruteforce(v: np.ndarray, eps: float) -> np.ndarray:
    """Independent reference: root-find theta in sum(max(|v| - theta, 0)) = eps (scipy brentq)."""
    a = np.abs(v)
    if a.sum() <= eps:
        return v.copy()
    theta = brentq(lambda t: np.maximum(a - t, 0).sum() - eps, 0.0, a.max())
    return np.sign(v) * np.maximum(a - theta, 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 40), st.floats(0.01, 5.0), st.integers(0, 10_000))
def test_l1_projection_matches_bruteforce(n, d, eps, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64) * 3
    out = project_l1_ball(v, torch.tensor(eps, dtype=torch.float64))
    for i in range(n):
        ref = _l1_projection_bruteforce(v[i].numpy(), eps)
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-9)


def test_l1_projection_is_per_sample():
    """A sample already inside the ball is never touched, even when another sample is projected."""
    v = torch.tensor([[0.1, -0.2, 0.3], [3.0, -4.0, 5.0]], dtype=torch.float64)
    out = project_l1_ball(v, torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(out[0], v[0])
    assert out[1].abs().sum().item() == pytest.approx(1.0)


def test_l1_projection_per_sample_budget():
    v = torch.ones(2, 10, dtype=torch.float64)
    out = project_l1_ball(v, torch.tensor([2.0, 5.0], dtype=torch.float64))
    assert out.abs().sum(1).tolist() == pytest.approx([2.0, 5.0])


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.7), ("l1", 3.0)])
def test_projection_lands_in_set_and_is_idempotent(norm, eps):
    x = _batch(8)
    far = (x + torch.randn_like(x) * 2).clamp(-1, 2)
    t = make_threat(norm, eps)
    p = t.project(far, x)
    assert t.contains(p, x, tol=1e-9).all()
    assert torch.allclose(t.project(p, x), p, atol=1e-12)


def test_linf_projection_is_exact_euclidean():
    """Coordinate-wise clamp equals the nearest point of [x-eps, x+eps] ∩ [0,1] (check against a grid)."""
    x = _batch(1, h=1, w=3)
    t = LinfBall(0.2)
    z = x + torch.tensor([[[[0.5, -0.5, 0.05]]]], dtype=torch.float64)
    p = t.project(z, x)
    lo, hi = torch.maximum(x - 0.2, torch.zeros_like(x)), torch.minimum(x + 0.2, torch.ones_like(x))
    assert torch.allclose(p, torch.minimum(torch.maximum(z, lo), hi))


def test_exact_l2_projection_beats_scale_then_clip():
    x = torch.full((1, 1, 1, 4), 0.95, dtype=torch.float64)
    z = x + torch.tensor([[[[0.5, 0.5, -0.5, -0.5]]]], dtype=torch.float64)
    fast = L2Ball(0.3).project(z, x)
    exact = L2Ball(0.3, l2_proj="exact").project(z, x)
    assert L2Ball(0.3).contains(fast, x, tol=1e-9).all() and L2Ball(0.3).contains(exact, x, tol=1e-7).all()
    assert (exact - z).norm() <= (fast - z).norm() + 1e-12
    # exact projection saturates the budget when the target is outside
    assert per_sample_norm(exact - x, "l2").item() == pytest.approx(0.3, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["linf", "l2", "l1"]), st.floats(0.0, 2.0), st.integers(1, 5), st.integers(0, 1000))
def test_random_init_inside_ball_and_box(norm, eps, n, seed):
    x = _batch(n, seed=seed)
    t = make_threat(norm, min(eps, 1.0) if norm == "linf" else eps)  # l_inf budgets above 1 are refused (units)
    x0 = t.random_init(x, torch.Generator().manual_seed(seed))
    assert t.contains(x0, x, tol=1e-9).all()


def test_random_init_is_seeded():
    x = _batch(3)
    t = L1Ball(2.0)
    a = t.random_init(x, torch.Generator().manual_seed(5))
    b = t.random_init(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_slide_step_has_unit_l1_length_and_sparsity():
    g = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    e = L1Ball(5.0, q=0.99).ascent_direction(g)
    assert torch.allclose(e.flatten(1).abs().sum(1), torch.ones(4))
    nnz = (e.flatten(1) != 0).sum(1)
    assert (nnz <= 4).all() and (nnz >= 1).all()  # 1% of 300 coordinates -> 3 (ties kept)
    sign_ok = (torch.sign(e) == torch.sign(g)) | (e == 0)
    assert sign_ok.all()


def test_slide_zero_gradient_gives_zero_step():
    e = L1Ball(1.0).ascent_direction(torch.zeros(2, 1, 3, 3))
    assert (e == 0).all()


def test_slide_mask_saturated():
    x_adv = torch.zeros(1, 1, 1, 4)
    g = torch.tensor([[[[-5.0, 1.0, 0.5, 0.2]]]])
    e = L1Ball(1.0, q=0.5, mask_saturated=True).ascent_direction(g, x_adv)
    assert e[0, 0, 0, 0] == 0  # at the lower face and pushing outward: masked


def test_per_pixel_linf_budget():
    x = torch.full((2, 1, 2, 2), 0.5)
    eps = torch.tensor([[[[0.0, 0.1], [0.2, 0.3]]]])
    t = LinfBall(eps)
    p = t.project(x + 1.0, x)
    assert torch.allclose(p - x, eps.expand_as(x))
    x0 = t.random_init(x, torch.Generator().manual_seed(0))
    assert t.contains(x0, x).all()
    assert (x0[:, :, 0, 0] == 0.5).all()  # zero budget pixels never move


def test_per_sample_budget():
    x = torch.full((2, 1, 2, 2), 0.5)
    t = L2Ball(torch.tensor([0.1, 0.4]))
    p = t.project(x + 1.0, x)
    assert per_sample_norm(p - x, "l2").tolist() == pytest.approx([0.1, 0.4], abs=1e-6)


def test_per_pixel_budget_rejected_for_l2():
    with pytest.raises(ValueError, match="per sample"):
        L2Ball(torch.rand(1, 1, 4, 4))


def test_linf_budget_in_pixel_units_is_refused():
    with pytest.raises(InputError, match=r"8/255"):
        LinfBall(8.0)
    with pytest.raises(InputError, match="larger than the \\[0, 1\\] input range"):
        make_threat("linf", torch.tensor([0.1, 4.0]))
    LinfBall(1.0)  # the whole box: legitimate (unbounded-budget sanity checks)
    L2Ball(8.0)  # l_2 / l_1 budgets above 1 are ordinary
    L1Ball(10.0)


def test_bad_threat_arguments():
    with pytest.raises(ValueError, match="unknown norm"):
        make_threat("l3", 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        make_threat("linf", -0.1)
    with pytest.raises(ValueError, match="q"):
        L1Ball(1.0, q=1.5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 50), st.floats(0.0, 0.999), st.integers(0, 1000))
def test_slide_quantile_matches_torch_quantile(n, d, q, seed):
    from robustlab.threat.lp import _quantile_linear

    a = torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(_quantile_linear(a, q), torch.quantile(a, q, dim=1, keepdim=True), atol=1e-12)
