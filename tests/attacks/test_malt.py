"""MALT targeting (apgd-t:targeting=malt) and AutoAttack version=fast.

Oracle: for a linear classifier z = Wx + b the boundary between classes y and j is a hyperplane, and the l_p
distance from x to it is (z_y - z_j) / ||w_y - w_j||_q (q the dual norm), which is MALT's score exactly. The
model below puts a far class second by logit and a near one last, so rank targeting and MALT disagree."""
import pytest
import torch
from torch import nn

from robustlab.attacks import APGDT, AutoAttack
from robustlab.attacks.apgd import malt_targets
from robustlab.attacks.base import PassCounter
from robustlab.errors import InputError


class LinearModel(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(w)
            self.lin.bias.copy_(b)

    def forward(self, x):
        return self.lin(x.flatten(1))


def _linear(d: int = 16, k: int = 6, seed: int = 0) -> LinearModel:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)][:, None]  # rows of very different norms
    return LinearModel(scale * torch.randn(k, d, generator=g), torch.randn(k, generator=g)).eval()


def _exact_distance(model: LinearModel, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """(N, K): the l_p distance from each x to its boundary with each class (inf for y itself), box ignored."""
    w, b = model.lin.weight.detach(), model.lin.bias.detach()
    z = x.flatten(1) @ w.T + b
    diff = w[y][:, None, :] - w[None, :, :]  # (N, K, d): w_y - w_j
    dual = diff.abs().sum(2) if norm == "linf" else diff.norm(dim=2)
    dist = (z.gather(1, y[:, None]) - z) / dual
    return dist.scatter(1, y[:, None], torch.inf)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_malt_picks_the_analytically_closest_boundaries(norm):
    model = _linear()
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    dist = _exact_distance(model, x, y, norm)
    got = malt_targets(PassCounter(model), x, y, norm, n_targets=5)
    assert torch.equal(got, dist.argsort(1)[:, :5])
    # and the scores order differently from the logits on some images (else the test says nothing new)
    with torch.no_grad():
        rank = model(x).sort(1, descending=True).indices[:, 1:6]
    assert (got != rank).any(1).float().mean() > 0.2


def test_malt_breaks_with_one_target_what_rank_targeting_misses():
    """Class 1 has the second-largest logit but lies far away; class 2 has a lower logit but a boundary within eps
    (its direction spreads over 7 pixels the class-1 attack never moves, so a random start cannot cross it by
    chance). One target each: MALT's reaches the boundary, rank's cannot."""
    w = torch.zeros(4, 16)  # class 3: far below the others (the targeted DLR loss needs 4 classes)
    w[0, 0], w[1, 8:], w[2, 1:8] = 1.0, 0.05, 1.0
    model = LinearModel(w, torch.tensor([0.0, 0.0, -1.52, -5.0])).eval()
    x = torch.full((1, 1, 4, 4), 0.2)
    x[0, 0, 0, 0] = 1.0  # z = (1.0, 0.08, -0.12, -5): class 2 below class 1 by logit
    y = torch.tensor([0])
    dist = _exact_distance(model, x, y, "linf")[0]
    assert dist[2] < 0.15 < dist[1]  # class 2 (0.14) is within eps, class 1 (0.66) is not
    rank = APGDT(model, eps=0.15, steps=50, n_targets=1).run(x, y)
    malt = APGDT(model, eps=0.15, steps=50, n_targets=1, targeting="malt").run(x, y)
    assert not rank.success.any() and malt.success.all()
    assert (malt.x_adv - x).abs().max() <= 0.15 + 1e-6


def test_malt_is_batched_like_rank_targeting(digits_mlp_at, digits):
    """targets side by side (one working batch) or one at a time, compacted or not: the same broken set."""
    x, y = digits.x_test[:120], digits.y_test[:120]
    runs = [APGDT(digits_mlp_at, eps=0.12, steps=20, targeting="malt", targets_at_once=k, compact=c).run(x, y).success
            for k, c in ((1, True), (5, True), (5, False))]
    assert runs[0].any() and torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_options_are_checked():
    model = _linear()
    with pytest.raises(InputError, match="targeting"):
        APGDT(model, targeting="closest")
    with pytest.raises(InputError, match="malt_candidates"):
        APGDT(model, malt_candidates=20)  # rank targeting has no candidates
    with pytest.raises(InputError, match="version='fast'"):
        AutoAttack(model, version="fast", impl="reference")
    with pytest.raises(InputError, match="malt_targets"):
        AutoAttack(model, malt_targets=3)
    assert APGDT(model).n_targets == 9 and APGDT(model, targeting="malt").n_targets == 5
    assert [a.name for a in AutoAttack(model, version="fast").components()] == ["apgd-ce", "apgd-t"]


# AutoAttack version=fast in `evaluate`: the escalation rule -----------------------------------------------------
class Quantised(nn.Module):
    """Gradient masking by construction: the input is rounded to 5 levels, so the input gradient is zero."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class Noisy(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x + 0.1 * torch.randn_like(x))


FAST = "autoattack:eps=0.1,version=fast"
# the escalation tests: standard AutoAttack (what fast escalates to) with shorter stages, the same code path
FAST_SHORT = "autoattack:eps=0.1,version=fast,apgd_steps=20,fab_steps=20,square_queries=300"


def test_an_honest_model_runs_the_fast_version_and_the_log_says_so(digits_mlp_at, digits):
    from robustlab import evaluate
    from robustlab.reports.markdown import attack_log

    result = evaluate(digits_mlp_at, digits.x_test[:150], digits.y_test[:150], [FAST], batch_size=75)
    entry = result["attacks"]["autoattack"]
    assert entry["ran"] == "fast" and entry["escalated_because"] == [] and result["integrity"]["ok"]
    assert [s["attack"] for s in entry["stages"]] == ["apgd-ce", "apgd-t-malt"]
    assert attack_log(result, "autoattack")[0] == "using fast version including apgd-ce, apgd-t-malt."
    # the probe's black-box check counted version=fast as the white-box attack it is
    assert result["integrity"]["per_norm"]["linf"]["black_box"]["after"] == ["autoattack"]


def test_a_flagged_probe_escalates_to_standard_in_every_shard(digits_mlp_at, digits, tmp_path):
    """Gradient masking: the probe flags it on batch 0, so standard AutoAttack runs on every batch, batch 0
    included; two shards sharing a state folder follow the one stored decision, and their merge equals the single
    run."""
    from robustlab import evaluate
    from robustlab.engine.evaluator import without_seconds
    from robustlab.engine.tasks import merge_evaluations

    model, x, y = Quantised(digits_mlp_at).eval(), digits.x_test[:90], digits.y_test[:90]
    kw = dict(batch_size=30, progress=False)
    with pytest.warns(RuntimeWarning, match="standard AutoAttack runs instead of version=fast"):
        single = evaluate(model, x, y, [FAST_SHORT], **kw)
    entry = single["attacks"]["autoattack"]
    assert entry["ran"] == "standard" and any("exactly zero" in f for f in entry["escalated_because"])
    assert [s["attack"] for s in entry["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    standard = evaluate(model, x, y, ["autoattack:eps=0.1,apgd_steps=20,fab_steps=20,square_queries=300"], **kw)
    assert entry["robust_accuracy"] == standard["attacks"]["autoattack"]["robust_accuracy"]
    with pytest.warns(RuntimeWarning):
        for i in (1, 0):  # the shard without batch 0 first: it makes (and stores) the decision
            evaluate(model, x, y, [FAST_SHORT], state=tmp_path / "s", shard=(i, 2), **kw)
        merged = merge_evaluations([tmp_path / "s"])
    assert without_seconds(merged) == without_seconds(single)


def test_a_resume_after_the_decision_recomputes_batch_0_of_the_escalated_attack(digits_mlp_at, digits, tmp_path):
    """A kill between storing the decision and re-running batch 0 leaves batch 0's fast record: it is recomputed."""
    import json

    from robustlab import evaluate
    from robustlab.engine.evaluator import without_seconds

    model, x, y = Quantised(digits_mlp_at).eval(), digits.x_test[:60], digits.y_test[:60]
    kw = dict(batch_size=30, progress=False)
    with pytest.warns(RuntimeWarning):
        single = evaluate(model, x, y, [FAST_SHORT], **kw)
        evaluate(model, x, y, [FAST_SHORT], state=tmp_path / "s", **kw)
    # what a kill right after the decision leaves: the decision, batch 0's clean and fast records, nothing else
    for p in (tmp_path / "s").glob("batch-000001*"):
        p.unlink()
    (tmp_path / "s" / "shard-0-of-1.json").unlink()
    record = tmp_path / "s" / "batch-000000-attack-00.pt"
    stored = torch.load(record, weights_only=True)
    stored["ran"] = "fast"
    torch.save(stored, record)
    assert json.loads((tmp_path / "s" / "checks.json").read_text())["escalation"]["autoattack"]["ran"] == "standard"
    with pytest.warns(RuntimeWarning):
        resumed = evaluate(model, x, y, [FAST_SHORT], state=tmp_path / "s", **kw)
    assert torch.load(record, weights_only=True)["ran"] == "standard"
    assert without_seconds(resumed) == without_seconds(single)


def test_a_randomised_model_escalates_to_rand(digits_mlp_at, digits):
    from robustlab import evaluate

    result = evaluate(Noisy(digits_mlp_at).eval(), digits.x_test[:40], digits.y_test[:40],
                      ["autoattack:eps=0.1,version=fast,apgd_steps=10"], draws=4, progress=False)
    entry = result["attacks"]["autoattack"]
    assert entry["ran"] == "rand" and any("randomised" in f for f in entry["escalated_because"])
    assert [s["attack"] for s in entry["stages"]] == ["apgd-ce", "apgd-dlr"]


def test_fast_without_the_probe_is_refused_before_any_work_or_says_it_is_unchecked(digits_mlp_at, digits):
    """integrity='off' asked by name is refused; robustlab's own quiet evaluations (checks=False, the trainer's
    per-epoch one) run fast unchecked and say so."""
    from robustlab import evaluate

    x, y = digits.x_test[:10], digits.y_test[:10]
    with pytest.raises(InputError, match="integrity='off' would leave it unchecked"):
        evaluate(digits_mlp_at, x, y, [FAST], integrity="off")
    entry = evaluate(digits_mlp_at, x, y, [FAST], checks=False)["attacks"]["autoattack"]
    assert entry["ran"] == "fast" and entry["escalated_because"] is None


def test_probability_margin_loss_is_pmas_margin():
    """PMA's loss (Xie et al. 2024): max_{j != y} p_j - p_y of the softmax (targeted: p_t - p_y), positive exactly
    where the image is misclassified."""
    from robustlab.losses import probability_margin_loss

    torch.manual_seed(0)
    logits, y = torch.randn(64, 10) * 3, torch.randint(0, 10, (64,))
    p = logits.softmax(1)
    other = torch.stack([torch.cat([p[i, :y[i]], p[i, y[i] + 1:]]).max() for i in range(64)])
    assert torch.allclose(probability_margin_loss(logits, y), other - p[torch.arange(64), y], atol=1e-6)
    assert torch.equal(probability_margin_loss(logits, y) > 0, logits.argmax(1) != y)
    t = (y + 1) % 10
    assert torch.allclose(probability_margin_loss(logits, y, t), p[torch.arange(64), t] - p[torch.arange(64), y])

