"""`robustlab repeat` and `compare-runs` (issue 32): three seeds of a tiny config, a SIGKILL after the first seed's
result, a resume that does not re-run it, and an aggregate equal to the per-seed results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from robustlab.analysis.intervals import t_interval
from robustlab.cli.main import main

pytestmark = pytest.mark.xdist_group("repeat")

TINY = ("name: tiny\ndataset: digits\nmodel: mlp\nmodel_kwargs: {hidden: 16, depth: 1}\nmethod: {method}\n"
        "method_kwargs: {kwargs}\nepochs: 1\nbatch_size: 128\noptimizer: sgd\nlr: 0.1\neval_samples: 32\n"
        "eval_attack: 'fgsm:eps=0.1'\nprogress: false\ncheckpoint_every: 1\n")


def _config(tmp_path, method="standard", kwargs="{}"):
    path = tmp_path / f"{method}.yaml"
    path.write_text(TINY.replace("{method}", method).replace("{kwargs}", kwargs))
    return path


def _repeat(cfg, out, *extra, seeds="3"):
    return [sys.executable, "-m", "robustlab.cli.main", "repeat", "--config", str(cfg), "--seeds", seeds,
            "--out-dir", str(out), "--n-samples", "100", "--jobs", "1", *extra]


@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    """The standard config repeated over 3 seeds, killed (SIGKILL) once seed 0 is evaluated and seed 1 has written a
    training state (a state every step), then resumed."""
    tmp = tmp_path_factory.mktemp("repeat")
    cfg, out = _config(tmp), tmp / "std"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_repeat(cfg, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first, state = out / "seed-0" / "result.json", out / "seed-1" / "tiny" / "train_state.safetensors"
    while proc.poll() is None and not (first.exists() and state.exists()):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and state.exists(), "the repeat ended before it could be killed in seed 1's training"
    killed_in_training = not (out / "seed-1" / "trained.json").exists()
    stamp, log = first.stat().st_mtime_ns, (out / "seed-0" / "train.log").read_text()
    done = subprocess.run(_repeat(cfg, out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"cfg": cfg, "out": out, "stdout": done.stdout, "stamp": stamp, "log": log, "tmp": tmp, "env": env,
            "killed_in_training": killed_in_training}


def test_a_resumed_repeat_keeps_finished_seeds(repeated):
    out = repeated["out"]
    assert (out / "seed-0" / "result.json").stat().st_mtime_ns == repeated["stamp"]  # not evaluated again
    assert (out / "seed-0" / "train.log").read_text() == repeated["log"]  # not trained again
    assert "seeds 0 already evaluated: kept" in repeated["stdout"]
    assert all((out / f"seed-{s}" / "result.json").exists() for s in range(3))
    # the seed killed in training went on from its last state (a state is written every step)
    commands = [line for line in (out / "seed-1" / "train.log").read_text().splitlines() if line.startswith("$ ")]
    if repeated["killed_in_training"]:
        assert len(commands) == 2 and commands[1].endswith("--resume"), commands


def test_the_aggregate_equals_the_per_seed_results(repeated):
    out = repeated["out"]
    agg = json.loads((out / "repeat.json").read_text())
    results = [json.loads((out / f"seed-{s}" / "result.json").read_text()) for s in range(3)]
    assert agg["seeds"] == [0, 1, 2] and agg["n_images"] == 100 and agg["missing_seeds"] == []
    clean = [r["clean_accuracy"] for r in results]
    assert agg["metrics"]["clean_accuracy"]["values"] == clean
    assert agg["metrics"]["clean_accuracy"]["ci"] == t_interval(clean)["ci"]
    fgsm = [r["attacks"]["fgsm"]["robust_accuracy"] for r in results]
    assert agg["metrics"]["attacks.fgsm"]["values"] == fgsm
    assert len(set(clean)) > 1, "the seeds should train different models"
    assert agg["metrics"]["clean_accuracy"]["sampling"]["binomial_std"] > 0


def test_other_settings_are_refused_and_compare_runs_pairs_seeds(repeated, capsys):
    tmp, out = repeated["tmp"], repeated["out"]
    assert main(["repeat", "--config", str(repeated["cfg"]), "--seeds", "3", "--out-dir", str(out),
                 "--n-samples", "50"]) == 2
    assert "n_samples" in capsys.readouterr().err
    # a second config (PGD-AT) over two of the seeds and the same images, then A - B paired by seed
    at = subprocess.run(_repeat(_config(tmp, "pgd-at", "{eps: 0.1, steps: 2}"), tmp / "at", seeds="0,2"),
                        env=repeated["env"], capture_output=True, text=True, timeout=600)
    assert at.returncode == 0, at.stderr[-3000:]
    capsys.readouterr()
    assert main(["compare-runs", str(tmp / "at"), str(out), "--json", str(tmp / "cmp.json")]) == 0
    table = capsys.readouterr().out
    cmp = json.loads((tmp / "cmp.json").read_text())
    assert cmp["seeds"] == [0, 2] and "| attacks.fgsm |" in table  # the seeds both repeats evaluated
    d = cmp["metrics"]["attacks.fgsm"]["difference"]
    a = json.loads((tmp / "at" / "repeat.json").read_text())["metrics"]["attacks.fgsm"]["values"]
    b = json.loads((out / "repeat.json").read_text())["metrics"]["attacks.fgsm"]["values"]
    assert d["mean"] == pytest.approx(((a[0] - b[0]) + (a[1] - b[2])) / 2)
    assert d["verdict"] in ("A better", "B better", "no detectable difference at this sample size")


def test_bad_inputs_are_refused_before_any_training(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["repeat", "--config", str(cfg), "--seeds", "0,0", "--out-dir", str(tmp_path / "r")]) == 2
    assert main(["repeat", "--config", str(cfg), "--attack", "pgd:epss=0.1", "--out-dir", str(tmp_path / "r")]) == 2
    assert main(["repeat", "--config", str(cfg), "seed=4", "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and "epss" in err and "seed and out_dir" in err
    assert not (tmp_path / "r" / "seed-0").exists()


def test_trained_from_evaluates_the_other_repeats_weights(repeated, capsys):
    """Another evaluation of the same seeds (a costlier attack on fewer images): no training, the other repeat's
    checkpoints; another config's repeat is refused."""
    tmp, out = repeated["tmp"], repeated["out"]
    logs = {s: (out / f"seed-{s}" / "train.log").read_text() for s in (0, 1)}
    again = subprocess.run(_repeat(repeated["cfg"], tmp / "again", "--trained-from", str(out), "--attack",
                                   "pgd:eps=0.1,steps=3", seeds="0,1"),
                           env=repeated["env"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for s in (0, 1):
        assert (out / f"seed-{s}" / "train.log").read_text() == logs[s]  # not trained again
        assert not (tmp / "again" / f"seed-{s}" / "train.log").exists()
        ours = json.loads((tmp / "again" / f"seed-{s}" / "result.json").read_text())
        theirs = json.loads((out / f"seed-{s}" / "result.json").read_text())
        assert ours["clean_accuracy"] == theirs["clean_accuracy"] and "pgd" in ours["attacks"]  # the same weights
    other = _config(tmp, "pgd-at", "{eps: 0.1, steps: 2}")
    assert main(["repeat", "--config", str(other), "--seeds", "1", "--out-dir", str(tmp / "x"),
                 "--trained-from", str(out)]) == 2
    assert "another config" in capsys.readouterr().err


def test_a_second_repeat_of_a_folder_in_use_is_refused_and_a_held_seed_is_waited_for(repeated, capsys):
    """Two repeats of one folder would train a seed over each other: the second is refused at once (exit 2, naming
    the holder), and a seed's training lock makes a --trained-from repeat wait for the repeat training it."""
    import threading

    from robustlab.analysis.repeat import LOCK, locked

    out = repeated["out"]
    args = ["repeat", "--config", str(repeated["cfg"]), "--seeds", "3", "--out-dir", str(out), "--n-samples", "100",
            "--jobs", "1"]
    with locked(out / LOCK, wait=False):
        assert main(args) == 2
    assert f"in use by robustlab repeat (pid {os.getpid()})" in capsys.readouterr().err
    assert main(args) == 0  # released: the finished repeat resumes to its aggregate, nothing re-run
    held, order = out / "seed-0" / "train.lock", []

    def wait_for_it() -> None:
        with locked(held, wait=True):
            order.append("waiter")

    with locked(held, wait=False):
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.3)
        order.append("holder")
    waiter.join(5)
    assert order == ["holder", "waiter"]
    assert "waiting for robustlab repeat" in capsys.readouterr().err
