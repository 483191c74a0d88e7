"""Robustness evaluation: clean accuracy, robust accuracy per attack, union and average accuracy, per-class
accuracy, confusion matrices, minimal-perturbation statistics and the passes spent.

Convention (AutoAttack): a sample is robust to an attack iff its clean prediction is correct and its
adversarial prediction is correct, so robust accuracy <= clean accuracy always. Each attack runs on
every clean-correct sample (per-attack numbers are not conditioned on the order of the panel); the
union counts a sample only if it survives every attack. Every x_adv is checked against its threat
model (and the [0, 1] box) before it is judged: a violation is an error, never a silent number.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.attacks.base import PRECISIONS, Attack, attack_mode
from robustlab.attacks.spec import create_attack, parse_attack_spec
from robustlab.engine.integrity import check_integrity
from robustlab.errors import InputError, InputTypeError
from robustlab.registry import ATTACKS
from robustlab.threat import make_threat, per_sample_norm
from robustlab.types import AttackOut
from robustlab.utils import progress_bar
from robustlab.validation import check_choice, check_fits_model, check_images, check_labels, check_logits, check_positive_int


class ThreatViolation(RuntimeError):
    """An attack returned a point outside its threat model (a bug in the attack, never a result)."""


def _unique_names(attacks: Sequence[Attack]) -> list[str]:
    names = [a.name for a in attacks]
    out = []
    for a in attacks:
        base = a.name
        if names.count(base) > 1:
            base = f"{a.name}-{a.norm}" if a.norm else a.name
            eps = a.describe().get("eps")
            if sum(1 for b in attacks if b.name == a.name and b.norm == a.norm) > 1 and eps is not None:
                base = f"{base}-{eps:g}" if isinstance(eps, (int, float)) else base
        k, cand = 2, base
        while cand in out:
            cand, k = f"{base}-{k}", k + 1
        out.append(cand)
    return out


def check_setup(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """AutoAttack-style sanity checks on one batch; returns (and warns) the problems found."""
    problems: list[str] = []
    if model.training:
        problems.append("the model is in train mode; evaluation switches it to eval mode (BatchNorm running "
                        "statistics, no dropout). Call model.eval() to silence this warning.")
    with attack_mode(model):
        xs = x[: min(32, x.shape[0])].detach()
        with torch.no_grad():
            a, b = check_logits(model(xs), xs.shape[0]), check_logits(model(xs), xs.shape[0])
        check_labels(y, y.shape[0], num_classes=a.shape[1])
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            problems.append("two forward passes on the same input differ: the model is randomised, and attacks that "
                            "follow one noisy gradient overestimate its robustness; use "
                            "\"autoattack:version=rand\" (APGD-CE and APGD-DLR with 20 EoT passes per step) or eot=K "
                            "on pgd / apgd-ce")
        if (a >= 0).all() and torch.allclose(a.sum(1), torch.ones_like(a.sum(1)), atol=1e-4):
            problems.append("the model seems to output probabilities (rows are non-negative and sum to 1); "
                            "attacks expect logits. Remove the final softmax.")
        xg = xs.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xg), y[: xs.shape[0]].long(), reduction="sum")
            (g,) = torch.autograd.grad(loss, xg)
        zero = (g.flatten(1).abs().amax(1) == 0).float().mean().item()
        if zero > 0.5:
            problems.append(f"the input gradient is exactly zero for {zero:.0%} of samples: gradient masking or a "
                            "non-differentiable model; gradient-based robust accuracy will be overestimated")
    for p in problems:
        warnings.warn(p, RuntimeWarning, stacklevel=3)
    return problems


def _batches(x: Tensor | None, y: Tensor | None, loader: Iterable | None, batch_size: int):
    if loader is not None:
        for item in loader:
            if isinstance(item, dict):
                raise InputTypeError(f"the DataLoader yields dicts (keys {', '.join(map(str, item))}); evaluate needs "
                                     "(images, labels) pairs, e.g. a TensorDataset or a collate_fn returning (x, y)")
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise InputTypeError(f"the DataLoader yields {type(item).__name__}; evaluate needs (images, labels) "
                                     "pairs")
            yield item[0], item[1]
        return
    assert x is not None and y is not None  # evaluate passes tensors or a loader
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def _for_evaluation(spec: str, model: nn.Module, execution: dict[str, Any]) -> Attack:
    """The attack of a spec as evaluation runs it: an iterative attack that can keep its best iterate does
    (`best_iterate`: a sample counts as broken if any iterate fooled it, and leaves the batch then), unless the
    spec sets best_iterate itself; `execution` (precision, compile) applies where the spec does not set it. Attack
    objects passed to `evaluate` run as they were built."""
    name, opts = parse_attack_spec(spec)
    accepted = ATTACKS.options(name, 1)
    extra: dict[str, Any] = {"best_iterate": True} if "best_iterate" in accepted and "best_iterate" not in opts else {}
    for key, value in execution.items():
        if key not in opts and value != _EXECUTION_DEFAULTS[key]:
            if key not in accepted:
                raise InputError(f"attack {name!r} has no {key} option ({key}={value!r} was asked for the evaluation)")
            extra[key] = value
    return create_attack(spec, model, **extra)


_EXECUTION_DEFAULTS: dict[str, Any] = {"precision": "fp32", "compile": False}
# a bf16 attack whose robust accuracy on the first batch exceeds fp32's by more than this is flagged
BF16_TOLERANCE = 0.01
PRECISION_CHECK_SAMPLES = 200


def _precision_check(model: nn.Module, atk: Attack, x: Tensor, y: Tensor, robust: Tensor) -> dict[str, Any]:
    """Re-run a reduced-precision attack in fp32 on the first batch: does bf16 find as many adversarial points?
    robust: which of (x, y) survived the bf16 attack. Warns when bf16's robust accuracy is higher by more than
    BF16_TOLERANCE (the attack is weaker in bf16 on this model: its numbers are not trustworthy)."""
    x, y, robust = x[:PRECISION_CHECK_SAMPLES], y[:PRECISION_CHECK_SAMPLES], robust[:PRECISION_CHECK_SAMPLES]
    twin = copy.copy(atk)
    twin.precision, twin.compile = "fp32", False
    with attack_mode(model), torch.no_grad():
        correct = model(x).argmax(1) == y
    idx = correct.nonzero().squeeze(1)
    fp32_robust = torch.zeros_like(correct)
    if idx.numel():
        out = twin.run(x[idx], y[idx], with_success=False)
        with attack_mode(model), torch.no_grad():
            fp32_robust[idx] = model(out.x_adv).argmax(1) == y[idx]
    n = x.shape[0]
    low, full = robust.float().mean().item(), fp32_robust.float().mean().item()
    trusted = low - full <= BF16_TOLERANCE + 1e-6  # accuracies are float32 fractions: 1 point is 0.01 +- rounding
    if not trusted:
        warnings.warn(f"attack {atk.name!r} in {atk.precision} finds robust accuracy {low:.1%} on the first {n} samples, "
                      f"fp32 finds {full:.1%}: the {atk.precision} evaluation is not trustworthy for this model; "
                      "use precision='fp32'", RuntimeWarning, stacklevel=3)
    return {"n": n, "robust_accuracy": low, "fp32_robust_accuracy": full, "trusted": trusted}


def evaluate(
    model: nn.Module,
    x: Tensor | Iterable | None = None,
    y: Tensor | None = None,
    attacks: Sequence[Attack | str] = ("pgd:norm=linf,eps=0.3,steps=40",),
    *,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    n_samples: int | None = None,
    checks: bool = True,
    integrity: bool | None = None,
    keep_records: bool = False,
    keep_adversarials: bool = False,
    progress: bool | None = None,
    precision: str = "fp32",
    compile: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on (x, y) tensors or a DataLoader `x` yielding (x, y) batches.

    attacks: Attack objects bound to `model`, or spec strings ("pgd:norm=linf,eps=0.3,steps=40").
    checks: warn on suspicious setups (train mode, randomness, probabilities, zero gradients) before attacking.
    integrity (default: as `checks`): the integrity checks of `robustlab.engine.integrity` on a probe of the first
    batch (zero-gradient share, unbounded attack, black-box vs white-box, monotonicity in eps).
    Returns a JSON-serialisable dict: clean_accuracy, attacks{name: robust_accuracy, norm, eps, passes, ...},
    union_accuracy, average_accuracy (over attacks), per_norm, norm_average_accuracy (over norms), per_class,
    confusion, n_samples, integrity (when run; `integrity.ok` false means: do not trust the numbers)
    (+ records if asked); per attack also `seconds` (wall-clock time of its runs) and `adversarial_check` (largest
    perturbation in its norm, NaN count, range of x_adv). keep_adversarials: `result["adversarials"][name]` is the
    float tensor of every sample's adversarial example (x itself where the clean prediction was wrong); it is not
    JSON and callers pop it before writing.
    precision ("fp32" | "bf16") and compile: how the attacks given as spec strings run the model's forward (bf16
    autocast with fp32 gradients and projections; `torch.compile`). Adversarial points are always judged in fp32;
    a bf16 attack is re-run in fp32 on the first batch and warns if it is more than 1 point weaker there
    (`attacks.NAME.precision_check`).
    """
    check_positive_int(batch_size, "batch_size")
    if n_samples is not None:
        check_positive_int(n_samples, "n_samples")
    if isinstance(attacks, (str, Attack)) or not isinstance(attacks, (list, tuple)):
        raise InputTypeError(f"attacks must be a list of attack specs or Attack objects, got {attacks!r}; "
                             f"e.g. attacks=[{attacks!r}]" if isinstance(attacks, (str, Attack))
                             else f"attacks must be a list of attack specs or Attack objects, got {type(attacks).__name__}")
    integrity = checks if integrity is None else integrity
    loader = None
    if x is not None and not isinstance(x, Tensor):
        loader, x = x, None
    elif x is None or y is None:
        raise InputError("evaluate needs images x and labels y (or a DataLoader as x)")
    else:
        check_images(x)
        check_labels(y, x.shape[0])
        check_fits_model(model, x)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    check_choice(precision, "precision", PRECISIONS)
    execution = {"precision": precision, "compile": bool(compile)}
    built = [_for_evaluation(a, model, execution) if isinstance(a, str) else a for a in attacks]
    for given, a in zip(attacks, built):
        if not isinstance(a, Attack):
            raise InputTypeError(f"attacks must be Attack objects or spec strings, got {type(a).__name__}")
        if not isinstance(given, str) and execution != _EXECUTION_DEFAULTS:
            raise InputError(f"precision and compile apply to attacks given as spec strings; attack {a.name!r} is an "
                             "object: build it with precision=/compile= instead")
        if a.model is not model:
            raise InputError(f"attack {a.name!r} is bound to a different model than the one evaluated")
    names = _unique_names(built)
    was_training = model.training

    labels: list[Tensor] = []
    clean_pred: list[Tensor] = []
    robust: dict[str, list[Tensor]] = {n: [] for n in names}
    adv_pred: dict[str, list[Tensor]] = {n: [] for n in names}
    norms: dict[str, list[Tensor]] = {n: [] for n in names}
    l2: dict[str, list[Tensor]] = {n: [] for n in names}
    xnorm: list[Tensor] = []
    passes = {n: [0, 0] for n in names}
    seconds = {n: 0.0 for n in names}
    adv_stats = {n: [0.0, 0.0, math.inf, -math.inf] for n in names}  # max perturbation, NaNs, min and max of x_adv
    adversarials: dict[str, list[Tensor]] = {n: [] for n in names}
    stages: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}  # AutoAttack-style per-stage log
    clean_passes = 0
    seen = 0
    first = True
    first_batch: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None
    with progress_bar(total=n_samples or (x.shape[0] if x is not None else None), desc="evaluate",
                      enabled=progress) as bar:
        for xb, yb in _batches(x, y, loader, batch_size):
            if n_samples is not None and seen >= n_samples:
                break
            if n_samples is not None:
                xb, yb = xb[: n_samples - seen], yb[: n_samples - seen]
            xb, yb = xb.to(device).float(), yb.to(device).long()
            if loader is not None:
                check_images(xb)
                check_labels(yb, xb.shape[0])
                if first:
                    check_fits_model(model, xb.float() if xb.dtype == torch.float64 else xb)
            if first and checks:
                check_setup(model, xb, yb)
                first = False
            with attack_mode(model):
                with torch.no_grad():
                    logits = check_logits(model(xb), xb.shape[0])
                check_labels(yb, xb.shape[0], num_classes=logits.shape[1])
                num_classes = logits.shape[1]
                pred = logits.argmax(1)
            clean_passes += xb.shape[0]
            correct = pred == yb
            labels.append(yb.cpu())
            clean_pred.append(pred.cpu())
            xnorm.append(torch.stack([per_sample_norm(xb, "l2"), per_sample_norm(xb - 0.5, "l2")], 1).cpu())
            idx = correct.nonzero().squeeze(1)
            for name, atk in zip(names, built):
                bar.set_postfix(attack=name)
                atk.report_progress = lambda msg, name=name: bar.set_postfix(attack=f"{name} ({msg})")
                rob = torch.zeros_like(correct)
                ap = pred.clone()
                nrm = torch.zeros(xb.shape[0], device=device)
                r2 = torch.zeros(xb.shape[0], device=device)
                start = time.perf_counter()
                if idx.numel():
                    xs, ys = xb[idx], yb[idx]
                    try:
                        out = atk.run(xs, ys, with_success=False)
                    finally:
                        atk.report_progress = None
                    passes[name][0] += out.forward
                    passes[name][1] += out.backward
                    for stage in atk.last_log:
                        acc = stages[name].setdefault(stage["attack"], dict.fromkeys(
                            ("robust", "seconds", "forward", "backward"), 0))
                        acc["robust"] += stage["robust_after"]
                        for key in ("seconds", "forward", "backward"):
                            acc[key] += stage[key]
                    _check_threat(atk, out, xs, name)
                    with attack_mode(model), torch.no_grad():
                        p_adv = model(out.x_adv).argmax(1)
                    clean_passes += xs.shape[0]
                    rob[idx] = p_adv == ys
                    ap[idx] = p_adv
                    r2[idx] = per_sample_norm(out.x_adv - xs, "l2")
                    dist = per_sample_norm(out.x_adv - xs, atk.norm or "l2")
                    if out.norms is not None:
                        # minimal attacks: inf marks a failure; count norms only where it fooled the model
                        nrm[idx] = torch.where(p_adv != ys, out.norms.to(nrm.dtype), torch.full_like(r2[idx], math.inf))
                    else:
                        nrm[idx] = dist
                    # the reference AutoAttack's closing check: largest perturbation, NaNs, the range of x_adv
                    stats = torch.stack([dist.max(), torch.isnan(out.x_adv).sum().to(dist.dtype), out.x_adv.min(),
                                         out.x_adv.max()]).tolist()
                    adv_stats[name] = [max(adv_stats[name][0], stats[0]), adv_stats[name][1] + stats[1],
                                       min(adv_stats[name][2], stats[2]), max(adv_stats[name][3], stats[3])]
                    if keep_adversarials:
                        x_keep = xb.clone()
                        x_keep[idx] = out.x_adv
                if keep_adversarials:
                    adversarials[name].append((x_keep if idx.numel() else xb).cpu())
                robust[name].append(rob.cpu())
                seconds[name] += time.perf_counter() - start  # .cpu() above waited for the device
                adv_pred[name].append(ap.cpu())
                norms[name].append(nrm.cpu())
                l2[name].append(r2.cpu())
            if first_batch is None:
                first_batch = (xb, yb, {n: robust[n][-1].to(device) for n in names})
            seen += xb.shape[0]
            bar.update(xb.shape[0])
    model.train(was_training)
    if seen == 0:
        raise InputError("no samples to evaluate")
    result = _aggregate(built, names, labels, clean_pred, robust, adv_pred, norms, l2, xnorm, passes, clean_passes,
                        keep_records, num_classes)
    n_attacked = int(sum(int((lab == p).sum()) for lab, p in zip(labels, clean_pred)))
    for name, atk in zip(names, built):
        result["attacks"][name]["seconds"] = seconds[name]
        pmax, nans, lo, hi = adv_stats[name]
        result["attacks"][name]["adversarial_check"] = {"max_perturbation": pmax, "nan": int(nans),
                                                        "min": lo if math.isfinite(lo) else None,
                                                        "max": hi if math.isfinite(hi) else None}
        if keep_adversarials:
            result.setdefault("adversarials", {})[name] = torch.cat(adversarials[name])
        if stages[name]:
            result["attacks"][name]["stages"] = [
                {"attack": stage, "robust_accuracy": v["robust"] / result["n_samples"], "seconds": v["seconds"],
                 "passes_per_attacked_image": (v["forward"] + v["backward"]) / max(n_attacked, 1)}
                for stage, v in stages[name].items()]
        if atk.precision != "fp32" and first_batch is not None:
            xb, yb, rob_first = first_batch
            result["attacks"][name]["precision_check"] = _precision_check(model, atk, xb, yb, rob_first[name])
    model.train(was_training)
    if integrity and first_batch is not None:
        xb, yb, rob_first = first_batch
        accs = {n: result["attacks"][n]["robust_accuracy"] for n in names}
        result["integrity"] = check_integrity(model, xb, yb, list(zip(names, built)), rob_first, accs)
        model.train(was_training)
    return result


def _check_threat(atk: Attack, out: AttackOut, x: Tensor, name: str) -> None:
    """x_adv against the threat model the attack used for this batch (a per-pixel budget map for Pixel-AG), else the
    attack's own threat model, else (minimal attacks with a budget) the ball of that budget, else the box."""
    x_adv = out.x_adv
    threat = out.threat if out.threat is not None else atk.threat
    eps = getattr(atk, "eps_value", None)
    if threat is None and eps is not None and atk.norm:
        threat = make_threat(atk.norm, eps)
    if threat is not None:
        ok = threat.contains(x_adv, x)
        what = f"its {threat.norm} ball" + (" (per-element budget)" if out.threat is not None else "")
    else:  # unbounded minimal-perturbation attack: only the box applies
        ok = (x_adv.flatten(1).amin(1) >= -1e-6) & (x_adv.flatten(1).amax(1) <= 1 + 1e-6)
        what = "the [0, 1] box"
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise ThreatViolation(f"attack {name!r} returned {bad} point(s) outside {what}; this is a bug in the attack")


def _confusion(y: Tensor, p: Tensor, k: int) -> list[list[int]]:
    m = torch.zeros(k * k, dtype=torch.long)
    m.index_add_(0, y * k + p, torch.ones_like(y))
    return m.view(k, k).tolist()


def _aggregate(built, names, labels, clean_pred, robust, adv_pred, norms, l2, xnorm, passes, clean_passes,
               keep_records, num_classes: int) -> dict[str, Any]:
    y = torch.cat(labels)
    pred = torch.cat(clean_pred)
    n = y.shape[0]
    k = num_classes
    correct = pred == y
    xn, xgray = torch.cat(xnorm).unbind(1)  # ||x||_2 and ||x - 0.5||_2 (C&W's failure image is constant 0.5)
    result: dict[str, Any] = {"n_samples": n, "num_classes": k, "clean_accuracy": correct.float().mean().item(), "attacks": {}}
    union = correct.clone()
    per_norm: dict[str, Tensor] = {}
    for name, atk in zip(names, built):
        rob = torch.cat(robust[name])
        union &= rob
        if atk.norm:
            per_norm[atk.norm] = per_norm.get(atk.norm, correct.clone()) & rob
        n_att = int(correct.sum())
        entry: dict[str, Any] = {
            "robust_accuracy": rob.float().mean().item(),
            **{k2: (v if not isinstance(v, Tensor) else "tensor") for k2, v in atk.describe().items() if k2 != "attack"},
            "attack": atk.name,
            "passes": {"forward": passes[name][0], "backward": passes[name][1],
                       "per_attacked_image": (passes[name][0] + passes[name][1]) / max(n_att, 1)},
            "confusion": _confusion(y, torch.cat(adv_pred[name]), k),
        }
        if atk.minimal:
            nr = torch.cat(norms[name])
            r2 = torch.cat(l2[name])
            fooled = correct & torch.isfinite(nr)
            failed = correct & ~torch.isfinite(nr)
            r2_used = torch.where(correct, r2, torch.zeros_like(r2))  # misclassified points: r = 0
            ok = ~failed
            rho = (r2_used[ok] / xn[ok].clamp_min(1e-12)).mean().item() if ok.any() else float("nan")
            # the original C&W code returns a constant 0.5 image on failure; its scripts also log rho with those
            r2_gray = torch.where(failed, xgray, r2_used)
            rho_gray = (r2_gray / xn.clamp_min(1e-12)).mean().item()
            entry["perturbation"] = {
                "norm": atk.norm,
                "mean": nr[fooled].mean().item() if fooled.any() else None,
                "median": nr[fooled].median().item() if fooled.any() else None,
                "mean_l2": r2[fooled].mean().item() if fooled.any() else None,
                "median_l2": r2[fooled].median().item() if fooled.any() else None,
                "rho": rho,
                "rho_with_failures_as_gray": rho_gray,
                "n_failed": int(failed.sum()),
                "rho_convention": "mean ||r||_2/||x||_2 over all samples, misclassified ones with r = 0, "
                                  "failed attacks excluded (counted in n_failed); rho_with_failures_as_gray counts "
                                  "each failure as the constant 0.5 image the original C&W code returns",
            }
        result["attacks"][name] = entry
    result["union_accuracy"] = union.float().mean().item()
    accs = [e["robust_accuracy"] for e in result["attacks"].values()]
    result["average_accuracy"] = sum(accs) / len(accs) if accs else None
    result["per_norm"] = {p: v.float().mean().item() for p, v in per_norm.items()}
    # the multi-perturbation papers' Acc_avg: the mean of the per-norm (worst case over that norm's attacks) accuracies
    result["norm_average_accuracy"] = (sum(result["per_norm"].values()) / len(per_norm)) if per_norm else None
    per_class = {}
    for c in range(k):
        m = y == c
        if not m.any():
            continue
        per_class[str(c)] = {
            "n": int(m.sum()),
            "clean_accuracy": correct[m].float().mean().item(),
            "union_accuracy": union[m].float().mean().item(),
            "attacks": {name: torch.cat(robust[name])[m].float().mean().item() for name in names},
        }
    result["per_class"] = per_class
    result["confusion"] = {"clean": _confusion(y, pred, k)}
    result["passes"] = {"clean_and_judging_forward": clean_passes}
    if keep_records:
        result["records"] = {"label": y.tolist(), "clean_pred": pred.tolist(),
                             "robust": {nm: torch.cat(robust[nm]).tolist() for nm in names}}
    return result
