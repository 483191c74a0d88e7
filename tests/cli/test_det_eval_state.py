"""Detectors on the one evaluator (issue 29, item 1): `robustlab eval --state DIR` on a detector resumes after
kill -9 with the uninterrupted run's JSON; `--shard I/N` + `robustlab eval-merge` and `torchrun --nproc_per_node=2`
(gloo) give that same JSON; mAP is computed from the merged records; a folder from other settings is refused."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from robustlab.cli.main import main
from robustlab.engine.evaluator import without_seconds

from .test_eval_state import _cli, _env, _free_port, _kill_9_midway

pytestmark = pytest.mark.xdist_group("eval-state")

N, BATCH = 48, 8  # 6 batches x (clean + 2 attacks) = 18 record files


@pytest.fixture(scope="module")
def det_setup(tmp_path_factory):
    """A detector checkpoint, the CLI arguments of its evaluation under CWA and DAG, and the uninterrupted JSON."""
    from robustlab.engine.checkpoint import save_model
    from robustlab.models import create_model

    folder = tmp_path_factory.mktemp("det-state")
    torch.manual_seed(0)
    ckpt = save_model(folder / "det.safetensors", create_model("tinyssd-96", num_classes=10),
                      extra={"config": {"dataset": "mnist-det"}})
    args = ["eval", "--model", str(ckpt), "--data", f"mnist-det:preset=voc,n_train=8,n_test={N}", "--attack",
            "cwa:steps=3", "--attack", "dag:max_iter=10", "--batch-size", str(BATCH), "--quiet", "--threads", "1",
            "--no-store"]
    assert main([*args, "--json", str(folder / "plain.json")]) == 0
    return folder, args, json.loads((folder / "plain.json").read_text())


def test_the_plain_run_is_a_detector_evaluation(det_setup, tmp_path):
    folder, args, plain = det_setup
    log = tmp_path / "det.log"  # --log: the detector's AutoAttack-style log
    assert main([*args, "--log", str(log)]) == 0
    text = log.read_text()
    assert text.startswith("initial mAP: ") and "mAP after CWA:STEPS=3 (l_inf eps 8): " in text
    assert "mAP after DAG:MAX_ITER=10 (unbounded): " in text and "passes per image" in text
    assert plain["n_images"] == N and set(plain["attacks"]) == {"cwa:steps=3", "dag:max_iter=10"}
    assert plain["attacks"]["dag:max_iter=10"]["eps"] is None and plain["attacks"]["cwa:steps=3"]["eps"] == 8.0


def test_kill_9_then_resume_gives_the_uninterrupted_result(det_setup, tmp_path):
    _, args, plain = det_setup
    state = tmp_path / "state"
    done = _kill_9_midway(_cli([*args, "--state", str(state)]), state, 18)
    out = tmp_path / "resumed.json"
    run = subprocess.run(_cli([*args, "--state", str(state), "--json", str(out)]), env=_env(), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert without_seconds(json.loads(out.read_text())) == without_seconds(plain), f"killed after {done} files"


def test_shards_then_eval_merge_give_the_single_process_result(det_setup, tmp_path, capsys):
    _, args, plain = det_setup
    for i in (1, 0):
        assert main([*args, "--shard", f"{i}/2", "--state", str(tmp_path / f"s{i}")]) == 0
    out = tmp_path / "merged.json"
    assert main(["eval-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--json", str(out)]) == 0
    assert "| **mAP** |" in capsys.readouterr().out  # the detector's table
    assert without_seconds(json.loads(out.read_text())) == without_seconds(plain)
    # the same folder with another attack panel is refused, naming what differs
    assert main([*[a if a != "dag:max_iter=10" else "dag:max_iter=11" for a in args], "--shard", "0/2", "--state",
                 str(tmp_path / "s0")]) == 2
    assert "max_iter" in capsys.readouterr().err


def test_torchrun_two_processes_give_the_single_process_result(det_setup, tmp_path):
    _, args, plain = det_setup
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "robustlab.cli.main", *args, "--json", str(out)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert without_seconds(json.loads(out.read_text())) == without_seconds(plain)


def test_detector_evaluations_are_recorded_and_on_the_leaderboard(det_setup, tmp_path, capsys):
    """Item 5: each attack's mAP goes into the results store with its threat in pixel units (linf:8px; DAG without
    a budget none:unbounded) and the weights' digest; the leaderboard lists the detector's clean mAP and its
    best-known robust mAP (the lowest any attack of that threat reached) beside classifiers, in every format; a
    sharded run is recorded by its merge exactly as one run is."""
    from robustlab.reports.store import format_leaderboard, leaderboard

    _, args, plain = det_setup
    args = [a for a in args if a != "--no-store"]
    store = tmp_path / "r.sqlite"
    assert main([*args, "--store", str(store)]) == 0
    rows = {r["threat"]: r for r in leaderboard(store)}
    assert set(rows) == {"linf:8px", "none:unbounded"}
    cwa = rows["linf:8px"]
    assert cwa["metric"] == "map" and cwa["clean_accuracy"] == plain["clean"]["map"]
    assert cwa["best_known_accuracy"] == plain["attacks"]["cwa:steps=3"]["map"] and cwa["n_samples"] == N
    for fmt in ("md", "csv", "html", "json"):
        assert "linf:8px" in format_leaderboard(list(rows.values()), fmt)
    capsys.readouterr()
    assert main(["leaderboard", "--store", str(store), "--threat", "linf:8px", "--format", "json"]) == 0
    assert [r["threat"] for r in json.loads(capsys.readouterr().out)] == ["linf:8px"]
    merged_store = tmp_path / "m.sqlite"
    for i in range(2):
        assert main([*args, "--shard", f"{i}/2", "--state", str(tmp_path / f"s{i}")]) == 0
    assert main(["eval-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--store", str(merged_store)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(leaderboard(merged_store)) == strip(leaderboard(store))
