"""The command line: --help everywhere, list, eval with JSON, train from a config, clear user errors."""
import json
import subprocess
import sys

import pytest
import torch

from robustlab.cli.main import build_parser, main
from robustlab.data import load_dataset
from robustlab.engine.checkpoint import save_model


def _run(*args):
    return subprocess.run([sys.executable, "-m", "robustlab.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("cmd", [[], ["list"], ["eval"], ["train"], ["run"], ["data"], ["det-report"], ["compare"],
                                 ["export-adversarials"], ["score-labels"], ["part-figure"], ["corruptions"],
                                 ["boundary-figure"], ["analyze"], ["metric"], ["metric", "wordnet"],
                                 ["metric", "visual"], *[["analyze", a] for a in ("gap", "entropy", "tsne", "toy",
                                                                                  "two-class", "score", "directional")],
                                 ["corruptions", "generate"], ["corruptions", "eval"], ["leaderboard"], ["eval-merge"],
                                 ["repeat"], ["compare-runs"]])
def test_help_on_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:  # in process: argparse prints the help and exits 0
        main([*cmd, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_help_shows_defaults_and_no_literal_percent(capsys):
    for cmd, want in ((["eval"], "(default: 500)"), (["run"], "(default: mnist5k-pgd-at)"),
                      (["compare"], "(default: cpu)"), (["train"], "(default: classification)"),
                      (["repeat"], "(default: 5)")):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        out = capsys.readouterr().out
        assert want in " ".join(out.split()), (cmd, out)
        assert "%%" not in out


def test_list_panels_and_whole_descriptions(capsys):
    assert main(["list", "panels"]) == 0
    out = capsys.readouterr().out
    for name in ("critic-rho", "part", "multi-norm", "table1", "table3"):
        assert name in out
    assert "default expansion: deepfool:steps=500" in out
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert "mask_saturated" in out  # PGD's docstring beyond its first line


def test_overrides_may_appear_anywhere_among_the_options(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\ndataset: digits\nmodel: mlp\nmodel_kwargs: {hidden: 8, depth: 1}\neval_samples: 16\n"
                   "eval_attack: 'fgsm:eps=0.1'\n")
    r = _run("train", "epochs=1", "--config", str(cfg), "seed=3", "--out-dir", str(tmp_path), "batch_size=256")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "t" / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["seed"] == 3 and saved["batch_size"] == 256
    r = _run("train", "--config", str(cfg), "--bogus-flag")
    assert r.returncode == 2 and "--bogus-flag" in r.stderr


def test_the_module_entry_point_runs():
    r = _run("--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def test_every_subcommand_is_covered_by_the_help_test():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"list", "eval", "train", "run", "data", "det-report", "compare", "export-adversarials",
                                "score-labels", "part-figure", "corruptions", "boundary-figure", "analyze",
                                "metric", "leaderboard", "eval-merge", "repeat", "compare-runs"}


def test_list(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    for name in ["fgsm", "pgd", "cw", "deepfool", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "square", "autoattack", "mma",
                 "critic"]:
        assert f"{name} " in out
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    for name in ["mlp", "lenet5", "small-cnn", "preact-resnet18", "resnet18", "wrn"]:
        assert f"{name} " in out
    assert main(["list", "datasets"]) == 0
    assert "mnist5k" in capsys.readouterr().out
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for name in ["standard", "fgsm-at", "fast-at", "free-at", "pgd-at", "trades", "mart", "vat", "margin", "critic"]:
        assert f"{name} " in out


def test_eval_writes_the_contracted_json(tmp_path, mnist_cnn, capsys):
    ckpt = save_model(tmp_path / "m.safetensors", mnist_cnn)
    out = tmp_path / "out.json"
    rc = main(["eval", "--model", str(ckpt), "--data", "mnist5k", "--attack", "pgd:norm=linf,eps=0.3,steps=5",
               "--attack", "fgsm:eps=0.1", "--json", str(out), "--n-samples", "50", "--quiet"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["n_samples"] == 50
    assert 0 <= r["clean_accuracy"] <= 1
    assert set(r["attacks"]) == {"pgd", "fgsm"}
    pgd = r["attacks"]["pgd"]
    assert pgd["norm"] == "linf" and pgd["eps"] == 0.3 and pgd["passes"]["forward"] > 0
    assert 0 <= pgd["robust_accuracy"] <= r["clean_accuracy"]
    assert r["union_accuracy"] <= min(a["robust_accuracy"] for a in r["attacks"].values())
    assert "per_class" in r and "average_accuracy" in r
    assert "| pgd |" in capsys.readouterr().out


def test_eval_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--model", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_eval_unknown_attack_exit_2(tmp_path, capsys):
    from robustlab.models import create_model

    ckpt = save_model(tmp_path / "m.safetensors", create_model("mlp", hidden=8, depth=1))
    assert main(["eval", "--model", str(ckpt), "--attack", "pgdd:eps=0.1"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_train_from_yaml_and_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nmodel: mlp\nmodel_kwargs: {hidden: 32, depth: 1}\ndataset: digits\nepochs: 1\n"
                   "batch_size: 128\noptimizer: adam\nlr: 0.003\nweight_decay: 0.0\neval_samples: 50\n")
    r = _run("train", "--config", str(cfg), "--out-dir", str(tmp_path), "eval_attack=fgsm:eps=0.1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t" / "best.safetensors").exists() and (tmp_path / "t" / "metrics.csv").exists()


def test_train_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 3\n")
    r = _run("train", "--config", str(cfg))
    assert r.returncode == 2 and "epochz" in r.stderr
    r = _run("train", "epochs=-1")
    assert r.returncode == 2 and "'epochs'" in r.stderr


def test_threads_option_rejects_zero(tmp_path):
    r = _run("train", "--threads", "0")
    assert r.returncode == 2 and "threads" in r.stderr


@pytest.mark.slow
def test_main_job_end_to_end_reduced(tmp_path):
    """README command 1 at a CI-sized setting: trains both models, evaluates, writes the report files."""
    r = _run("run", "--out-dir", str(tmp_path), "--name", "ci", "--epochs", "1", "--width", "4", "--n-eval", "30",
             "--n-curve", "30", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "ci"
    for f in ("results.json", "report.md", "report.html", "accuracy_vs_eps.png", "training_curves.png",
              "per_class.png", "standard/best.safetensors", "pgd-at/best.safetensors"):
        assert (run / f).exists(), f
    res = json.loads((run / "results.json").read_text())
    assert set(res["results"]) == {"standard", "pgd-at"}
    for model in res["results"].values():
        assert set(model["attacks"]) == {"pgd", "autoattack"}
        assert model["union_accuracy"] <= model["attacks"]["pgd"]["robust_accuracy"]
    assert "| standard |" in r.stdout and "| pgd-at |" in r.stdout
    assert "<table>" in (run / "report.html").read_text()


def test_compare_critic_panel_and_human_study_export(tmp_path, mnist_cnn, capsys):
    """`compare` with the critic-rho panel (reduced iterations) prints rho per attack and writes md/html/json;
    `export-adversarials` writes the grids, per-image PNGs and the two CSVs; `score-labels` scores a sheet."""
    import csv

    ckpt = save_model(tmp_path / "m.safetensors", mnist_cnn)
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", f"a={ckpt}", "--model", f"b={ckpt}", "--data", "mnist5k", "--n-samples", "20",
               "--attack", "deepfool:steps=20,max_step=0.1,project=true", "--attack", "cw:steps=10,binary_steps=2",
               "--attack", "critic:steps=50", "--attack", "pgd:norm=l2,eps=1.0,steps=5", "--out", str(out), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "deepfool (rho)" in table and "critic (rho)" in table and "pgd (acc %)" in table
    r = json.loads((out / "compare.json").read_text())
    assert set(r["results"]) == {"a", "b"}
    rho = r["results"]["a"]["attacks"]["critic"]["perturbation"]["rho"]
    assert rho > 0 and r["results"]["b"]["attacks"]["critic"]["perturbation"]["rho"] == rho  # same model, same number
    assert (out / "compare.md").exists() and (out / "compare.html").exists()

    exp = tmp_path / "study"
    assert main(["export-adversarials", "--model", str(ckpt), "--data", "mnist5k", "--n-samples", "12",
                 "--steps", "100", "--out", str(exp)]) == 0
    for f in ("originals.png", "boundary.png", "high_confidence.png", "targets.csv", "labels_to_fill.csv",
              "summary.json"):
        assert (exp / f).exists(), f
    key = list(csv.DictReader(open(exp / "targets.csv")))
    sheet = list(csv.DictReader(open(exp / "labels_to_fill.csv")))
    assert len(key) == len(sheet) > 0 and all((exp / row["file"]).exists() for row in sheet)
    assert {row["kind"] for row in key} <= {"boundary", "high_confidence"} and "kind" not in sheet[0]
    assert all(row["target"] != row["true_label"] for row in key)
    summary = json.loads((exp / "summary.json").read_text())
    hc = summary["mean_confidence_high_confidence"]
    assert summary["n_success_high_confidence"] > 0 and hc is not None  # else the comparison below says nothing
    assert hc > summary["mean_confidence_boundary"]  # Figure 4: boundary ~ low, high ~ high
    by_id = {row["id"]: row for row in key}
    filled = tmp_path / "filled.csv"
    with open(filled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "file", "label"])
        for row in sheet:  # an annotator who always sees the target
            w.writerow([row["id"], row["file"], by_id[row["id"]]["target"]])
    capsys.readouterr()
    assert main(["score-labels", "--targets", str(exp / "targets.csv"), "--labels", str(filled)]) == 0
    assert "| 100.00 | 0.00 |" in capsys.readouterr().out


def test_corruptions_generate_eval_and_part_figure(tmp_path, mnist_cnn, capsys):
    ckpt = save_model(tmp_path / "m.safetensors", mnist_cnn)
    root = tmp_path / "c"
    assert main(["corruptions", "generate", "--data", "mnist5k", "--n-samples", "8", "--out", str(root),
                 "--corruption", "fog", "--corruption", "contrast", "--quiet"]) == 0
    assert (root / "fog.npy").exists() and (root / "labels.npy").exists()
    capsys.readouterr()
    assert main(["corruptions", "eval", "--model", f"A={ckpt}", "--model", f"B={ckpt}", "--root", str(root),
                 "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "| fog |" in out and "| contrast |" in out and "**mean**" in out
    r = json.loads((tmp_path / "ev" / "corruptions.json").read_text())
    assert r["accuracy"]["A"] == r["accuracy"]["B"] and set(r["accuracy"]["A"]["fog"]) == {"1", "2", "3", "4", "5", "mean"}
    assert main(["corruptions", "eval", "--model", str(ckpt), "--root", str(tmp_path / "nothing")]) == 2
    png = tmp_path / "part.png"
    assert main(["part-figure", "--part", str(ckpt), "--at", str(ckpt), "--data", "mnist5k", "--n-samples", "2",
                 "--eps", "0.3", "--eps-low", "0.2", "--step-size", "0.05", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_boundary_figure_is_deterministic(tmp_path, mnist_cnn, capsys):
    ckpt = save_model(tmp_path / "m.safetensors", mnist_cnn)
    args = ["boundary-figure", "--model", f"A={ckpt}", "--model", f"B={ckpt}", "--data", "mnist5k", "--n-samples", "2",
            "--grid", "9", "--attack", "pgd:norm=linf,eps=0.3,steps=5,step_size=0.1"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a == json.loads((tmp_path / "b.json").read_text()) and a["pred"]["A"] == a["pred"]["B"]
    assert len(a["pred"]["A"]) == 2 and len(a["pred"]["A"][0]) == 9 and (tmp_path / "a.png").stat().st_size > 1000
    # the clean image sits at the centre of the slice: its prediction there is the model's clean prediction
    with torch.no_grad():
        clean = mnist_cnn(load_dataset("mnist5k").x_test[:2]).argmax(1)
    assert [p[4][4] for p in a["pred"]["A"]] == clean.tolist()
