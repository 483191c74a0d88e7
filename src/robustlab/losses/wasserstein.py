"""The Wasserstein loss on the label space (spec wpgd.md section 2): optimal transport from the predicted
distribution to the target under a ground cost C (a label metric, already raised to the power p).

For a one-hot target kappa every plan sends all mass to kappa, so the distance is the closed form
sum_k C[kappa, k] q_k; the entropic term subtracts entropy_weight * H(q) / log K. For soft targets, `ot_exact`
solves the transport LP (value; gradient from the dual potentials) and `ot_sinkhorn` the entropic OT by
unrolled Sinkhorn iterations (differentiable).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.errors import InputError


def wasserstein_onehot(logits: Tensor, y: Tensor, cost: Tensor, entropy_weight: float = 0.0) -> Tensor:
    """Per-sample l_W = sum_k C[y, k] softmax(z)_k - entropy_weight * H(softmax(z)) / log K."""
    logp = F.log_softmax(logits, 1)
    q = logp.exp()
    c = cost.to(logits)[y]
    loss = (c * q).sum(1)
    if entropy_weight:
        h = -(q * logp).sum(1)
        loss = loss - entropy_weight * h / math.log(logits.shape[1])
    return loss


def log_wasserstein_onehot(logits: Tensor, y: Tensor, cost: Tensor) -> Tensor:
    """log sum_k C[y, k] q_k = logsumexp(z + log C[y]) - logsumexp(z): stable when the model is confident (the
    plain form's gradient underflows to zero there). Same sign-PGD / normalised-PGD iterates as l_W
    (wpgd.md 2.3); -inf only for a row of zero costs (a class that costs nothing to mistake)."""
    c = cost.to(logits)[y]
    return torch.logsumexp(logits + torch.log(c), 1) - torch.logsumexp(logits, 1)


class WassersteinAttackLoss:
    """Attack objective (logits, y, target) -> (N,) for PGD: the log form when entropy_weight = 0, else l_W."""

    def __init__(self, cost: Tensor, entropy_weight: float = 0.0) -> None:
        self.cost, self.entropy_weight = cost, float(entropy_weight)

    def __call__(self, logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        if target is not None:
            raise InputError("the Wasserstein attack loss is untargeted (it spreads the mass by the metric)")
        if self.entropy_weight:
            return wasserstein_onehot(logits, y, self.cost, self.entropy_weight)
        out = log_wasserstein_onehot(logits, y, self.cost)
        # a sample whose whole cost row is zero has no direction to push: a finite constant keeps PGD's sum finite
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


class _ExactOT(torch.autograd.Function):
    """OT value between rows of q and t (N, K) by the transport LP (scipy HiGHS); the gradient w.r.t. q is the
    source dual potential (centred: q lives on the simplex)."""

    @staticmethod
    def forward(ctx, q: Tensor, t: Tensor, cost: Tensor) -> Tensor:
        from scipy.optimize import linprog

        k = q.shape[1]
        c = cost.detach().cpu().double().numpy().ravel()
        a_eq = np.zeros((2 * k, k * k))
        for i in range(k):
            a_eq[i, i * k:(i + 1) * k] = 1  # row sums: the source marginal q
            a_eq[k + i, i::k] = 1  # column sums: the target marginal t
        vals, duals = [], []
        for qi, ti in zip(q.detach().cpu().double().numpy(), t.detach().cpu().double().numpy()):
            b = np.concatenate([qi, ti])
            res = linprog(c, A_eq=a_eq[:-1], b_eq=b[:-1], bounds=(0, None), method="highs")  # one redundant row
            if res.status != 0:
                raise RuntimeError(f"transport LP failed: {res.message}")
            vals.append(res.fun)
            f = res.eqlin.marginals[:k]
            duals.append(f - f.mean())
        ctx.save_for_backward(torch.as_tensor(np.array(duals), dtype=q.dtype, device=q.device))
        return torch.as_tensor(np.array(vals), dtype=q.dtype, device=q.device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (f,) = ctx.saved_tensors
        return grad[:, None] * f, None, None


def ot_exact(q: Tensor, t: Tensor, cost: Tensor) -> Tensor:
    """Exact OT value per row (N,) between distributions q and t (N, K) under cost (K, K); differentiable in q."""
    _check_dists(q, t, cost)
    return _ExactOT.apply(q, t, cost)


def ot_sinkhorn(q: Tensor, t: Tensor, cost: Tensor, reg: float = 0.01, iters: int = 500) -> Tensor:
    """Entropic OT <P, C> with P from log-domain Sinkhorn (reg = entropy strength), differentiable by unrolling;
    approaches the exact value as reg -> 0."""
    _check_dists(q, t, cost)
    c = cost.to(q)
    log_q, log_t = torch.log(q.clamp_min(1e-30)), torch.log(t.clamp_min(1e-30))
    f = torch.zeros_like(q)
    g = torch.zeros_like(t)
    for _ in range(iters):
        f = reg * (log_q - torch.logsumexp((g[:, None, :] - c[None]) / reg, 2))
        g = reg * (log_t - torch.logsumexp((f[:, :, None] - c[None]) / reg, 1))
    plan = torch.exp((f[:, :, None] + g[:, None, :] - c[None]) / reg)
    return (plan * c[None]).sum((1, 2))


def wasserstein_soft(logits: Tensor, target: Tensor, cost: Tensor, method: str = "exact", reg: float = 0.01) -> Tensor:
    """OT between softmax(logits) and a soft target distribution (N, K); method exact (LP) or sinkhorn."""
    q = F.softmax(logits, 1)
    if method == "exact":
        return ot_exact(q, target, cost)
    if method == "sinkhorn":
        return ot_sinkhorn(q, target, cost, reg)
    raise InputError(f"unknown OT method {method!r}; valid: exact, sinkhorn")


def _check_dists(q: Tensor, t: Tensor, cost: Tensor) -> None:
    if q.shape != t.shape or q.dim() != 2 or cost.shape != (q.shape[1], q.shape[1]):
        raise InputError(f"OT needs q and t of shape (N, K) and a K x K cost; got {tuple(q.shape)}, {tuple(t.shape)}, "
                         f"{tuple(cost.shape)}")
    for name, d in (("q", q), ("t", t)):
        if (d < -1e-9).any() or not torch.allclose(d.sum(1), torch.ones_like(d.sum(1)), atol=1e-5):
            raise InputError(f"{name} rows must be probability distributions (non-negative, summing to 1)")


__all__ = ["wasserstein_onehot", "log_wasserstein_onehot", "WassersteinAttackLoss", "ot_exact", "ot_sinkhorn",
           "wasserstein_soft"]
