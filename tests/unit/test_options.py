"""No option is accepted and ignored: every option of every registered classifier attack and method changes what it
does, is rejected where it does not apply, or is listed in the entry's `no_op_options` with the reason.

The walk is over the registry, so a new attack or method is covered automatically: give each of its options a
changed value that matters (ALTERNATIVES / CONTEXT below) or document why it cannot.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import robustlab.methods  # noqa: F401  (registers the methods)
from robustlab.errors import RobustlabError
from robustlab.methods import Batch, StepContext
from robustlab.registry import ATTACKS, METHODS
from tests.conftest import TinyCNN

# Settings under which every attack partly succeeds on the trained digits CNN (options then show in the outcome).
BASE = {
    "fgsm": dict(norm="linf", eps=0.1),
    "pgd": dict(norm="linf", eps=0.05, steps=3),
    "apgd-ce": dict(norm="linf", eps=0.05, steps=20),
    "apgd-dlr": dict(norm="linf", eps=0.05, steps=20),
    "apgd-t": dict(norm="linf", eps=0.05, steps=20, n_targets=3),
    "autoattack": dict(norm="linf", eps=0.05, apgd_steps=5, fab_steps=5, square_queries=20, n_targets=3),
    "critic": dict(steps=20),
    "cw": dict(steps=50, binary_steps=3),
    "deepfool": dict(norm="l2", steps=5, num_classes=10),
    "ead": dict(steps=200, binary_steps=4),
    "fab": dict(norm="linf", steps=5),
    "mma": dict(norm="linf", eps=0.1, steps=3, k=3),
    "pixel-ag": dict(eps=0.1, eps_low=0.05, steps=3, step_size=0.02, cam_layer="conv"),
    "salt-pepper": dict(steps=50),
    "gaussian-noise": dict(eps=2.0, repeats=10),
    "brendel-bethge": dict(norm="linf", steps=20),
    "square": dict(norm="linf", eps=0.1, n_queries=100),
}
# Changed values per option name (first one that differs from the base is used).
ALTERNATIVES = {
    "norm": ("l2", "linf"), "loss": ("dlr", "cw"), "bn_mode": ("train",), "seed": (7,), "l2_proj": ("exact",),
    "impl": ("torchattacks",), "selection": ("random",), "cam_method": ("layercam",), "start": ("budget",),
    "mask_mode": ("official_jet",), "upsample": ("pil_bicubic",), "cam_layer": ("bn",), "n_targets": (2, 4),
    "k": (2, 4), "eps_low": (0.02,), "num_classes": (2,), "max_step": (0.01,), "steps": (2, 4), "eps": (0.05, 0.02),
    "step_size": (0.01,), "version": ("rand",), "confidence": (0.9,), "sat_granularity": ("sample",),
    "generator_input": ("image",), "target": ("random",), "cycle_norm": ("l2",), "norms": (("linf", "l2"),),
    "attack_bn_mode": ("eval",), "eps_ramp_epochs": (4.0,), "burn_in_epochs": (1,), "refresh_epochs": (2,),
    "generator_lr": (0.5,), "lookahead_lr": (0.5,), "critic_betas": ((0.9, 0.9),), "precision": ("bf16",),
    "targets_at_once": (3,),  # the broken set is the same by design; the passes spent differ
    "targeting": ("malt",), "malt_candidates": (3,), "malt_targets": (2,), "init": ("noise",),
}
# Options that change how the model's forward runs, not what it computes: each has its own test that it is used.
EXECUTION_OPTIONS = {"compile": "tests/attacks/test_precision.py runs the gradient attacks compiled (every attack's "
                                "forward goes through the same PassCounter)"}
# Extra settings under which an option matters (e.g. SLIDE's q only for the l_1 norm).
CONTEXT = {
    ("pgd", "q"): {"norm": "l1", "eps": 4.0}, ("pgd", "mask_saturated"): {"norm": "l1", "eps": 4.0},
    ("pgd", "l2_proj"): {"norm": "l2", "eps": 1.0}, ("fab", "n_targets"): {"targeted": True, "eps": 0.05},
    ("deepfool", "max_step"): {"project": True},
    # with compaction every sample is fooled (and gone) before the first step-size checkpoint
    **{(a, "rho"): {"compact": False} for a in ("apgd-ce", "apgd-dlr", "apgd-t")},
    ("fab", "compact"): {"eps": 0.05},
    # bf16 shows in the points where the step reads the gradient's magnitude (l_2), not only its signs (l_inf: on
    # some machines' fixture weights every sign, and so every point, came out equal); a black-box attack shows it
    # through its margins, given enough queries to meet a near tie
    **{(a, "precision"): {"norm": "l2", "eps": 0.5} for a in ("apgd-dlr", "apgd-t")},
    ("square", "precision"): {"n_queries": 1000}, ("salt-pepper", "precision"): {"steps": 1000},
    # APGD-T or FAB-T must break an image APGD-CE left (only then do targets side by side spend other passes): a
    # one-step APGD leaves them the work
    ("autoattack", "targets_at_once"): {"eps": 0.12, "apgd_steps": 1},
    # MALT's options exist with MALT's targeting (elsewhere they are refused): scoring 3 of the classes instead of
    # all, or attacking 2 targets instead of 5, chooses other targets
    ("apgd-t", "malt_candidates"): {"targeting": "malt", "compact": False},
    ("autoattack", "malt_targets"): {"version": "fast", "apgd_steps": 5},
    # train-mode BatchNorm changes the outcome only near the boundary of the larger budgets
    ("gaussian-noise", "bn_mode"): {"eps": 4.0},
    # Brendel-Bethge draws only for a noise start; its trust region decays every steps / lr_num_decay steps
    ("brendel-bethge", "seed"): {"init": "noise"}, ("brendel-bethge", "lr_num_decay"): {"steps": 40},
}


def _alternative(option: str, current):
    for v in ALTERNATIVES.get(option, ()):
        if v != current:
            return v
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return 3.0 if math.isinf(current) else (current * 0.5 if current else 0.1)
    raise AssertionError(f"no alternative value for option {option!r} (now {current!r}): add it to ALTERNATIVES")


def _default(factory, option):
    p = inspect.signature(factory).parameters.get(option)
    if p is not None:
        return p.default
    from robustlab.registry import _declared

    for target in _declared(factory, "forwards_options_to") or ():
        d = _default(target, option)
        if d is not inspect.Parameter.empty:
            return d
    return inspect.Parameter.empty


CLASSIFIER_ATTACKS = [n for n in ATTACKS.names() if getattr(ATTACKS.get(n), "task", "classification") == "classification"]
ATTACK_CASES = [(name, opt) for name in CLASSIFIER_ATTACKS for opt in ATTACKS.options(name, 1)]


@pytest.fixture(scope="module")
def batch(digits):
    return digits.x_test[:16], digits.y_test[:16]


def _outcome(out):
    """What an attack did: its points, flags, norms and the passes it spent (an option that changes only the work
    done, e.g. restarts on points that stay robust, is still read)."""
    return [t for t in (out.x_adv, out.success, out.norms, torch.tensor([out.forward, out.backward])) if t is not None]


@pytest.mark.parametrize("name,option", ATTACK_CASES)
def test_every_attack_option_does_something(name, option, digits_tiny_cnn, batch):
    model, (x, y) = digits_tiny_cnn, batch
    factory = ATTACKS.get(name)
    noted = {**getattr(factory, "no_op_options", {}), **EXECUTION_OPTIONS}
    if option in noted:
        assert noted[option], f"{name}: give the reason why {option!r} is a no-op"
        return
    base = {**BASE[name], **CONTEXT.get((name, option), {})}
    alt = torch.full(x.shape[1:], 0.05) if option == "budget" else \
        _alternative(option, base.get(option, _default(factory, option)))
    if option == "bn_mode":  # train mode matters only if the model is in train mode: attacks restore it after
        model = TinyCNN(c=1, k=10).train()
        model.load_state_dict(digits_tiny_cnn.state_dict())
    try:
        changed = ATTACKS.create(name, model, **{**base, option: alt}).run(x, y)
    except (RobustlabError, TypeError) as e:  # rejected where it does not apply: fine, if it says so
        assert option in str(e) or repr(alt) in str(e) or str(alt) in str(e), (name, option, e)
        return
    reference = ATTACKS.create(name, model, **base).run(x, y)
    a, b = _outcome(reference), _outcome(changed)
    assert any(u.shape != v.shape or not torch.equal(u, v) for u, v in zip(a, b)), \
        f"attack {name!r}: option {option}={alt!r} (base {base}) changes nothing; wire it, reject it where it does " \
        f"not apply, or list it in {name}'s no_op_options with the reason"


# -- methods: one or two training steps on the digits, default vs changed option ------------------------------

MNIST_BUDGETS = dict(eps_linf=0.1, eps_l2=1.0, eps_l1=4.0, steps_linf=2, steps_l2=2, steps_l1=2, step_size_linf=0.05,
                     step_size_l2=0.5, step_size_l1=1.0)
METHOD_BASE = {
    "pgd-at": dict(eps=0.1, steps=2), "fgsm-at": dict(eps=0.1), "fast-at": dict(eps=0.1), "free-at": dict(eps=0.1),
    "trades": dict(eps=0.1, steps=2), "mart": dict(eps=0.1, steps=2), "vat": dict(eps=1.0), "margin": {},
    "part": dict(eps=0.1, steps=2, burn_in_epochs=0, cam_layer="conv"),
    "part-t": dict(eps=0.1, steps=2, burn_in_epochs=0, cam_layer="conv"),
    "part-m": dict(eps=0.1, steps=2, burn_in_epochs=0, cam_layer="conv"),
    "adv-inf": dict(eps=0.1, steps=2), "adv-l2": dict(eps=1.0, steps=2), "adv-l1": dict(eps=4.0, steps=2),
    "trades-inf": dict(eps=0.1, steps=2), "adv-avg": MNIST_BUDGETS, "adv-max": MNIST_BUDGETS, "sat": MNIST_BUDGETS,
    "sat-ac": MNIST_BUDGETS, "mng-ac": MNIST_BUDGETS,
    "msd": dict(eps_linf=0.1, eps_l2=1.0, eps_l1=4.0, msd_steps=2),
    "wpgd": dict(eps=0.1, steps=2, metric=[[0.0 if i == j else 1.0 + abs(i - j) for j in range(10)] for i in range(10)]),
    "critic": dict(attack_steps=2, critic_hidden=16, pretrain_epochs=0),
}
_ONE = {"linf": ("linf",), "l2": ("l2",), "l1": ("l1",)}
METHOD_CONTEXT = {
    **{(m, "eps_ramp_epochs"): {"burn_in_epochs": 3} for m in ("part", "part-t", "part-m")},
    ("part", "random_start"): {"start": "budget"},
    # the TRADES family starts 0.001 from x and takes steps of 0.007: give the budget a chance to bind
    **{(m, o): {"step_size": 0.05} for m in ("trades", "trades-inf", "mart", "part-t", "part-m")
       for o in ("eps", "eps_low", "cam_method", "cam_layer", "upsample", "burn_in_epochs", "refresh_epochs",
                 "mask_alignment")},
    **{(m, o): {"eps_low": 0.01} for m in ("part", "part-t", "part-m")
       for o in ("cam_method", "cam_layer", "upsample", "mask_alignment")},
    # one norm per batch (SAT) or a per-sample winner (Adv_max, MSD): train on that norm alone so its options show
    **{(m, f"{k}_{n}"): {"norms": _ONE[n]} for m in ("sat", "sat-ac", "mng-ac", "adv-max", "msd")
       for k in ("eps", "steps", "step_size", "msd_step_size") for n in _ONE},
    **{(m, "q"): {"norms": ("l1",)} for m in ("sat", "sat-ac", "mng-ac", "adv-max", "msd")},
    ("wpgd", "normalize"): {"entropy_weight": 0.5},  # sign steps on the log loss are scale-free without it
    ("critic", "pretrain_weight_decay"): {"pretrain_epochs": 1},
    # MSD's own default steps (1/255, 25/255) never reach these budgets in two iterations
    **{("msd", f"eps_{n}"): {"norms": _ONE[n], f"msd_step_size_{n}": v} for n, v in (("linf", 0.2), ("l2", 1.5),
                                                                                   ("l1", 4.0))},
    **{(m, "upsample"): {"cam_layer": "pool", "eps_low": 0.01, **({"step_size": 0.05} if m != "part" else {})}
       for m in ("part", "part-t", "part-m")},
}


def _method_base(name: str, option: str) -> dict:
    base = {**METHOD_BASE.get(name, {}), **METHOD_CONTEXT.get((name, option), {})}
    if "norms" in base:  # the other norms' settings would be refused as ignored
        drop = [n for n in ("linf", "l2", "l1") if n not in base["norms"]]
        base = {k: v for k, v in base.items() if not any(k.endswith(f"_{n}") for n in drop)
                and not (k == "q" and "l1" in drop)}
    return base
# epochs (with step 0) at which the two steps run, where the default (1, 1) would not show an option
METHOD_EPOCHS = {("critic", "pretrain_epochs"): (0, 0), ("critic", "pretrain_weight_decay"): (0, 0),
                 **{(m, "refresh_epochs"): (1, 2) for m in ("part", "part-t", "part-m")}}
METHOD_ALTERNATIVES = {
    "eps": (0.05, 0.5), "eps_low": (0.05,), "metric": ([[0.0 if i == j else 1.0 for j in range(10)] for i in range(10)],),
    "normalize": (None,), "generator_width": (3,), "critic_hidden": (8,), "pretrain_epochs": (1,),
    "mean_updates": (2,), "steps": (3, 1), "msd_steps": (3,), "replays": (2, 3), "critic_input_noise": (0.3,),
    "alpha": (0.05, 0.5), "burn_in_epochs": (2,), "cam_layer": ("pool",), "eps_linf": (0.3,), "eps_l2": (2.0,),
    "eps_l1": (8.0,), "step_size_linf": (0.2,), "step_size_l2": (1.5,), "step_size_l1": (3.0,),
    "msd_step_size_linf": (0.2,), "msd_step_size_l2": (1.5,), "msd_step_size_l1": (0.3,),
    "mask_alignment": ("batch_index",),
}


class PoolCNN(nn.Module):
    """conv -> pool (4x4 from 8x8: the CAM resolution differs from the input, so upsampling matters) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))
CLASSIFICATION_METHODS = [n for n in METHODS.names() if getattr(METHODS.get(n), "task", "classification")
                          == "classification"]
METHOD_CASES = [(name, opt) for name in CLASSIFICATION_METHODS for opt in METHODS.options(name)]


def _train_two_steps(name, kwargs, digits, epochs=(1, 1)):
    """Two optimiser steps of `name` on 32 digits from a fixed small CNN (at `epochs`; a new epoch starts at step
    0); returns what changed (weights, losses, passes) so two option values can be compared."""
    torch.manual_seed(0)
    model = PoolCNN() if name.startswith("part") else TinyCNN(c=1, k=10)
    method = METHODS.create(name, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    losses, passes = [], []
    for s, epoch in enumerate(epochs):
        x, y = digits.x_train[32 * s:32 * (s + 1)], digits.y_train[32 * s:32 * (s + 1)]
        step_index = 0 if s == 0 or epoch != epochs[s - 1] else s
        ctx = StepContext(epoch, step_index, torch.Generator().manual_seed(s), attack_model=model,
                          progress=epoch + step_index / 2, lr_factor=0.5, seed=0,
                          other_pass=lambda e, i: digits.x_train[1000 + 32 * i:1032 + 32 * i])  # PART's batch_index
        out = method.train_step(model, Batch(x, y), opt, ctx, step)
        losses.append(out.loss.detach())
        passes.append(torch.tensor(ctx.passes))
    return [torch.cat([p.detach().flatten() for p in model.parameters()]), torch.stack(losses), torch.stack(passes)]


@pytest.mark.parametrize("name,option", METHOD_CASES)
def test_every_method_option_does_something(name, option, digits):
    factory = METHODS.get(name)
    noted = {**getattr(factory, "no_op_options", {}), **EXECUTION_OPTIONS}
    if option in noted:
        assert noted[option], f"{name}: give the reason why {option!r} is a no-op"
        return
    base = _method_base(name, option)
    current = base.get(option, _default(factory, option))
    alts = METHOD_ALTERNATIVES.get(option, ())
    alt = next((v for v in alts if v != current), None) if alts else _alternative(option, current)
    epochs = METHOD_EPOCHS.get((name, option), (1, 1))
    try:
        changed = _train_two_steps(name, {**base, option: alt}, digits, epochs)
    except (RobustlabError, TypeError) as e:
        assert option in str(e) or str(alt) in str(e), (name, option, e)
        return
    reference = _train_two_steps(name, base, digits, epochs)
    assert any(u.shape != v.shape or not torch.equal(u, v) for u, v in zip(reference, changed)), \
        f"method {name!r}: option {option}={alt!r} (base {base}) changes nothing; wire it, reject it where it does " \
        f"not apply, or list it in {name}'s no_op_options with the reason"
