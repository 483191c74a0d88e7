"""The WPGD paper's analyses (spec wpgd.md 5 and 8): shapes and ranges, exact cases, determinism, the CLI."""
import json

import pytest
import torch
from torch import nn

from robustlab.analysis.wpgd import (
    accuracy_gap,
    adversarial_confusion,
    confusion,
    correlation,
    entropy_histograms,
    penultimate_features,
    toy3,
    tsne_features,
    weighted_score,
)
from robustlab.cli.main import main
from robustlab.engine.checkpoint import save_model
from robustlab.errors import InputError
from robustlab.label_metrics.metric import cifar10_wordnet, uniform_metric


class _ReadOut(nn.Module):
    """Class c images light pixel c: a linear read-out with a large margin (exactly right, robust at small eps)."""

    def __init__(self, k=4):
        super().__init__()
        self.fc = nn.Linear(k * 4, k, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            for c in range(k):
                self.fc.weight[c, c] = 20.0

    def forward(self, x):
        return self.fc(x.flatten(1))


def _readout_data(k=4, n=8):
    y = torch.arange(k).repeat(n)
    x = torch.zeros(len(y), 1, 4, k)
    x.view(len(y), -1)[torch.arange(len(y)), y] = 1.0
    return x, y


def test_confusion_and_correlation():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 0, 2])
    m = confusion(y, p, 3)
    assert torch.allclose(m.sum(1), torch.ones(3, dtype=torch.float64)) and m[0, 1] == 0.5
    c = cifar10_wordnet()
    assert abs(correlation(c, c)["pearson"] - 1) < 1e-12 and abs(correlation(c, -c)["spearman"] + 1) < 1e-12


def test_accuracy_gap_is_in_unit_range_and_zero_for_identical_models(tmp_path):
    x, y = _readout_data()
    model = _ReadOut()
    metric = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]], dtype=torch.float64) / 3
    r = accuracy_gap(model, model, x, y, metric, tmp_path / "gap.png")
    g = torch.tensor(r["gap"])
    assert g.shape == (4, 4) and (g == 0).all() and r["pearson"] != r["pearson"]  # no gap: correlation undefined
    shifted = nn.Sequential(_ReadOut(), _Roll())
    r = accuracy_gap(model, shifted, x, y, metric, tmp_path / "gap.png")
    g = torch.tensor(r["gap"])
    assert ((g >= 0) & (g <= 1)).all() and g.diagonal().eq(1).all() and -1 <= r["pearson"] <= 1
    with pytest.raises(ValueError, match="constant off the diagonal"):
        accuracy_gap(model, shifted, x, y, uniform_metric(4), tmp_path / "gap.png")
    assert (tmp_path / "gap.png").stat().st_size > 1000 and json.loads((tmp_path / "gap.json").read_text())["n"] == 32


def test_weighted_score_is_zero_without_adversarial_mistakes(tmp_path):
    x, y = _readout_data()
    model = _ReadOut()
    metric = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]], dtype=torch.float64) / 3
    m = adversarial_confusion(model, x, y, eps=0.05, cost=metric)
    assert torch.equal(m, torch.eye(4, dtype=torch.float64))
    r = weighted_score({"a": model, "b": model}, x, y, metric, tmp_path / "s.png", eps=0.05)
    assert r["models"]["a"]["S"] == 0 and r["models"]["b"]["S_minus_reference"] == 0
    # a broken model that sends class i to i+1: S = mean of the first off-diagonal costs per row
    shifted = nn.Sequential(_ReadOut(), _Roll())
    r2 = weighted_score({"shift": shifted}, x, y, metric, tmp_path / "s2.png", eps=0.0 + 1e-6)
    expected = sum(metric[i, (i + 1) % 4].item() for i in range(4))
    assert abs(r2["models"]["shift"]["S"] - expected) < 1e-9


class _Roll(nn.Module):
    def forward(self, z):
        return z.roll(1, dims=1)  # predicts (true class + 1) mod K


def test_entropy_tsne_and_features(tmp_path, digits_mlp, digits):
    x, y = digits.x_test[:200], digits.y_test[:200]
    f = penultimate_features(digits_mlp, x)
    assert f.shape == (200, 64)
    r = entropy_histograms({"a": digits_mlp}, x, y, tmp_path / "e.png", class_index=3)
    assert 0 <= r["models"]["a"]["mean_entropy"] <= torch.log(torch.tensor(10.0)).item()
    t = tsne_features({"a": digits_mlp}, x, y, tmp_path / "t.png", n_per_class=10)
    assert len(t["models"]["a"]["embedding"]) == t["n"] and -1 <= t["models"]["a"]["silhouette"] <= 1


def test_toy_problem_is_deterministic_under_a_seed(tmp_path):
    a = toy3(tmp_path / "a.png", eps_list=(0.25,), seeds=(3,), epochs=40, grid=21)
    b = toy3(tmp_path / "b.png", eps_list=(0.25,), seeds=(3,), epochs=40, grid=21)
    assert a == b and [m["kind"] for m in a["models"]] == ["ce", "pgd", "wpgd"] and "check" not in a
    assert (tmp_path / "a.png").stat().st_size > 1000
    c = toy3(tmp_path / "c.png", eps_list=(0.25,), seeds=(4,), epochs=40, grid=21)
    assert c != a
    both = toy3(tmp_path / "both.png", eps_list=(0.25,), seeds=(3, 4), epochs=40, grid=21)
    assert both["models"] == a["models"] + c["models"]  # a seed's row does not depend on the other seeds
    check = both["check"]["0.25"]
    pgd, wpgd = ([m["accuracy_02"] for m in (a, c) for m in m["models"] if m["kind"] == k] for k in ("pgd", "wpgd"))
    assert check["pgd"] == pgd and check["wpgd"] == wpgd
    assert check["wpgd_mean_higher"] == (sum(wpgd) > sum(pgd))
    assert check["wpgd_minus_pgd"]["mean"] == pytest.approx((wpgd[0] - pgd[0] + wpgd[1] - pgd[1]) / 2)
    with pytest.raises(InputError, match="distinct seeds"):
        toy3(tmp_path / "d.png", seeds=(3, 3), epochs=1)
    with pytest.raises(InputError, match="lr=0"):
        toy3(tmp_path / "d.png", epochs=1, lr=0)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.25, 0.5])  # one budget per test: xdist runs them side by side
def test_toy_check_over_five_seeds(tmp_path, eps):
    """The spec's 5-seed check (wpgd.md 5.5): accuracy on the cheap pair {0, 2}, averaged over seeds 0-4, is higher
    for WPGD than for PGD at eps 0.25 and 0.5. At CI size: the spec's data, network, attack and seeds, but 300
    full-batch epochs at lr 6.6667e-3 instead of 2,000 at 1e-3 (the same lr x epochs, 15% of the CPU: about 30 s per
    budget). Measured 2026-12-07: 15 of the 20 accuracies within 2 points of the spec's protocol's, the largest
    difference 4.9 (docs/results.md, WPGD toy), WPGD - PGD +2.2 / +8.1 points on average (the spec's protocol: +1.9 /
    +8.7). It holds as worded; the paired interval includes 0 at both budgets (docs/results.md: inconclusive at 5
    seeds), so the interval is checked to be reported around the mean, not its sign. A budget's models do not depend
    on the other budget's (each trains from the seed), so one budget per test gives the numbers of both in one run."""
    check = toy3(tmp_path / "toy.png", eps_list=(eps,), seeds=range(5), epochs=300, lr=6.6667e-3,
                 grid=21)["check"][f"{eps:g}"]
    assert check["wpgd_mean_higher"], check
    lo, hi = check["wpgd_minus_pgd"]["ci"]
    assert lo < check["wpgd_minus_pgd"]["mean"] < hi


def test_analyze_toy_cli_over_seeds(tmp_path, capsys):
    assert main(["analyze", "toy", "--out", str(tmp_path / "t.png"), "--eps", "0.5", "--epochs", "3",
                 "--seed", "1", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "seed 2 wpgd  eps 0.5" in out and "eps 0.5: acc{0,2} WPGD - PGD over 2 seeds" in out
    assert json.loads((tmp_path / "t.json").read_text())["seeds"] == [1, 2]
    assert main(["analyze", "toy", "--out", str(tmp_path / "u.png"), "--lr", "0"]) == 2
    assert "lr > 0, got epochs=2000, lr=0.0" in capsys.readouterr().err


def test_analyze_cli(tmp_path, digits_mlp, capsys):
    ckpt = save_model(tmp_path / "m.safetensors", digits_mlp)
    common = ["--model", f"ce={ckpt}", "--model", f"rob={ckpt}", "--data", "digits", "--n-samples", "100"]
    assert main(["analyze", "gap", *common, "--metric", "uniform", "--out", str(tmp_path / "g.png")]) == 2  # constant
    assert main(["analyze", "gap", *common, "--metric", "visual", "--out", str(tmp_path / "g.png")]) == 0
    assert set(json.loads((tmp_path / "g.json").read_text())) >= {"gap", "metric", "pearson", "spearman"}
    capsys.readouterr()
    assert main(["analyze", "score", *common, "--metric", "uniform", "--eps", "0.05", "--steps", "3",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert "| ce |" in capsys.readouterr().out
    assert main(["analyze", "directional", *common, "--eps", "0.05", "--steps", "3", "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.json").exists()
    assert main(["analyze", "gap", "--model", str(ckpt), "--out", str(tmp_path / "x.png")]) == 2  # needs two
    (tmp_path / "m3.csv").write_text("0,1,2\n1,0,1\n2,1,0\n")
    assert main(["analyze", "score", *common, "--metric", str(tmp_path / "m3.csv"), "--eps", "0.05",
                 "--out", str(tmp_path / "x.png")]) == 2  # a 3 x 3 metric for a 10-class model
    assert "3 x 3 but the model has 10 classes" in capsys.readouterr().err
    assert main(["metric", "visual", "--model", str(ckpt), "--data", "digits", "--per-class", "5",
                 "--out", str(tmp_path / "v.npy")]) == 0
    assert main(["metric", "wordnet", "--classes", str(tmp_path / "none.txt"), "--out", str(tmp_path / "w.npy")]) == 2


def test_two_class_balanced_and_unbalanced_runs(tmp_path):
    from robustlab.analysis.wpgd import two_class

    r = two_class(tmp_path / "tc.png", dataset="digits", pairs=[(3, 8)], ratio=0.3, eps=0.1, steps=2, epochs=2,
                  model="mlp", model_kwargs={"input_size": 8, "hidden": 32, "depth": 1}, out_dir=str(tmp_path / "runs"))
    assert set(r["runs"]) == {"3-8-bal-standard", "3-8-bal-pgd-at", "3-8-unbal-standard", "3-8-unbal-pgd-at"}
    assert all(len(v["val_error"]) == 2 and all(0 <= e <= 1 for e in v["val_error"]) for v in r["runs"].values())
    assert (tmp_path / "tc.png").stat().st_size > 1000


def test_toy_test_set_is_the_same_mixture():
    from robustlab.analysis.wpgd import toy_data

    xa, ya = toy_data(5)
    xb, yb = toy_data(5, sample_seed=99)
    assert torch.equal(ya, yb) and not torch.equal(xa, xb)
    for c in range(3):  # same component means: the class centroids agree up to sampling noise
        assert (xa[ya == c].mean(0) - xb[yb == c].mean(0)).norm() < 0.3
