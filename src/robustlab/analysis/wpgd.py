"""Analyses of adversarial training from the WPGD paper (spec wpgd.md section 5); each writes a PNG and a JSON
of the numbers behind it. `robustlab analyze ...` is the command group.

- `accuracy_gap`: G = |C_pgd - C_ce| (row-normalised clean confusion matrices) beside the label metric, and
  their Pearson / Spearman correlation over the off-diagonal pairs (the seed's Table 1).
- `entropy_histograms`: softmax entropies of the test images of one class, per model.
- `tsne_features`: t-SNE of the penultimate features (the input of the last Linear layer) + silhouette score.
- `toy3`: the 3-class 2-D problem with the seed's cost matrix; decision regions of CE, PGD and WPGD training.
- `two_class`: balanced and unbalanced (ratio 0.3) two-class training curves, CE vs PGD, per class pair.
- `weighted_score`: adversarial confusion matrices M under the Wasserstein-maximising attack and
  S = sum C_ij M_ij per model, relative to a reference model.
- `directional`: per-pair robustness 1 - M_ij of two models and their difference (the seed's Fig. 11).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import PassCounter, attack_mode
from robustlab.attacks.pgd import pgd
from robustlab.errors import InputError
from robustlab.label_metrics.metric import check_metric
from robustlab.outputs import atomic_save_figure, atomic_write_text
from robustlab.threat import L2Ball


def _write(path: str | Path, fig, data: dict[str, Any]) -> Path:
    from robustlab.reports.plots import pyplot

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
    pyplot().close(fig)
    atomic_write_text(path.with_suffix(".json"), json.dumps(data, indent=1))
    return path


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def confusion(y: Tensor, pred: Tensor, k: int) -> Tensor:
    """Row-normalised confusion matrix (rows: true class; a class with no samples gets a zero row)."""
    m = torch.zeros(k * k, dtype=torch.float64)
    m.index_add_(0, (y * k + pred).cpu(), torch.ones(y.shape[0], dtype=torch.float64))
    m = m.view(k, k)
    return m / m.sum(1, keepdim=True).clamp_min(1)


def correlation(a: Tensor, b: Tensor, include_diagonal: bool = False) -> dict[str, float]:
    """Pearson and Spearman correlation of two K x K matrices over their off-diagonal entries."""
    from scipy.stats import pearsonr, spearmanr

    mask = torch.ones_like(a, dtype=torch.bool) if include_diagonal else ~torch.eye(a.shape[0], dtype=torch.bool)
    u, v = a[mask].double().numpy(), b[mask].double().numpy()
    if u.std() == 0 or v.std() == 0:  # undefined (e.g. two identical models: no gap anywhere)
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(pearsonr(u, v)[0]), "spearman": float(spearmanr(u, v)[0])}


def _heat(ax, m, title, labels, cmap="viridis", vmin=None, vmax=None):
    im = ax.imshow(np.asarray(m), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9)
    k = len(labels)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_yticklabels(labels, fontsize=6)
    return im


def accuracy_gap(ce_model: nn.Module, robust_model: nn.Module, x: Tensor, y: Tensor, metric: Tensor, path,
                 class_names: Sequence[str] | None = None, include_diagonal: bool = False) -> dict[str, Any]:
    k = metric.shape[0]
    check_metric(metric, k)
    off = metric[~torch.eye(k, dtype=torch.bool)]
    if off.max() == off.min():
        raise InputError("the label metric is constant off the diagonal: its correlation with the gap is undefined; "
                         "use a visual, WordNet or file metric")
    c_ce = confusion(y, predictions(ce_model, x), k)
    c_pgd = confusion(y, predictions(robust_model, x), k)
    gap = (c_pgd - c_ce).abs()
    corr = correlation(gap, metric.double(), include_diagonal)
    names = list(class_names or [str(i) for i in range(k)])
    from robustlab.reports.plots import pyplot

    fig, axes = pyplot().subplots(1, 2, figsize=(9, 4))
    fig.colorbar(_heat(axes[0], gap, "accuracy gap |C_pgd - C_ce|", names), ax=axes[0])
    fig.colorbar(_heat(axes[1], metric, "label metric", names), ax=axes[1])
    fig.suptitle(f"Pearson {corr['pearson']:.2f}, Spearman {corr['spearman']:.2f} (off-diagonal pairs)", fontsize=9)
    data = {"gap": gap.tolist(), "metric": metric.tolist(), "confusion_ce": c_ce.tolist(),
            "confusion_robust": c_pgd.tolist(), **corr, "include_diagonal": include_diagonal, "n": int(y.shape[0])}
    _write(path, fig, data)
    return data


@torch.no_grad()
def entropy_histograms(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, path, class_index: int | None = 0,
                       bins: int = 50) -> dict[str, Any]:
    """Entropy (nats) of softmax outputs on the test images of `class_index` (all images if None)."""
    xs = x if class_index is None else x[y == class_index]
    if xs.shape[0] == 0:
        raise InputError(f"no test images of class {class_index}")
    from robustlab.reports.plots import pyplot

    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    out: dict[str, Any] = {"class": class_index, "n": int(xs.shape[0]), "models": {}}
    top = 0.0
    for name, m in models.items():
        m.eval()
        logp = F.log_softmax(m(xs), 1)
        top = float(math.log(logp.shape[1]))
        h = -(logp.exp() * logp).sum(1).cpu().numpy()
        hist, edges = np.histogram(h, bins=bins, range=(0, top), density=True)
        ax.hist(h, bins=edges, alpha=0.5, density=True, label=name)
        out["models"][name] = {"mean_entropy": float(h.mean()), "histogram": hist.tolist()}
    out["bin_edges"] = np.linspace(0, top, bins + 1).tolist()
    ax.set_xlabel("entropy of the softmax output (nats)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    _write(path, fig, out)
    return out


def penultimate_features(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """The input of the model's last nn.Linear layer (WRN: after the final BN + ReLU + pooling)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise InputError("the model has no Linear layer to take penultimate features from")
    feats: list[Tensor] = []
    hook = last[-1].register_forward_pre_hook(lambda mod, inp: feats.append(inp[0].detach().flatten(1)))
    try:
        predictions(model, x, batch_size)
    finally:
        hook.remove()
    return torch.cat(feats)


def tsne_features(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, path, n_per_class: int = 500,
                  seed: int = 0, perplexity: float = 30.0) -> dict[str, Any]:
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    from robustlab.reports.plots import pyplot

    idx = torch.cat([(y == c).nonzero().squeeze(1)[:n_per_class] for c in torch.unique(y)])
    xs, ys = x[idx], y[idx].cpu().numpy()
    fig, axes = pyplot().subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    out: dict[str, Any] = {"n": int(len(idx)), "seed": seed, "models": {}}
    for ax, (name, m) in zip(axes[0], models.items()):
        f = penultimate_features(m, xs).cpu().numpy()
        emb = TSNE(n_components=2, perplexity=min(perplexity, len(idx) - 1), init="pca", random_state=seed).fit_transform(f)
        sil = float(silhouette_score(f, ys))
        ax.scatter(emb[:, 0], emb[:, 1], c=ys, cmap="tab10", s=4)
        ax.set_title(f"{name} (silhouette {sil:.3f})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        out["models"][name] = {"silhouette": sil, "embedding": emb.round(3).tolist()}
    out["labels"] = ys.tolist()
    _write(path, fig, out)
    return out


# -- the 3-class toy problem -------------------------------------------------------------------------------------

TOY_COST = ((0.0, 10.0, 0.01), (10.0, 0.0, 1.0), (0.01, 1.0, 0.0))  # the seed's cost matrix (wpgd.md 5.5)


def toy_data(seed: int = 0, n_per_class: int = 300, sigma: float = 0.3, sample_seed: int | None = None
             ) -> tuple[Tensor, Tensor]:
    """Each class: a mixture of 3 isotropic Gaussians with means uniform in [-2, 2]^2 (curved boundaries). The means
    come from `seed`; the points from `sample_seed` (default: the same), so a test set is the same mixture."""
    g = torch.Generator().manual_seed(seed)
    means = rng.rand(3, 3, 2, generator=g) * 4 - 2  # (class, component, xy)
    gs = g if sample_seed is None else torch.Generator().manual_seed(sample_seed)
    xs, ys = [], []
    for c in range(3):
        comp = rng.randint(0, 3, (n_per_class,), generator=gs)
        xs.append(means[c][comp] + sigma * rng.randn(n_per_class, 2, generator=gs))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def _toy_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, loss_fn, steps: int = 10) -> Tensor:
    """l_2 PGD in the plane (no box: the toy inputs are unbounded) from x, step 2.5 eps / steps, on the shared loop."""
    if eps == 0:
        return x
    threat = L2Ball(eps, box=(-math.inf, math.inf))
    return pgd(PassCounter(model), x, y, threat=threat, loss_fn=lambda logits, y, _t: loss_fn(logits, y), steps=steps,
               step_size=2.5 * eps / steps, random_start=False).x_adv.detach()


def train_toy(kind: str, eps: float, x: Tensor, y: Tensor, seed: int = 0, epochs: int = 2000, p: float = 1.0,
              lr: float = 1e-3) -> nn.Module:
    """MLP 2-64-64-3 (ReLU), Adam, full batch; kind: ce | pgd (CE inner loss) | wpgd (Wasserstein inner loss)."""
    from robustlab.label_metrics.metric import metric_power
    from robustlab.losses import ce_loss
    from robustlab.losses.wasserstein import WassersteinAttackLoss

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    inner = ce_loss if kind == "pgd" else WassersteinAttackLoss(metric_power(torch.tensor(TOY_COST), p).float())
    for _ in range(epochs):
        xa = x if kind == "ce" else _toy_attack(model, x, y, eps, inner)
        loss = F.cross_entropy(model(xa), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def toy3(path, eps_list: Sequence[float] = (0.1, 0.25, 0.5), seeds: Sequence[int] = (0,), epochs: int = 2000,
         p: float = 1.0, grid: int = 121, lr: float = 1e-3) -> dict[str, Any]:
    """Decision regions of CE, PGD and WPGD (per eps) on the toy problem, one row of panels per seed (the seed draws
    the mixture, the initialisation and the attacks); accuracy on classes {0, 2} (the cheap pair, cost 0.01) and the
    fraction of the plane whose prediction changed from the CE model's. With several seeds, `check` holds the spec's
    check per eps (wpgd.md 5.5: accuracy on {0, 2} averaged over the seeds higher for WPGD than for PGD) beside the
    WPGD - PGD difference paired by seed with its t interval and verdict."""
    from robustlab.analysis.intervals import paired_difference
    from robustlab.reports.plots import pyplot

    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"the toy problem needs one or more distinct seeds, got {seeds}")
    if not (epochs >= 1 and lr > 0):
        raise InputError(f"the toy problem needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    lim = 3.0
    t = torch.linspace(-lim, lim, grid)
    gx, gy = torch.meshgrid(t, t, indexing="xy")
    plane = torch.stack([gx.flatten(), gy.flatten()], 1)
    cols = 1 + 2 * len(eps_list)
    fig, axes = pyplot().subplots(len(seeds), cols, figsize=(2.6 * cols, 3.1 * len(seeds)), squeeze=False)
    out: dict[str, Any] = {"cost": TOY_COST, "p": p, "seeds": seeds, "epochs": epochs, "lr": lr, "models": []}
    for row, seed in zip(axes, seeds):
        x, y = toy_data(seed)
        test_x, test_y = toy_data(seed, sample_seed=seed + 1000)  # the same mixture, fresh points
        sel = (test_y == 0) | (test_y == 2)
        ce = train_toy("ce", 0.0, x, y, seed, epochs, p, lr)
        with torch.no_grad():
            ce_plane = ce(plane).argmax(1)
        runs = [("ce", 0.0, ce)] + [(k, e, train_toy(k, e, x, y, seed, epochs, p, lr)) for e in eps_list
                                    for k in ("pgd", "wpgd")]
        for ax, (kind, eps, m) in zip(row, runs):
            with torch.no_grad():
                pred = m(plane).argmax(1)
                tp = m(test_x).argmax(1)
            acc = (tp == test_y).float().mean().item()
            acc02 = (tp[sel] == test_y[sel]).float().mean().item()
            ax.imshow(pred.view(grid, grid).numpy(), origin="lower", extent=[-lim, lim, -lim, lim], cmap="brg",
                      alpha=0.35, vmin=0, vmax=2)
            ax.scatter(x[:, 0], x[:, 1], c=y, cmap="brg", s=2, vmin=0, vmax=2)
            what = kind if kind == "ce" else f"{kind} eps {eps:g}"
            ax.set_title(f"seed {seed}: {what}\nacc {acc:.2f}, acc{{0,2}} {acc02:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            changed = {f"{a}-{b}": _boundary_shift(ce_plane, pred, a, b) for a, b in ((0, 1), (0, 2), (1, 2))}
            out["models"].append({"seed": seed, "kind": kind, "eps": eps, "accuracy": acc, "accuracy_02": acc02,
                                  "changed_vs_ce": (pred != ce_plane).float().mean().item(), "region_change": changed})
    if len(seeds) > 1:
        out["check"] = {}
        for e in eps_list:
            acc02 = {k: [m["accuracy_02"] for m in out["models"] if m["kind"] == k and m["eps"] == e]
                     for k in ("pgd", "wpgd")}
            out["check"][f"{e:g}"] = {**acc02, "wpgd_mean_higher": math.fsum(acc02["wpgd"]) > math.fsum(acc02["pgd"]),
                                      "wpgd_minus_pgd": paired_difference(acc02["wpgd"], acc02["pgd"],
                                                                          names=("WPGD", "PGD"))}
    _write(path, fig, out)
    return out


def _boundary_shift(ref: Tensor, pred: Tensor, a: int, b: int) -> float:
    """Share of the plane predicted a or b by the CE model whose prediction moved between a and b."""
    inside = (ref == a) | (ref == b)
    moved = inside & ((pred == a) | (pred == b)) & (pred != ref)
    return moved.float().sum().item() / max(int(inside.sum()), 1)


# -- two-class problems --------------------------------------------------------------------------------------------

def two_class(path, *, dataset: str, pairs: Sequence[tuple[int, int]], ratio: float = 0.3, eps: float = 0.3,
              steps: int = 5, epochs: int = 5, model: str = "small-cnn", model_kwargs: dict | None = None,
              dataset_kwargs: dict | None = None, seed: int = 0, out_dir: str = "runs/two-class") -> dict[str, Any]:
    """For each pair (a, b): CE and PGD training on the balanced problem and on the one keeping only `ratio` of
    b's training images; validation error after every epoch (clean error of the clean test images)."""
    from robustlab.engine.config import TrainConfig
    from robustlab.engine.trainer import Trainer
    from robustlab.reports.plots import pyplot

    fig, axes = pyplot().subplots(len(pairs), 2, figsize=(8, 3 * len(pairs)), squeeze=False)
    out: dict[str, Any] = {"dataset": dataset, "ratio": ratio, "eps": eps, "runs": {}}
    for r, (a, b) in enumerate(pairs):
        for c, imbalance in enumerate((None, {b: ratio})):
            ax = axes[r, c]
            for method, kw in (("standard", {}), ("pgd-at", {"eps": eps, "steps": steps, "step_size": 2.5 * eps / steps})):
                cfg = TrainConfig(name=f"{a}-{b}-{'bal' if imbalance is None else 'unbal'}-{method}", dataset=dataset,
                                  dataset_kwargs=dataset_kwargs or {}, classes=[a, b], imbalance=imbalance,
                                  model=model, model_kwargs=model_kwargs or {}, method=method, method_kwargs=kw,
                                  epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                                  schedule="constant", eval_every=1, eval_samples=10 ** 6,
                                  eval_attack=f"pgd:norm=linf,eps={eps},steps=10", out_dir=out_dir, seed=seed,
                                  progress=False)
                hist = Trainer(cfg).fit()["history"]
                err = [1 - h["eval_clean"] for h in hist]
                ax.plot(range(1, len(err) + 1), err, label="CE" if method == "standard" else "PGD")
                out["runs"][cfg.name] = {"val_error": err, "robust_accuracy": [h.get("eval_robust") for h in hist]}
            ax.set_title(f"{a} vs {b}, {'balanced' if imbalance is None else f'{b} kept at {ratio:g}'}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("validation error")
            ax.legend(fontsize=8)
    _write(path, fig, out)
    return out


# -- adversarial confusion, weighted score, directional robustness -------------------------------------------------

def adversarial_confusion(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 20,
                          cost: Tensor | None = None, seed: int = 0, batch_size: int = 500) -> Tensor:
    """Row-normalised confusion matrix on adversarial test images: l_inf PGD (uniform start, step 2.5 eps/steps)
    maximising the Wasserstein loss under `cost` (the attacker knows the metric), or CE when cost is None."""
    from robustlab.losses import ce_loss
    from robustlab.losses.wasserstein import WassersteinAttackLoss
    from robustlab.threat import make_threat

    loss = ce_loss if cost is None else WassersteinAttackLoss(cost.to(x.device).float())
    preds = []
    gen = rng.device_generator(x.device, seed)
    with attack_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            adv = pgd(PassCounter(model), xb, yb, threat=make_threat("linf", eps), loss_fn=loss, steps=steps,
                      step_size=2.5 * eps / steps, generator=gen).x_adv
            with torch.no_grad():
                preds.append(model(adv).argmax(1))
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    return confusion(y.cpu(), torch.cat(preds).cpu(), num_classes)


def weighted_score(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, metric: Tensor, path, *, eps: float,
                   steps: int = 20, attack_p: float = 1.0, reference: str | None = None, seed: int = 0,
                   class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """S = sum_ij C_ij M_ij per model (M: adversarial confusion under the Wasserstein attack with C ** attack_p),
    reported relative to `reference` (default: the first model). Lower S: the mistakes land on nearer classes."""
    from robustlab.label_metrics.metric import metric_power
    from robustlab.reports.plots import pyplot

    k = metric.shape[0]
    check_metric(metric, k)
    names = list(class_names or [str(i) for i in range(k)])
    cost = metric_power(metric.double(), attack_p)
    out: dict[str, Any] = {"eps": eps, "steps": steps, "attack_p": attack_p, "models": {}}
    fig, axes = pyplot().subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        mat = adversarial_confusion(m, x, y, eps=eps, steps=steps, cost=cost, seed=seed)
        s = float((metric.double() * mat).sum())
        err = 1 - float(mat.diagonal().mean())
        _heat(ax, mat, f"{name}: S = {s:.3f}", names, vmin=0, vmax=1)
        out["models"][name] = {"S": s, "adversarial_error": err, "confusion": mat.tolist()}
    ref = reference or next(iter(models))
    if ref not in out["models"]:
        raise InputError(f"reference model {ref!r} is not among {list(models)}")
    for v in out["models"].values():
        v["S_minus_reference"] = v["S"] - out["models"][ref]["S"]
    out["reference"] = ref
    _write(path, fig, out)
    return out


def directional(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, path, *, eps: float, steps: int = 20,
                seed: int = 0, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-pair robustness R_ij = 1 - M_ij (share of class-i images not sent to j by CE PGD) for two models and
    the difference second - first (the seed's Fig. 11: PGD vs WPGD)."""
    from robustlab.reports.plots import pyplot

    if len(models) != 2:
        raise InputError(f"directional robustness compares two models, got {len(models)}")
    (na, ma), (nb, mb) = models.items()
    ra = 1 - adversarial_confusion(ma, x, y, eps=eps, steps=steps, seed=seed)
    rb = 1 - adversarial_confusion(mb, x, y, eps=eps, steps=steps, seed=seed)
    k = ra.shape[0]
    names = list(class_names or [str(i) for i in range(k)])
    off = ~torch.eye(k, dtype=torch.bool)
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 4))
    fig.colorbar(_heat(axes[0], ra, f"{na}: 1 - M", names, vmin=0.5, vmax=1), ax=axes[0])
    fig.colorbar(_heat(axes[1], rb, f"{nb}: 1 - M", names, vmin=0.5, vmax=1), ax=axes[1])
    diff = torch.where(off, rb - ra, torch.zeros_like(ra))
    lim = float(diff.abs().max()) or 1.0
    fig.colorbar(_heat(axes[2], diff, f"{nb} - {na}", names, cmap="RdBu", vmin=-lim, vmax=lim), ax=axes[2])
    out = {"eps": eps, "steps": steps, "robustness": {na: ra.tolist(), nb: rb.tolist()}, "difference": diff.tolist()}
    _write(path, fig, out)
    return out


__all__ = ["accuracy_gap", "confusion", "correlation", "entropy_histograms", "penultimate_features", "tsne_features",
           "toy_data", "train_toy", "toy3", "two_class", "adversarial_confusion", "weighted_score", "directional",
           "TOY_COST"]
