"""PGD / FGSM: exact agreement with a plain loop, strength, reductions."""
import pytest
import torch
import torch.nn.functional as F

from robustlab.attacks import FGSM, PGD


def reference_pgd(model, x, y, eps, alpha, steps, seed):
    """The textbook loop (Madry et al.), written independently of robustlab."""
    g = torch.Generator().manual_seed(seed)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def test_pgd_equals_reference_loop_exactly(mnist_cnn, mnist):
    x, y = mnist.x_test[:64], mnist.y_test[:64]
    ours = PGD(mnist_cnn, norm="linf", eps=0.3, steps=10, step_size=0.01, seed=3)(x, y)
    ref = reference_pgd(mnist_cnn, x, y, 0.3, 0.01, 10, seed=3)
    assert torch.equal(ours, ref)


def test_pgd_eps_one_drives_accuracy_to_zero(mnist_cnn, mnist):
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    x_adv = PGD(mnist_cnn, norm="linf", eps=1.0, steps=50, step_size=0.1)(x, y)
    with torch.no_grad():
        acc = (mnist_cnn(x_adv).argmax(1) == y).float().mean().item()
    assert acc <= 0.01


def test_pgd_one_step_no_start_equals_fgsm(mnist_cnn, mnist):
    x, y = mnist.x_test[:32], mnist.y_test[:32]
    a = PGD(mnist_cnn, eps=0.1, steps=1, step_size=0.1, random_start=False)(x, y)
    b = FGSM(mnist_cnn, eps=0.1)(x, y)
    assert torch.equal(a, b)


def test_pgd_is_batch_size_invariant_without_random_start(mnist_cnn, mnist):
    x, y = mnist.x_test[:16], mnist.y_test[:16]
    atk = PGD(mnist_cnn, eps=0.1, steps=5, random_start=False)
    full = atk(x, y)
    parts = torch.cat([atk(x[:5], y[:5]), atk(x[5:], y[5:])])
    assert torch.allclose(full, parts, atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("l2", 2.0), ("l1", 15.0)])
def test_pgd_other_norms_hurt(mnist_cnn, mnist, norm, eps):
    x, y = mnist.x_test[:100], mnist.y_test[:100]
    with torch.no_grad():
        clean = (mnist_cnn(x).argmax(1) == y).float().mean()
    x_adv = PGD(mnist_cnn, norm=norm, eps=eps, steps=20, step_size=eps / 8)(x, y)
    with torch.no_grad():
        adv = (mnist_cnn(x_adv).argmax(1) == y).float().mean()
    assert adv < clean - 0.2


def test_restarts_never_worse(mnist_cnn, mnist):
    x, y = mnist.x_test[:100], mnist.y_test[:100]
    one = PGD(mnist_cnn, eps=0.1, steps=5, restarts=1).run(x, y)
    three = PGD(mnist_cnn, eps=0.1, steps=5, restarts=3).run(x, y)
    assert three.success.sum() >= one.success.sum()


def test_targeted_pgd_reaches_target(mnist_cnn, mnist):
    x, y = mnist.x_test[:50], mnist.y_test[:50]
    t = (y + 1) % 10
    out = PGD(mnist_cnn, eps=1.0, steps=50, step_size=0.1).run(x, y, target=t)
    with torch.no_grad():
        hit = (mnist_cnn(out.x_adv).argmax(1) == t).float().mean()
    assert hit >= 0.98
    assert torch.equal(out.success, mnist_cnn(out.x_adv).argmax(1) == t)


def test_robust_accuracy_non_increasing_in_eps_and_steps(mnist_cnn, mnist):
    x, y = mnist.x_test[:150], mnist.y_test[:150]

    def acc(**kw):
        x_adv = PGD(mnist_cnn, **kw)(x, y)
        with torch.no_grad():
            return ((mnist_cnn(x_adv).argmax(1) == y) & (mnist_cnn(x).argmax(1) == y)).float().mean().item()

    by_eps = [acc(eps=e, steps=20, step_size=e / 8) for e in (0.02, 0.05, 0.1, 0.2)]
    assert all(a >= b - 0.01 for a, b in zip(by_eps, by_eps[1:]))
    by_steps = [acc(eps=0.1, steps=s, step_size=0.025) for s in (2, 10, 40)]
    assert all(a >= b - 0.01 for a, b in zip(by_steps, by_steps[1:]))
