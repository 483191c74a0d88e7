"""Robustness evaluation: clean accuracy, robust accuracy per attack, union and average accuracy, per-class
accuracy, confusion matrices, minimal-perturbation statistics and the passes spent.

Convention (AutoAttack): a sample is robust to an attack iff its clean prediction is correct and its
adversarial prediction is correct, so robust accuracy <= clean accuracy always. Each attack runs on
every clean-correct sample (per-attack numbers are not conditioned on the order of the panel); the
union counts a sample only if it survives every attack. Every x_adv is checked against its threat
model (and the [0, 1] box) before it is judged: a violation is an error, never a silent number.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.attacks.autoattack import AutoAttack
from robustlab.attacks.base import PRECISIONS, Attack, attack_mode
from robustlab.attacks.spec import create_attack, parse_attack_spec
from robustlab.engine.integrity import (
    FULL_PLAN,
    INTEGRITY_MODES,
    ProbePlan,
    attack_budget,
    bounded_norms,
    finish_integrity,
    probe_integrity,
    probe_plan,
)
from robustlab.errors import InputError, InputTypeError, ResumeError
from robustlab.registry import ATTACKS
from robustlab.threat import check_within, make_threat, per_sample_norm
from robustlab.types import AttackOut
from robustlab.utils import mix_seed, progress_bar
from robustlab.validation import check_choice, check_fits_model, check_images, check_labels, check_logits, check_positive_int


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


def is_randomised(model: nn.Module, x: Tensor) -> bool:
    """Two forward passes (eval mode, up to 32 images of x) that differ: the model has randomness in its forward
    pass, and its robust accuracy is an expectation over that randomness."""
    with attack_mode(model), torch.no_grad():
        xs = x[: min(32, x.shape[0])].detach()
        a, b = check_logits(model(xs), xs.shape[0]), check_logits(model(xs), xs.shape[0])
    return not torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def check_setup(model: nn.Module, x: Tensor, y: Tensor, randomised: bool | None = None) -> list[str]:
    """AutoAttack-style sanity checks on one batch; returns (and warns) the problems found. randomised: what
    `is_randomised` found on this batch (found here when not given)."""
    problems: list[str] = []
    if model.training:
        problems.append("the model is in train mode; evaluation switches it to eval mode (BatchNorm running "
                        "statistics, no dropout). Call model.eval() to silence this warning.")
    with attack_mode(model):
        xs = x[: min(32, x.shape[0])].detach()
        with torch.no_grad():
            a = check_logits(model(xs), xs.shape[0])
        check_labels(y, y.shape[0], num_classes=a.shape[1])
        if randomised if randomised is not None else is_randomised(model, xs):
            problems.append("two forward passes on the same input differ: the model is randomised, and attacks that "
                            "follow one noisy gradient overestimate its robustness; use "
                            "\"autoattack:version=rand\" (APGD-CE and APGD-DLR with 20 EoT passes per step) or eot=K "
                            "on pgd / apgd-ce (robust accuracy is judged as the expected accuracy over `draws` "
                            "forward passes per image)")
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
    robust: which of (x, y) survived the bf16 attack. trusted=False when bf16's robust accuracy is higher by more
    than BF16_TOLERANCE (the attack is weaker in bf16 on this model: its numbers are not trustworthy); `_result`
    warns from it, so a resumed run or a merge warns as the first run did."""
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
    return {"precision": atk.precision, "n": n, "robust_accuracy": low, "fp32_robust_accuracy": full,
            "trusted": trusted}


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
    integrity: bool | str | None = None,
    keep_records: bool = False,
    keep_adversarials: bool = False,
    progress: bool | None = None,
    precision: str = "fp32",
    compile: bool = False,
    state: str | Path | None = None,
    shard: tuple[int, int] | None = None,
    draws: int = 20,
) -> dict[str, Any]:
    """Evaluate `model` on (x, y) tensors or a DataLoader `x` yielding (x, y) batches.

    attacks: Attack objects bound to `model`, or spec strings ("pgd:norm=linf,eps=0.3,steps=40").
    checks: warn on suspicious setups (train mode, randomness, probabilities, zero gradients) before attacking.
    integrity: "quick" (the default when `checks`; True), "full" or "off" (False; the default without `checks`): the
    integrity checks of `robustlab.engine.integrity` on a probe of the first batch (zero-gradient share, unbounded
    attack, black-box vs white-box, monotonicity in eps); "quick" keeps the probe within a quarter of the panel's
    passes, "full" runs the whole probe, "off" warns that gradient masking goes unchecked.
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
    state: a folder that keeps every batch's results the moment they are computed (`engine/eval_state.py`); the
    same call resumes from it (refusing a folder written with other settings) and returns the result an
    uninterrupted run returns (per-attack seconds: the sum of the recorded work). shard=(I, N): only batches
    k with k % N == I, into `state`; the return value then says which, and `engine.tasks.merge_evaluations` builds
    the result.
    draws: a randomised model (two forward passes on the same images differ) has each adversarial image judged by
    this many forward passes: its robust accuracy is the expected accuracy (per image the share of correct passes,
    0 where the clean pass misclassified, averaged), with the spread of the per-pass accuracies
    (`attacks.NAME.expected_over_draws`, `randomised`). Each batch's passes draw from a seed of the batch, so
    resumed, sharded and single runs agree. A deterministic model is judged by one pass, whatever `draws` says.
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(draws, "draws")
    if n_samples is not None:
        check_positive_int(n_samples, "n_samples")
    if isinstance(attacks, (str, Attack)) or not isinstance(attacks, (list, tuple)):
        raise InputTypeError(f"attacks must be a list of attack specs or Attack objects, got {attacks!r}; "
                             f"e.g. attacks=[{attacks!r}]" if isinstance(attacks, (str, Attack))
                             else f"attacks must be a list of attack specs or Attack objects, got {type(attacks).__name__}")
    asked = checks if integrity is None else integrity
    integrity = _integrity_mode(asked)
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
    if not built:
        warnings.warn("evaluate was given no attacks: only the clean accuracy is measured (union_accuracy and "
                      "average_accuracy are None)", RuntimeWarning, stacklevel=2)
    names = _unique_names(built)
    panel = [_attack_meta(name, atk) for name, atk in zip(names, built)]
    # a fast AutoAttack escalates on batch 0's integrity probe; without the probe (robustlab's own quiet evaluations,
    # the trainer's per-epoch one) it runs unchecked and says so (escalated_because: None)
    fast = [j for j, a in enumerate(built) if isinstance(a, AutoAttack) and a.version == "fast"]
    if fast and asked == "off":
        raise InputError("autoattack version=fast escalates to standard AutoAttack when the integrity probe flags "
                         "anything; integrity='off' would leave it unchecked: use integrity='quick' or 'full', or "
                         "version=standard")
    if integrity == "off":
        fast = []
    shard_i, n_shards = check_shard(shard, state)
    saved = None
    if state is not None:
        from robustlab.engine.checkpoint import tensors_sha256
        from robustlab.engine.eval_state import EvalState
        from robustlab.version import __version__

        n_total = None if x is None else (x.shape[0] if n_samples is None else min(n_samples, x.shape[0]))
        data_hash = None if x is None or y is None else tensors_sha256({"x": x[:n_total], "y": y[:n_total]})
        saved = EvalState(state, {
            "robustlab": __version__, "model_sha256": tensors_sha256(dict(model.state_dict())),
            "data_sha256": data_hash, "n_samples": n_samples, "batch_size": batch_size,
            "attacks": panel, "precision": precision, "compile": bool(compile),
            "adversarials": keep_adversarials, "checks": checks, "integrity": integrity, "draws": draws,
            "task": "classification"})
    was_training = model.training

    batches: list[dict[str, Any]] = []  # the records of the batches this process owns, in batch order
    first_batch: tuple[Tensor, Tensor] | None = None
    # the first batch's checks; a panel with a fast AutoAttack has them (and its escalation) before batch 1
    first_checks: dict[str, Any] | None = None
    if fast and saved is not None and (stored := saved.load_checks()) is not None:
        first_checks = stored
        _escalate(built, fast, names, stored["escalation"])
    checked = False
    judge_draws = 1  # forward passes judging each image: `draws` for a randomised model (found on the first batch)
    seen = k = 0
    total = n_samples or (x.shape[0] if x is not None else None)
    if total is not None and x is not None:
        total = min(total, x.shape[0])
        # a shard counts the samples of its own batches
        total = sum(min(batch_size, total - s) for s in range(shard_i * batch_size, total, n_shards * batch_size))
    with progress_bar(total=total, desc="evaluate", enabled=progress) as bar:
        for k, (xb, yb) in enumerate(_batches(x, y, loader, batch_size)):
            if n_samples is not None and seen >= n_samples:
                k -= 1
                break
            if n_samples is not None:
                xb, yb = xb[: n_samples - seen], yb[: n_samples - seen]
            seen += xb.shape[0]
            # a fast AutoAttack needs batch 0's integrity probe before its other batches (escalation): every shard
            # takes it from the state folder or computes it (the same record batch 0's owner computes)
            early = bool(fast) and k == 0 and first_checks is None
            if k % n_shards != shard_i and not early:  # another process's batch
                continue
            xb, yb = xb.to(device).float(), yb.to(device).long()
            if loader is not None:
                check_images(xb)
                check_labels(yb, xb.shape[0])
                if not checked:
                    check_fits_model(model, xb.float() if xb.dtype == torch.float64 else xb)
            if not checked:  # the first batch: is the model randomised (judged by draws), is the setup sound
                randomised = is_randomised(model, xb)
                judge_draws = draws if randomised else 1
                if checks:
                    check_setup(model, xb, yb, randomised)
            checked = True
            reuse = None
            if early:
                first_checks, reuse = _escalation(model, (xb, yb), fast, names, built, integrity, randomised, bar,
                                                  saved, keep_adversarials, judge_draws)
                if k % n_shards != shard_i:
                    continue
            batches.append(_batch_record(k, xb, yb, model, names, built, bar, saved, keep_adversarials, judge_draws,
                                         reuse))
            if k == 0:
                first_batch = (xb, yb)
            bar.update(xb.shape[0])
        if seen == 0:
            raise InputError("no samples to evaluate")
        n_batches = k + 1
        if first_batch is not None and first_checks is None:  # batch 0's owner runs the first-batch checks (stored)
            first_checks = saved.load_checks() if saved is not None else None
            if first_checks is None:
                first_checks = _first_checks(model, first_batch, batches[0], names, built, integrity, n_batches, bar)
                if saved is not None:
                    saved.save_checks(first_checks)
    model.train(was_training)
    if saved is not None:
        saved.mark_done(shard_i, n_shards, n_batches)
    if n_shards > 1:
        return {"shard": [shard_i, n_shards], "batches": [b["k"] for b in batches], "n_batches": n_batches,
                "state": str(saved.folder) if saved is not None else None}
    return result_from_records(panel, batches, first_checks, keep_records, keep_adversarials)


def _integrity_mode(value: bool | str) -> str:
    """integrity= as a mode: True -> "quick", False -> "off" (robustlab's own evaluations, quietly); "off" by name
    (the user's choice) warns that masking goes unchecked."""
    mode = ("quick" if value else "off") if isinstance(value, bool) else value
    check_choice(mode, "integrity", INTEGRITY_MODES)
    if value == "off":
        warnings.warn("integrity checks are off: gradient masking goes unchecked, and a too-high robust accuracy will "
                      "not be flagged", RuntimeWarning, stacklevel=3)
    return mode


def _first_checks(model: nn.Module, first_batch: tuple[Tensor, Tensor], record: dict[str, Any], names: list[str],
                  built: list[Attack], integrity: str, n_batches: int, bar: Any,
                  plan: ProbePlan | None = None) -> dict[str, Any]:
    """The checks of the first batch: bf16 attacks against fp32, and the integrity probe, sized by batch 0's passes
    times the number of batches (the same in any sharding or resume) unless `plan` is given, shown on the
    progress bar."""
    xb, yb = first_batch
    # survived: robust, or (randomised model) correct on at least half of the judging passes
    rob_first = {n: _survived(record["attacks"][j]["robust"]).to(xb.device) for j, n in enumerate(names)}
    checks: dict[str, Any] = {"precision": {}, "integrity": None}
    for name, atk in zip(names, built):
        if atk.precision != "fp32":
            bar.set_postfix(attack=f"{name}: fp32 check of {atk.precision}")
            checks["precision"][name] = _precision_check(model, atk, xb, yb, rob_first[name])
    if integrity != "off":
        attacks = list(zip(names, built))
        batch_passes = sum(sum(r["passes"]) for r in record["attacks"])
        attacked = max(int((record["clean"]["pred"] == record["clean"]["y"]).sum()), 1)
        if plan is None:
            plan = probe_plan(integrity, n_batches * batch_passes, len(bounded_norms(attacks)), batch_passes / attacked)
        bar.set_postfix(attack=f"integrity probe ({integrity}: {plan.n_probe} images)")
        checks["integrity"] = probe_integrity(model, xb, yb, attacks, rob_first, plan=plan, mode=integrity)
    return checks


def _escalation(model: nn.Module, first_batch: tuple[Tensor, Tensor], fast: list[int], names: list[str],
                built: list[Attack], integrity: str, randomised: bool, bar: Any, saved: Any,
                keep_adversarials: bool, draws: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A panel with AutoAttack version=fast: batch 0 with the panel as given, then the first-batch checks with the
    full integrity probe, then the escalation rule: if the probe flags anything or the model is randomised, each
    fast AutoAttack becomes standard (rand for a randomised model) for every batch, batch 0 included. The checks
    and the decision are stored in the state folder, created only if absent: shards and resumes read the first
    decision made. Replaces the fast attacks in `built` in place; returns the checks (with "escalation") and batch
    0's record (`_batch_record` reuses what did not escalate)."""
    xb, yb = first_batch
    record = _batch_record(0, xb, yb, model, names, built, bar, saved, keep_adversarials, draws)
    checks = _first_checks(model, first_batch, record, names, built, integrity, 1, bar, plan=FULL_PLAN)
    flags = list(checks["integrity"]["flags"]) + (
        ["the model is randomised (two forward passes differ): AutoAttack's rand version (EoT) judges it"]
        if randomised else [])
    ran = "fast" if not flags else ("rand" if randomised else "standard")
    checks["escalation"] = {names[j]: {"ran": ran, "because": flags} for j in fast}
    if saved is not None:
        checks = saved.create_checks(checks)  # another shard's decision, if it was first
    _escalate(built, fast, names, checks["escalation"])
    return checks, record


def _escalate(built: list[Attack], fast: list[int], names: list[str], escalation: dict[str, Any]) -> None:
    """Replace each fast AutoAttack of `built` by the version its escalation entry says ran."""
    for j in fast:
        ran = escalation[names[j]]["ran"]
        if ran != "fast":
            atk = built[j]
            assert isinstance(atk, AutoAttack)
            built[j] = atk.escalated(randomised=ran == "rand")
            if ran == "standard":
                warnings.warn(f"{names[j]}: the integrity probe flagged the evaluation, so standard AutoAttack runs "
                              "instead of version=fast: " + "; ".join(escalation[names[j]]["because"]),
                              RuntimeWarning, stacklevel=4)


def check_shard(shard: tuple[int, int] | None, state: Any) -> tuple[int, int]:
    """(I, N) of a shard (0, 1 for none): 0 <= I < N, and a state folder to write a slice of the work to."""
    if shard is None:
        return 0, 1
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2 or not all(isinstance(v, int) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise InputError(f"shard must be (I, N) with 0 <= I < N, got {shard!r}")
    if shard[1] > 1 and state is None:
        raise InputError(f"shard {shard[0]}/{shard[1]} needs a state folder to write its slice to (state=DIR; "
                         "robustlab eval --state DIR)")
    return int(shard[0]), int(shard[1])


def _attack_meta(name: str, atk: Attack) -> dict[str, Any]:
    """What the aggregation needs of an attack, as plain data (stored in a state's manifest; merged shards have no
    Attack objects)."""
    describe = {k: (v if not isinstance(v, Tensor) else "tensor") for k, v in atk.describe().items() if k != "attack"}
    return {"name": name, "attack": atk.name, "norm": atk.norm, "minimal": atk.minimal, "budget": attack_budget(atk),
            "describe": describe}


def _survived(robust: Tensor) -> Tensor:
    """Per sample robust (bool records), or correct on at least half of the judging passes (a randomised model's
    expected accuracies)."""
    return robust if robust.dtype == torch.bool else robust >= 0.5


@contextlib.contextmanager
def _batch_randomness(enabled: bool, device: torch.device, *key: int) -> Iterator[None]:
    """A randomised model's own draws (torch's global generator) seeded from the batch's key (batch index, attack)
    for the batch's work, the caller's generator state restored after: batch k's result does not depend on the
    process, the shard or a resume."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(mix_seed(RANDOMISED_SEED, *key))
        yield


RANDOMISED_SEED = 20_000_000  # the base of the batch seeds of a randomised model's draws


def _batch_record(k: int, xb: Tensor, yb: Tensor, model: nn.Module, names: list[str], built: list[Attack], bar: Any,
                  saved: Any, keep_adversarials: bool, draws: int = 1,
                  reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """Batch k: its clean record and one record per attack, each loaded from the state folder when it holds it
    (resume) or taken from `reuse` (this batch's record computed before a fast AutoAttack's escalation), and
    otherwise computed and saved there the moment it is done. draws > 1: a randomised model, each image judged by
    that many forward passes. A stored AutoAttack record of another version than the one running is recomputed."""
    from robustlab.engine.checkpoint import tensors_sha256

    data_hash = tensors_sha256({"x": xb, "y": yb}) if saved is not None else None
    clean = reuse["clean"] if reuse is not None else saved.load(saved.clean_name(k)) if saved is not None else None
    if clean is not None and clean["data_sha256"] != data_hash:
        raise ResumeError(f"state folder {saved.folder}: batch {k} holds different images or labels than this run's "
                          "(the data changed); use a new folder")
    if clean is None:
        with attack_mode(model), _batch_randomness(draws > 1, xb.device, k):
            with torch.no_grad():
                logits = check_logits(model(xb), xb.shape[0])
                hits = _judge(model, xb, yb, draws - 1) if draws > 1 else None
            check_labels(yb, xb.shape[0], num_classes=logits.shape[1])
        clean = {"k": k, "y": yb.cpu(), "pred": logits.argmax(1).cpu(), "num_classes": int(logits.shape[1]),
                 "xnorm": torch.stack([per_sample_norm(xb, "l2"), per_sample_norm(xb - 0.5, "l2")], 1).cpu(),
                 "data_sha256": data_hash}
        if hits is not None:  # a randomised model: the clean pass and draws - 1 more, per sample the share correct
            clean["expected"] = ((hits.sum(0) + (logits.argmax(1) == yb).to(hits.dtype)) / draws).cpu()
        if saved is not None:
            saved.save(saved.clean_name(k), clean)
    correct = (clean["pred"] == clean["y"]).to(xb.device)
    idx = correct.nonzero().squeeze(1)
    records = []
    for j, (name, atk) in enumerate(zip(names, built)):
        rec = reuse["attacks"][j] if reuse is not None else saved.load(saved.attack_name(k, j)) if saved is not None else None
        ran = getattr(atk, "version", None)
        if rec is not None and rec.get("ran", ran) != ran:  # batch 0 of a fast AutoAttack that then escalated
            rec = None
        if rec is None:
            bar.set_postfix(attack=name)
            atk.report_progress = lambda msg, name=name: bar.set_postfix(attack=f"{name} ({msg})")
            try:
                with _batch_randomness(draws > 1, xb.device, k, j + 1):
                    rec = _attack_batch(atk, name, model, xb, yb, clean["pred"].to(xb.device), idx,
                                        keep_adversarials, draws)
            finally:
                atk.report_progress = None
            if saved is not None:
                saved.save(saved.attack_name(k, j), rec)
        records.append(rec)
    return {"k": k, "clean": clean, "attacks": records}


def _judge(model: nn.Module, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """(draws, N): whether each of `draws` forward passes classifies each image correctly (as float)."""
    return torch.stack([model(x).argmax(1) == y for _ in range(draws)]).float()


def _attack_batch(atk: Attack, name: str, model: nn.Module, xb: Tensor, yb: Tensor, pred: Tensor, idx: Tensor,
                  keep_adversarials: bool, draws: int = 1) -> dict[str, Any]:
    """One attack on one batch (its clean-correct samples): per-sample robustness, predictions and norms, passes,
    seconds, AutoAttack-style stages and the closing check of the adversarial points. draws > 1 (a randomised
    model): robustness is per sample the share of `draws` passes that classify the adversarial image correctly,
    and `draw_correct` counts, per pass, the samples it classified correctly."""
    device = xb.device
    rob = torch.zeros(xb.shape[0], dtype=torch.bool if draws == 1 else torch.float32, device=device)
    draw_correct = torch.zeros(draws, device=device)
    ap = pred.clone()
    nrm = torch.zeros(xb.shape[0], device=device)
    r2 = torch.zeros(xb.shape[0], device=device)
    rec: dict[str, Any] = {"passes": [0, 0], "judging": 0, "stats": [0.0, 0.0, math.inf, -math.inf], "stages": {}}
    x_keep = xb
    start = time.perf_counter()
    if idx.numel():
        xs, ys = xb[idx], yb[idx]
        out = atk.run(xs, ys, with_success=False)
        rec["passes"] = [out.forward, out.backward]
        for stage in atk.last_log:
            acc = rec["stages"].setdefault(stage["attack"], dict.fromkeys(("robust", "seconds", "forward", "backward"), 0))
            acc["robust"] += stage["robust_after"]
            for key in ("seconds", "forward", "backward"):
                acc[key] += stage[key]
        _check_threat(atk, out, xs, name)
        with attack_mode(model), torch.no_grad():
            p_adv = model(out.x_adv).argmax(1)
            hits = (p_adv == ys).float()[None]
            if draws > 1:
                hits = torch.cat([hits, _judge(model, out.x_adv, ys, draws - 1)])
        rec["judging"] = int(xs.shape[0]) * draws
        rob[idx] = p_adv == ys if draws == 1 else hits.mean(0)
        draw_correct = hits.sum(1)
        ap[idx] = p_adv
        r2[idx] = per_sample_norm(out.x_adv - xs, "l2")
        dist = per_sample_norm(out.x_adv - xs, atk.norm or "l2")
        if out.norms is not None:
            # minimal attacks: inf marks a failure; count norms only where it fooled the model
            nrm[idx] = torch.where(p_adv != ys, out.norms.to(nrm.dtype), torch.full_like(r2[idx], math.inf))
        else:
            nrm[idx] = dist
        # the reference AutoAttack's closing check: largest perturbation, NaNs, the range of x_adv
        rec["stats"] = torch.stack([dist.max(), torch.isnan(out.x_adv).sum().to(dist.dtype), out.x_adv.min(),
                                    out.x_adv.max()]).tolist()
        if keep_adversarials:
            x_keep = xb.clone()
            x_keep[idx] = out.x_adv
    rec.update(robust=rob.cpu(), adv_pred=ap.cpu(), norms=nrm.cpu(), l2=r2.cpu())
    if isinstance(atk, AutoAttack):
        rec["ran"] = atk.version
    if draws > 1:
        rec["draw_correct"] = draw_correct.cpu()
    rec["seconds"] = time.perf_counter() - start  # .cpu() above waited for the device
    if keep_adversarials:
        rec["adversarial"] = x_keep.cpu()
    return rec


def result_from_records(panel: list[dict[str, Any]], batches: list[dict[str, Any]],
                        first_checks: dict[str, Any] | None, keep_records: bool,
                        keep_adversarials: bool) -> dict[str, Any]:
    """The result of a classifier evaluation from its batch records (in batch order) and the first batch's checks:
    the same function for a single run, a resumed one and merged shards (`engine.tasks.merge_evaluations`)."""
    names = [m["name"] for m in panel]
    clean = [b["clean"] for b in batches]
    per_attack = [[b["attacks"][j] for b in batches] for j in range(len(panel))]
    result = _aggregate(panel, clean, per_attack, keep_records)
    correct = torch.cat([c["pred"] == c["y"] for c in clean])
    n_attacked = int(correct.sum())
    for m, recs in zip(panel, per_attack):
        entry = result["attacks"][m["name"]]
        entry["seconds"] = sum(r["seconds"] for r in recs)
        stats = [r["stats"] for r in recs]
        lo, hi = min(s[2] for s in stats), max(s[3] for s in stats)
        entry["adversarial_check"] = {"max_perturbation": max(s[0] for s in stats), "nan": int(sum(s[1] for s in stats)),
                                      "min": lo if math.isfinite(lo) else None, "max": hi if math.isfinite(hi) else None}
        stages: dict[str, dict[str, float]] = {}
        for r in recs:
            for stage, v in r["stages"].items():
                acc = stages.setdefault(stage, dict.fromkeys(v, 0))
                for key in v:
                    acc[key] += v[key]
        if stages:
            entry["stages"] = [
                {"attack": stage, "robust_accuracy": v["robust"] / result["n_samples"], "seconds": v["seconds"],
                 "passes_per_attacked_image": (v["forward"] + v["backward"]) / max(n_attacked, 1)}
                for stage, v in stages.items()]
        if keep_adversarials:
            result.setdefault("adversarials", {})[m["name"]] = torch.cat([r["adversarial"] for r in recs])
        if first_checks is not None and m["name"] in first_checks.get("escalation", {}):
            entry["ran"] = first_checks["escalation"][m["name"]]["ran"]
            entry["escalated_because"] = first_checks["escalation"][m["name"]]["because"]
        elif m["attack"] == "autoattack" and m["describe"].get("version") == "fast":  # no probe ran: unchecked
            entry["ran"], entry["escalated_because"] = "fast", None
        if first_checks is not None and m["name"] in first_checks["precision"]:
            check = entry["precision_check"] = first_checks["precision"][m["name"]]
            if not check["trusted"]:
                warnings.warn(f"attack {m['attack']!r} (result {m['name']!r}) in {check['precision']} finds robust accuracy "
                              f"{check['robust_accuracy']:.1%} on the first {check['n']} samples, fp32 finds "
                              f"{check['fp32_robust_accuracy']:.1%}: the {check['precision']} evaluation is not "
                              f"trustworthy for this model; use precision='fp32'", RuntimeWarning, stacklevel=3)
    if first_checks is not None and first_checks["integrity"] is not None:
        accs = {n: result["attacks"][n]["robust_accuracy"] for n in names}
        result["integrity"] = finish_integrity(first_checks["integrity"],
                                               [(m["name"], m["attack"], m["norm"], m["budget"]) for m in panel], accs)
    return result


def without_seconds(result: dict[str, Any]) -> dict[str, Any]:
    """A JSON copy of an evaluation result (a classifier's or a detector's) without its wall-clock times (per attack
    and per stage) and report images: what a resumed, sharded or multi-process run must reproduce exactly."""
    result = json.loads(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    if isinstance(result.get("clean"), dict):  # a detector's clean entry
        result["clean"].pop("seconds", None)
    for entry in result["attacks"].values():
        entry.pop("seconds", None)
        for stage in entry.get("stages", []):
            stage.pop("seconds", None)
    if result.get("integrity"):
        result["integrity"].pop("seconds", None)
    return result


def _check_threat(atk: Attack, out: AttackOut, x: Tensor, name: str) -> None:
    """x_adv against the threat model the attack used for this batch (a per-pixel budget map for Pixel-AG), else the
    attack's own threat model, else (minimal attacks with a budget) the ball of that budget, else the box."""
    threat = out.threat if out.threat is not None else atk.threat
    eps = getattr(atk, "eps_value", None)
    if threat is None and eps is not None and atk.norm:
        threat = make_threat(atk.norm, eps)
    what = f"its {threat.norm} ball (per-element budget)" if out.threat is not None and threat is not None else ""
    check_within(out.x_adv, x, threat, (0.0, 1.0), name, what)


def _confusion(y: Tensor, p: Tensor, k: int) -> list[list[int]]:
    m = torch.zeros(k * k, dtype=torch.long)
    m.index_add_(0, y * k + p, torch.ones_like(y))
    return m.view(k, k).tolist()


def _aggregate(panel: list[dict[str, Any]], clean: list[dict[str, Any]], per_attack: list[list[dict[str, Any]]],
               keep_records: bool) -> dict[str, Any]:
    y = torch.cat([c["y"] for c in clean])
    pred = torch.cat([c["pred"] for c in clean])
    n = y.shape[0]
    k = clean[0]["num_classes"]
    correct = pred == y
    names = [m["name"] for m in panel]
    robust = {m["name"]: torch.cat([r["robust"] for r in recs]) for m, recs in zip(panel, per_attack)}
    xn, xgray = torch.cat([c["xnorm"] for c in clean]).unbind(1)  # ||x||_2, ||x - 0.5||_2 (C&W's failure image)
    result: dict[str, Any] = {"n_samples": n, "num_classes": k, "clean_accuracy": correct.float().mean().item(), "attacks": {}}
    # per sample robust (0 or 1) or, for a randomised model, its expected accuracy: the union and each norm's worst
    # case take per sample the lowest over the attacks (for 0 or 1: "survives every attack")
    union = correct.float()
    per_norm: dict[str, Tensor] = {}
    for m, recs in zip(panel, per_attack):
        name = m["name"]
        rob = robust[name].float()
        union = torch.minimum(union, rob)
        if m["norm"]:
            per_norm[m["norm"]] = torch.minimum(per_norm.get(m["norm"], correct.float()), rob)
        n_att = int(correct.sum())
        forward, backward = sum(r["passes"][0] for r in recs), sum(r["passes"][1] for r in recs)
        entry: dict[str, Any] = {
            "robust_accuracy": rob.float().mean().item(),
            **m["describe"],
            "attack": m["attack"],
            "passes": {"forward": forward, "backward": backward, "per_attacked_image": (forward + backward) / max(n_att, 1)},
            "confusion": _confusion(y, torch.cat([r["adv_pred"] for r in recs]), k),
        }
        if "draw_correct" in recs[0]:  # a randomised model: the accuracy of each judging pass over all samples
            per_draw = sum(r["draw_correct"] for r in recs) / n
            entry["expected_over_draws"] = {"draws": int(per_draw.numel()), "std": per_draw.std().item(),
                                            "min": per_draw.min().item(), "max": per_draw.max().item()}
        if m["minimal"]:
            nr = torch.cat([r["norms"] for r in recs])
            r2 = torch.cat([r["l2"] for r in recs])
            fooled = correct & torch.isfinite(nr)
            failed = correct & ~torch.isfinite(nr)
            r2_used = torch.where(correct, r2, torch.zeros_like(r2))  # misclassified points: r = 0
            ok = ~failed
            rho = (r2_used[ok] / xn[ok].clamp_min(1e-12)).mean().item() if ok.any() else float("nan")
            # the original C&W code returns a constant 0.5 image on failure; its scripts also log rho with those
            r2_gray = torch.where(failed, xgray, r2_used)
            rho_gray = (r2_gray / xn.clamp_min(1e-12)).mean().item()
            entry["perturbation"] = {
                "norm": m["norm"],
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
    # no attack, no union: None rather than the clean accuracy under another name (evaluate warns)
    result["union_accuracy"] = union.float().mean().item() if panel else None
    accs = [e["robust_accuracy"] for e in result["attacks"].values()]
    result["average_accuracy"] = sum(accs) / len(accs) if accs else None
    result["per_norm"] = {p: v.float().mean().item() for p, v in per_norm.items()}
    # the multi-perturbation papers' Acc_avg: the mean of the per-norm (worst case over that norm's attacks) accuracies
    result["norm_average_accuracy"] = (sum(result["per_norm"].values()) / len(per_norm)) if per_norm else None
    per_class = {}
    for c in range(k):
        in_class = y == c
        if not in_class.any():
            continue
        per_class[str(c)] = {
            "n": int(in_class.sum()),
            "clean_accuracy": correct[in_class].float().mean().item(),
            "union_accuracy": union[in_class].float().mean().item() if panel else None,
            "attacks": {name: robust[name][in_class].float().mean().item() for name in names},
        }
    result["per_class"] = per_class
    if "expected" in clean[0]:
        draws = next(iter(result["attacks"].values()))["expected_over_draws"]["draws"] if names else None
        result["randomised"] = {
            "draws": draws,
            "clean_accuracy_expected": torch.cat([c["expected"] for c in clean]).mean().item(),
            "judged_as": "the model is randomised (two forward passes differ): each adversarial image is judged by "
                         f"{draws} forward passes, robust accuracy is the mean over images of the share of correct "
                         "passes (0 where the clean pass misclassified); union and per-norm accuracies take per image "
                         "the lowest share over the attacks; clean_accuracy is one pass, clean_accuracy_expected "
                         "the same share on the clean images"}
    result["confusion"] = {"clean": _confusion(y, pred, k)}
    result["passes"] = {"clean_and_judging_forward": n + sum(r["judging"] for recs in per_attack for r in recs)}
    if keep_records:
        result["records"] = {"label": y.tolist(), "clean_pred": pred.tolist(),
                             "robust": {nm: robust[nm].tolist() for nm in names}}
    return result
