"""No option is accepted and ignored, detection side: every option of every registered detection attack and method
changes what it does on a (untrained, seeded) TinySSD-96, or is refused where it does not apply (an objective's
option on another objective). The classifier side is tests/unit/test_options.py."""
from __future__ import annotations

import pytest
import torch

from robustlab.errors import RobustlabError
from robustlab.methods import Batch, StepContext
from robustlab.models import create_model
from robustlab.registry import ATTACKS, METHODS
from tests.unit.test_options import _alternative, _default

DET_ATTACKS = [n for n in ATTACKS.names() if getattr(ATTACKS.get(n), "task", "classification") == "detection"]
DET_METHODS = [n for n in METHODS.names() if getattr(METHODS.get(n), "task", "classification") == "detection"]
ATTACK_BASE = {"det-pgd": {"steps": 2}, "owa": {"steps": 2}, "cwa": {"steps": 2}, "mda": {"steps": 2},
               "dag": {"max_iter": 3, "eps": 4.0}, "det-fgsm": {}}
# where an option matters: the objective (or attack) that reads it
CONTEXT = {("det-pgd", "beta_cls"): {"objective": "toat"}, ("det-pgd", "beta_reg"): {"objective": "toat"},
           **{("det-pgd", o): {"objective": "cwa"} for o in ("beta_o", "granularity", "attack_negatives", "cwa_scope")},
           ("det-fgsm", "beta_cls"): {"objective": "toat"}, ("det-fgsm", "beta_reg"): {"objective": "toat"},
           **{("det-fgsm", o): {"objective": "cwa"} for o in ("beta_o", "granularity", "attack_negatives", "cwa_scope")},
           **{(m, o): {"random_start": True} for m in ("det-pgd", "owa", "cwa", "mda", "det-fgsm") for o in ("seed",)}}
ALTERNATIVES = {"objective": ("full", "reg"), "granularity": ("gt",), "attack_negatives": ("ohem",),
                "cwa_scope": ("batch",), "eps": (4.0, 0.5), "alpha": (1.0,), "beta_o": (0.01,), "beta_cls": (0.01,),
                "beta_reg": (0.01,), "seed": (3,), "gamma": (0.9,), "iou_threshold": (0.5,), "prob_threshold": (0.01,),
                "steps": (3, 1), "replays": (2, 3), "max_iter": (4,)}


@pytest.fixture(scope="module")
def detector_batch(det_small):
    torch.manual_seed(0)
    model = create_model("tinyssd-96", **det_small.model_kwargs()).eval()
    # images with objects of two or more classes: class-wise weighting differs from a per-image rescaling there
    _, t_all = det_small.train.batch(torch.arange(64))
    labels = t_all[..., 4]
    multi = [i for i in range(64) if len({int(c) for c in labels[i] if c >= 0}) >= 2]
    x, t = det_small.train.batch(torch.tensor(multi[:4]))
    return model, x, t


def _alt(option, current):
    for v in ALTERNATIVES.get(option, ()):
        if v != current:
            return v
    return _alternative(option, current)


@pytest.mark.parametrize("name,option", [(n, o) for n in DET_ATTACKS for o in ATTACKS.options(n, 1)])
def test_every_detection_attack_option_does_something(name, option, detector_batch):
    model, x, t = detector_batch
    base = {**ATTACK_BASE[name], **CONTEXT.get((name, option), {})}
    alt = _alt(option, base.get(option, _default(ATTACKS.get(name), option)))
    try:
        changed = ATTACKS.create(name, model, **{**base, option: alt})(x, t)
    except (RobustlabError, TypeError) as e:
        assert option in str(e) or str(alt) in str(e), (name, option, e)
        return
    reference = ATTACKS.create(name, model, **base)(x, t)
    assert not torch.equal(reference, changed), f"{name}: option {option}={alt!r} (base {base}) changes nothing"


METHOD_BASE = {m: {"steps": 2} for m in ("cls", "reg", "mtd", "toat", "owat", "cwat")}
METHOD_CONTEXT = {("cwat-fast", "beta_cls"): {"objective": "toat"}, ("cwat-fast", "beta_reg"): {"objective": "toat"}}
# TOAT-6 clips at 6: an untrained detector's classification loss is above that (lift the clipping), its regression
# loss below (clip it hard)
METHOD_ALTERNATIVES = {"beta_cls": (1e6,), "beta_reg": (0.01,)}


def _fine_tune_step(name, kwargs, model0, x, t):
    model = create_model("tinyssd-96", num_classes=10, mean=model0.mean.flatten().tolist())
    model.load_state_dict(model0.state_dict())
    model.train()
    method = METHODS.create(name, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ctx = StepContext(0, 0, torch.Generator().manual_seed(0), attack_model=model)
    out = method.train_step(model, Batch(x, t), opt, ctx, step)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), out.loss.detach(), torch.tensor(ctx.passes)


@pytest.mark.parametrize("name,option", [(n, o) for n in DET_METHODS for o in METHODS.options(n)])
def test_every_detection_method_option_does_something(name, option, detector_batch):
    model, x, t = detector_batch
    base = {**METHOD_BASE.get(name, {}), **METHOD_CONTEXT.get((name, option), {})}
    current = base.get(option, _default(METHODS.get(name), option))
    alt = next((v for v in METHOD_ALTERNATIVES.get(option, ()) if v != current), None)
    alt = _alt(option, current) if alt is None else alt
    try:
        changed = _fine_tune_step(name, {**base, option: alt}, model, x, t)
    except (RobustlabError, TypeError) as e:
        assert option in str(e) or str(alt) in str(e), (name, option, e)
        return
    reference = _fine_tune_step(name, base, model, x, t)
    assert any(not torch.equal(u, v) for u, v in zip(reference, changed)), \
        f"{name}: option {option}={alt!r} (base {base}) changes nothing"
