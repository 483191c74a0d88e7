"""The results store and `robustlab leaderboard`: every `robustlab eval` is recorded (summary and per-sample flags)
under the model's weight hash, the data and the threat; best-known robust accuracy is the per-sample worst case over
every evaluation; two processes writing at once lose nothing."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from robustlab import __version__, evaluate
from robustlab.cli.main import main
from robustlab.engine.checkpoint import save_model
from robustlab.errors import InputError
from robustlab.reports.store import format_leaderboard, leaderboard, model_hash, record, threat_key


def test_best_known_is_the_per_sample_union(mnist_cnn, mnist, tmp_path):
    store = tmp_path / "r.sqlite"
    x, y = mnist.x_test[:80], mnist.y_test[:80]
    runs = [["fgsm:eps=0.1"], ["pgd:eps=0.1,steps=5"], ["pgd:eps=0.1,steps=5,loss=cw,seed=3"]]
    flags = []
    for specs in runs:
        r = evaluate(mnist_cnn, x, y, specs, checks=False, keep_records=True)
        record(store, model_digest=model_hash(mnist_cnn), model_name="cnn", data="mnist5k:test", result=r, specs=specs,
               version=__version__)
        flags.append(torch.tensor(r["records"]["robust"][next(iter(r["attacks"]))]))
    expected = torch.stack(flags).all(0).float().mean().item()
    worst_single = min(f.float().mean().item() for f in flags)
    (row,) = leaderboard(store)
    assert row["best_known_accuracy"] == pytest.approx(expected)
    # the union is at least as strong as any one attack (the store's share is exact, the flags' mean float32)
    assert row["best_known_accuracy"] <= worst_single + 1e-6
    assert row["evaluations"] == 3 and row["threat"] == "linf:0.1" and row["n_samples"] == 80
    assert row["model_hash"] == model_hash(mnist_cnn)[:12]
    for fmt in ("md", "csv", "html"):
        assert "cnn" in format_leaderboard([row], fmt)
    assert json.loads(format_leaderboard([row], "json"))[0]["evaluations"] == 3


def test_eval_records_and_leaderboard_prints(mnist_cnn, mnist, tmp_path, capsys):
    ckpt = save_model(tmp_path / "m.safetensors", mnist_cnn, {"config": {"dataset": "mnist5k"}})
    store = tmp_path / "s.sqlite"
    spec = "autoattack:eps=8/255,apgd_steps=3,fab_steps=3,square_queries=10,n_targets=2"
    assert main(["eval", "--model", str(ckpt), "--attack", spec, "--n-samples", "40", "--quiet", "--store",
                 str(store)]) == 0
    assert main(["eval", "--model", str(ckpt), "--attack", "pgd:eps=8/255,steps=3", "--n-samples", "40", "--quiet",
                 "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--store", str(store), "--threat", "linf:8/255", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["attacks"] == ["autoattack", "pgd"] and row["data"] == "mnist5k:test"
    assert row["autoattack_accuracy"] is not None and row["best_known_accuracy"] <= row["autoattack_accuracy"]
    assert main(["leaderboard", "--store", str(store), "--threat", "l2:0.5", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["eval", "--model", str(ckpt), "--attack", "fgsm:eps=0.1", "--n-samples", "8", "--quiet",
                 "--no-store"]) == 0


def test_threat_keys():
    assert threat_key("linf", 8 / 255) == "linf:8/255" and threat_key("l2", 0.5) == "l2:0.5"
    assert threat_key("l2", None) == "l2:unbounded" and threat_key("linf", "tensor") == "linf:per-sample"


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no results store"):
        leaderboard(tmp_path / "none.sqlite")


WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from robustlab.reports.store import model_hash, record
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(float(sys.argv[2]))
    for i in range(25):
        result = {"clean_accuracy": 1.0, "n_samples": 50,
                  "attacks": {"pgd": {"attack": "pgd", "norm": "linf", "eps": 0.1, "robust_accuracy": 0.5}},
                  "records": {"label": [0] * 50, "clean_pred": [0] * 50, "robust": {"pgd": [j % 2 for j in range(50)]}}}
        record(sys.argv[1], model_digest=model_hash(model), model_name=sys.argv[2], data="d", result=result, specs=["pgd"], version="t")
""")


def test_two_writers_at_once_lose_nothing(tmp_path):
    store = tmp_path / "c.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(w)]) for w in (1, 2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    rows = {r["model"]: r for r in leaderboard(store)}
    assert sorted(rows) == ["1", "2"]
    assert all(r["evaluations"] == 25 and r["n_samples"] == 50 for r in rows.values())
    import sqlite3

    with sqlite3.connect(store) as con:
        assert con.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 2 * 25 * 50


def test_a_store_from_before_detectors_gains_the_metric_column(tmp_path):
    """A store written by an earlier robustlab (no `metric` column) is read and written: its rows are accuracies."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(str(path))
    con.executescript("""
        CREATE TABLE evaluations (id INTEGER PRIMARY KEY AUTOINCREMENT, model_hash TEXT NOT NULL, model TEXT NOT NULL,
            data TEXT NOT NULL, threat TEXT NOT NULL, attack TEXT NOT NULL, spec TEXT NOT NULL,
            clean_accuracy REAL NOT NULL, robust_accuracy REAL NOT NULL, n_samples INTEGER NOT NULL,
            created TEXT NOT NULL, robustlab_version TEXT NOT NULL);
        CREATE TABLE samples (evaluation_id INTEGER NOT NULL, idx INTEGER NOT NULL, clean_correct INTEGER NOT NULL,
            robust INTEGER NOT NULL, PRIMARY KEY (evaluation_id, idx));
        INSERT INTO evaluations VALUES (1, 'abc', 'old', 'digits:test', 'linf:0.1', 'pgd', 'pgd', 0.9, 0.5, 2, 'x', '0.1.0');
        INSERT INTO samples VALUES (1, 0, 1, 1), (1, 1, 1, 0);
    """)
    con.commit()
    con.close()
    (row,) = leaderboard(path)
    assert row["metric"] == "accuracy" and row["best_known_accuracy"] == 0.5


def test_an_evaluation_that_fails_midway_leaves_no_rows(tmp_path):
    """One transaction per evaluation: an error on its second attack rolls back the first attack's rows too."""
    import sqlite3

    path = tmp_path / "r.sqlite"
    result = {"clean_accuracy": 1.0, "n_samples": 1, "records": {"label": [0], "clean_pred": [0],
                                                                  "robust": {"a": [True], "b": [True]}},
              "attacks": {"a": {"norm": "linf", "eps": 0.1, "robust_accuracy": 1.0}, "b": {"norm": "linf", "eps": 0.1}}}
    with pytest.raises(KeyError):
        record(path, model_digest="x", model_name="m", data="d:test", result=result, specs=["a", "b"], version="v")
    con = sqlite3.connect(str(path))
    assert con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0
    con.close()
