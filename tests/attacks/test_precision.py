"""precision="bf16" and compile=True: measured options for every gradient attack and for `evaluate`.

bf16 autocasts the forward and keeps gradients, projections and the judging of adversarial points in fp32; it must
agree with fp32 within 1 point on the test model, and `evaluate` re-runs a bf16 attack in fp32 on the first batch
and warns when bf16 is weaker. compile=True runs the same attacks through `torch.compile` (one compilation of the
model, shared by the attacks) with the same results within 1 point.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from robustlab import evaluate
from robustlab.attacks import PGD, AutoAttack
from robustlab.attacks.base import _COMPILED, PassCounter
from robustlab.errors import InputError
from robustlab.registry import ATTACKS

# every classifier attack that follows gradients, with a short budget (the panel of `robustlab eval` specs)
GRADIENT_SPECS = [
    "fgsm:eps=0.1", "pgd:eps=0.1,steps=10", "pgd:norm=l2,eps=1.0,steps=10", "pgd:norm=l1,eps=8.0,steps=10",
    "apgd-ce:eps=0.1,steps=10", "apgd-dlr:eps=0.1,steps=10", "apgd-t:eps=0.1,steps=10,n_targets=3",
    "fab:eps=0.1,steps=10,targeted=true,n_targets=3", "deepfool:eps=1.0,steps=10", "cw:eps=1.0,steps=30,binary_steps=2",
    "mma:eps=0.1,steps=5", "ead:eps=8.0,steps=50,binary_steps=2",
]


def test_every_gradient_attack_is_covered():
    """A new gradient attack must join GRADIENT_SPECS (its bf16 and compiled runs are checked here)."""
    covered = {s.split(":")[0] for s in GRADIENT_SPECS}
    not_gradient = {"square", "salt-pepper", "gaussian-noise", "autoattack", "critic", "pixel-ag"}  # black-box, or tested below/elsewhere
    # Brendel-Bethge's points sit within float rounding of the boundary (its walk ends on it): another float path
    # flips some (compiled, 30 steps on this model: 71.5% vs 68.5% eager), so it is not held to 1 point here; its
    # fp32 results are checked against foolbox's (test_reference.py)
    not_gradient |= {"brendel-bethge"}
    classifier = {n for n in ATTACKS.names() if getattr(ATTACKS.get(n), "task", "classification") == "classification"}
    assert classifier - not_gradient <= covered, classifier - not_gradient - covered


@pytest.fixture(scope="module")
def fp32_result(mnist_cnn, mnist):
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    return evaluate(mnist_cnn, x, y, GRADIENT_SPECS, batch_size=200, checks=False)


def _close(a, b, what):
    for name in a["attacks"]:
        ra, rb = a["attacks"][name]["robust_accuracy"], b["attacks"][name]["robust_accuracy"]
        assert abs(ra - rb) <= 0.01 + 1e-6, f"{name}: {what} {rb:.3f} vs fp32 {ra:.3f}"


def test_bf16_agrees_with_fp32_within_one_point_or_says_so(mnist_cnn, mnist, fp32_result):
    """Each bf16 attack is within 1 point of fp32, or weaker by more and then flagged untrusted with a warning (the
    first batch is the whole set here, so the fp32 re-run is exactly the fp32 evaluation)."""
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(mnist_cnn, x, y, GRADIENT_SPECS, batch_size=200, checks=False, precision="bf16")
    warned = " ".join(str(w.message) for w in caught if "not trustworthy" in str(w.message))
    within = 0
    for name, entry in result["attacks"].items():
        fp32 = fp32_result["attacks"][name]["robust_accuracy"]
        check = entry["precision_check"]
        assert entry["precision"] == "bf16" and check["n"] == 200
        assert check["fp32_robust_accuracy"] == pytest.approx(fp32)
        assert check["trusted"] == (entry["robust_accuracy"] - fp32 <= 0.01 + 1e-6), (name, check)
        if abs(entry["robust_accuracy"] - fp32) <= 0.01 + 1e-6:
            within += 1
        else:  # a stronger bf16 attack is still judged in fp32 (a true result); a weaker one must be flagged
            assert check["trusted"] or f"'{entry['attack']}'" in warned, (name, entry["robust_accuracy"], fp32)
    assert within >= len(GRADIENT_SPECS) // 2, "bf16 should agree on most attacks of this model"


def test_bf16_forward_really_runs_in_bf16(mnist_cnn, mnist):
    seen = []
    conv = next(m for m in mnist_cnn.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        logits = PassCounter(mnist_cnn, precision="bf16").logits(mnist.x_test[:4])
    finally:
        handle.remove()
    assert torch.bfloat16 in seen and logits.dtype == torch.float32  # losses and gradients stay fp32


def test_a_weaker_bf16_attack_warns_also_when_resumed(mnist_cnn, mnist, monkeypatch, tmp_path):
    """The check runs once (its result is stored with an evaluation state); the warning comes with every result
    built from it: the first run and a resumed one."""
    import robustlab.engine.evaluator as ev

    monkeypatch.setattr(ev, "BF16_TOLERANCE", -1.0)  # any result counts as weaker: the warning must fire
    kw = dict(checks=False, precision="bf16", state=tmp_path / "state")
    for _ in range(2):  # the second run finds every record in the state and computes nothing
        with pytest.warns(RuntimeWarning, match="not trustworthy"):
            r = evaluate(mnist_cnn, mnist.x_test[:32], mnist.y_test[:32], ["pgd:eps=0.1,steps=5"], **kw)
        assert r["attacks"]["pgd"]["precision_check"]["trusted"] is False


def test_compiled_attacks_agree_with_eager(mnist_cnn, mnist, fp32_result):
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    _COMPILED.pop(mnist_cnn, None)
    result = evaluate(mnist_cnn, x, y, GRADIENT_SPECS, batch_size=200, checks=False, compile=True)
    assert mnist_cnn in _COMPILED  # the forward went through torch.compile
    _close(fp32_result, result, "compiled")
    assert all(e["compile"] is True for e in result["attacks"].values())


def test_compile_works_as_the_first_thing_a_process_compiles():
    """`import torch` does not import torch._functorch.config; compile_module must not rely on an earlier compile
    having imported it (a fresh `robustlab eval --compile` did)."""
    import subprocess
    import sys

    code = ("import torch; from robustlab.attacks import PGD; m = torch.nn.Sequential(torch.nn.Flatten(), "
            "torch.nn.Linear(4, 3)).eval(); PGD(m, eps=0.1, steps=1, compile=True).make_counter()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_autoattack_bf16_components_and_reference_refusal(mnist_cnn, mnist):
    aa = AutoAttack(mnist_cnn, eps=0.1, precision="bf16")
    assert all(c.precision == "bf16" for c in aa.components())
    with pytest.raises(InputError, match="precision"):
        AutoAttack(mnist_cnn, eps=0.1, impl="reference", precision="bf16")


def test_bad_values_and_objects_are_refused_before_work(mnist_cnn, mnist):
    x, y = mnist.x_test[:8], mnist.y_test[:8]
    with pytest.raises(InputError, match="fp16"):
        PGD(mnist_cnn, eps=0.1, precision="fp16")
    with pytest.raises(InputError, match="precision"):
        evaluate(mnist_cnn, x, y, ["pgd:eps=0.1"], precision="half")
    with pytest.raises(InputError, match="spec strings"):
        evaluate(mnist_cnn, x, y, [PGD(mnist_cnn, eps=0.1)], precision="bf16")
