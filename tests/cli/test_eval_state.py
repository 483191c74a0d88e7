"""`robustlab eval --state DIR` resumes after kill -9 with the uninterrupted run's result; `--shard I/N` +
`robustlab eval-merge` and `torchrun --nproc_per_node=2` (gloo) give that same result; a state or a shard from
other settings is refused, naming what differs; an incomplete set of shards names the missing ones."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustlab.cli.main import main
from robustlab.engine.evaluator import without_seconds
from robustlab.engine.tasks import merge_evaluations
from robustlab.reports.store import leaderboard

pytestmark = pytest.mark.xdist_group("eval-state")

USER_CODE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x):
        return self.body(x)
'''
ATTACK = "autoattack:norm=linf,eps=0.1"
N, BATCH = 96, 16  # 6 batches


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits):
    """A user's model file, its trained weights (safetensors), the data, and the uninterrupted run's JSON."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("state")
    (folder / "net.py").write_text(USER_CODE)
    ns: dict = {}
    exec(compile(USER_CODE, "net.py", "exec"), ns)
    torch.manual_seed(0)
    net = ns["Net"]()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        loss = F.cross_entropy(net(digits.x_train), digits.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "w.safetensors"))
    np.savez(folder / "data.npz", x=digits.x_test[:N].numpy(), y=digits.y_test[:N].numpy())
    args = ["eval", "--model", f"{folder / 'net.py'}:Net", "--weights", str(folder / "w.safetensors"),
            "--data", str(folder / "data.npz"), "--attack", ATTACK, "--batch-size", str(BATCH), "--quiet",
            "--threads", "1", "--no-store"]
    assert main([*args, "--json", str(folder / "plain.json")]) == 0
    return folder, args, json.loads((folder / "plain.json").read_text())


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "robustlab.cli.main", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_the_plain_run_is_a_real_evaluation(setup):
    _, _, plain = setup
    acc = plain["attacks"]["autoattack"]["robust_accuracy"]
    assert 0 < acc < plain["clean_accuracy"]


def _kill_9_midway(cmd: list[str], state, total: int) -> int:
    """Start `cmd` (with its children: torchrun's ranks) and SIGKILL them all once a random number of the `total`
    record files exist under `state`; returns how many existed."""
    files_at_kill = random.randint(1, total - 2)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and len(list(state.rglob("batch-*.pt"))) < files_at_kill:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(list(state.rglob("batch-*.pt")))
    assert done < total, done
    return done


def test_kill_9_at_a_random_batch_then_resume_gives_the_uninterrupted_result(setup, tmp_path):
    folder, args, plain = setup
    state = tmp_path / "state"
    done = _kill_9_midway(_cli([*args, "--state", str(state)]), state, 12)  # 6 batches x (clean + AutoAttack)
    out = tmp_path / "resumed.json"
    run = subprocess.run(_cli([*args, "--state", str(state), "--json", str(out)]), env=_env(), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert without_seconds(json.loads(out.read_text())) == without_seconds(plain), f"killed after {done} files"


def test_shards_then_eval_merge_give_the_single_process_result(setup, tmp_path):
    """Shard 1/2 is killed midway and resumed; shard 0/2 runs in one go; the merge equals the plain run and is
    recorded in the results store as the plain run would have been."""
    _, args, plain = setup
    args = [a for a in args if a != "--no-store"]  # shards leave the recording to the merge
    shard1 = [*args, "--shard", "1/2", "--state", str(tmp_path / "s1")]
    done = _kill_9_midway(_cli(shard1), tmp_path / "s1", 6)  # batches 1, 3, 5
    for i in (1, 0):  # in any order
        assert main([*args, "--shard", f"{i}/2", "--state", str(tmp_path / f"s{i}")]) == 0, done
    out, store = tmp_path / "merged.json", tmp_path / "results.sqlite"
    assert main(["eval-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--json", str(out),
                 "--store", str(store)]) == 0
    merged = json.loads(out.read_text())
    assert without_seconds(merged) == without_seconds(plain)  # the device too (issue 34)
    (row,) = leaderboard(store)
    assert row["clean_accuracy"] == plain["clean_accuracy"]
    assert row["autoattack_accuracy"] == plain["attacks"]["autoattack"]["robust_accuracy"]


def test_an_incomplete_or_mixed_set_of_shards_is_refused(setup, tmp_path, capsys):
    _, args, _ = setup
    assert main([*args, "--shard", "0/3", "--state", str(tmp_path / "a")]) == 0
    assert main(["eval-merge", str(tmp_path / "a")]) == 2
    assert "missing 1/3, 2/3" in capsys.readouterr().err
    other = [a if a != ATTACK else "autoattack:norm=linf,eps=0.2" for a in args]
    assert main([*other, "--shard", "1/3", "--state", str(tmp_path / "b")]) == 0
    assert main(["eval-merge", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "eps" in capsys.readouterr().err
    with pytest.raises(Exception, match="missing 1/3, 2/3"):
        merge_evaluations([tmp_path / "a"])


def test_a_state_from_other_weights_or_attacks_is_refused_naming_the_difference(setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder, args, _ = setup
    state = tmp_path / "state"
    small = [a if a != str(BATCH) else "48" for a in args]
    assert main([*small, "--n-samples", "48", "--state", str(state)]) == 0
    weights = load_file(str(folder / "w.safetensors"))
    weights["body.3.bias"] = weights["body.3.bias"] + 1e-3
    save_file(weights, str(tmp_path / "other.safetensors"))
    changed = [a if a != str(folder / "w.safetensors") else str(tmp_path / "other.safetensors") for a in small]
    assert main([*changed, "--n-samples", "48", "--state", str(state)]) == 2
    assert "model_sha256" in capsys.readouterr().err
    assert main([*small, "--n-samples", "48", "--state", str(state), "--attack", "pgd:eps=0.1,steps=3"]) == 2
    assert "attack panel" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([*small, "--n-samples", "48", "--state", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*small, "--shard", "0/2"]) == 2
    assert "--state" in capsys.readouterr().err
    assert main([*small, "--shard", "2/2", "--state", str(tmp_path / "x")]) == 2
    assert "0 <= I < N" in capsys.readouterr().err


def test_another_version_or_other_data_is_refused(digits, tmp_path):
    from robustlab import evaluate
    from robustlab.errors import ResumeError

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x, y = digits.x_test[:32], digits.y_test[:32]
    evaluate(net, x, y, ["fgsm:eps=0.1"], batch_size=16, checks=False, state=tmp_path / "s")
    with pytest.raises(ResumeError, match="data_sha256"):
        evaluate(net, x.flip(0), y.flip(0), ["fgsm:eps=0.1"], batch_size=16, checks=False, state=tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"robustlab": "', '"robustlab": "0.0.0-'))
    with pytest.raises(ResumeError, match='robustlab \\(this folder: "0.0.0-'):
        evaluate(net, x, y, ["fgsm:eps=0.1"], batch_size=16, checks=False, state=tmp_path / "s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("with_state", [True, False])
def test_torchrun_two_processes_give_the_single_process_result(setup, tmp_path, with_state):
    """With --state: killed midway (every rank), then the same command resumes. Without: a temporary folder."""
    _, args, plain = setup
    out = tmp_path / "ddp.json"
    state = ["--state", str(tmp_path / "state")] if with_state else []

    def torchrun() -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "-m", "robustlab.cli.main", *args, "--json", str(out), *state]

    if with_state:
        _kill_9_midway(torchrun(), tmp_path / "state", 12)
    run = subprocess.run(torchrun(), env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert without_seconds(json.loads(out.read_text())) == without_seconds(plain)
    if with_state:
        folders = sorted((tmp_path / "state").iterdir())
        assert [p.name for p in folders] == ["rank-0-of-2", "rank-1-of-2"]
        # the ranks' folders merge into the same result, model and data named; rank 0 recorded the run itself
        # (with --no-store here), so the merge records nothing either
        store = tmp_path / "store.sqlite"
        os.environ["ROBUSTLAB_STORE"] = str(store)
        try:
            assert main(["eval-merge", *map(str, folders), "--json", str(tmp_path / "merged.json")]) == 0
        finally:
            del os.environ["ROBUSTLAB_STORE"]
        merged = json.loads((tmp_path / "merged.json").read_text())
        assert without_seconds(merged) == without_seconds(plain)  # the device too (issue 34)
        assert not store.exists()


def test_adversarial_examples_are_kept_in_the_state_and_resumed(digits, tmp_path):
    """keep_adversarials (--save-adversarials): the state holds the examples; a run resumed from a complete state
    (nothing recomputed) returns the same tensors as a run without state."""
    from robustlab import evaluate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x, y = digits.x_test[:40], digits.y_test[:40]
    specs = ["pgd:eps=0.1,steps=3", "fgsm:eps=0.1"]
    plain = evaluate(net, x, y, specs, batch_size=16, checks=False, keep_adversarials=True)
    first = evaluate(net, x, y, specs, batch_size=16, checks=False, keep_adversarials=True, state=tmp_path / "s")
    again = evaluate(net, x, y, specs, batch_size=16, checks=False, keep_adversarials=True, state=tmp_path / "s")
    for name in plain["adversarials"]:
        assert torch.equal(plain["adversarials"][name], first["adversarials"][name])
        assert torch.equal(plain["adversarials"][name], again["adversarials"][name])
    assert any("adversarial" in torch.load(p, weights_only=True) for p in (tmp_path / "s").glob("batch-*-attack-*.pt"))


def test_a_user_error_under_torchrun_is_one_line_per_rank(setup, tmp_path):
    _, args, _ = setup
    bad = [a if a != ATTACK else "autoattak:norm=linf,eps=0.1" for a in args]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "robustlab.cli.main", *bad], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("robustlab eval: error: unknown attack 'autoattak'") == 2, run.stderr[-2000:]
    assert "terminate called" not in run.stderr  # no process group left behind at exit


def _open_state(folder: str, who: str, manifest: dict, barrier, results) -> None:
    from robustlab.engine.eval_state import EvalState
    from robustlab.errors import ResumeError

    barrier.wait()
    try:
        EvalState(folder, manifest)  # any other error ends the process with its traceback and exit code 1
        results.put((who, "opened"))
    except ResumeError:
        results.put((who, "refused"))


def test_shards_starting_at_once_on_one_folder(tmp_path):
    """Processes opening one new state folder at the same moment: one manifest is created (never overwritten by a
    sibling's), the processes with its settings open it, the others are refused; no false "not empty"."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for round_ in range(8):
        folder = tmp_path / f"s{round_}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_state, args=(str(folder), who, {"settings": who[0]}, barrier, results))
                 for who in ("a1", "a2", "b1", "b2")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * len(procs), "a process failed (its traceback is above)"
        got = dict(results.get(timeout=10) for _ in procs)
        winner = json.loads((folder / "manifest.json").read_text())["settings"]
        assert got == {who: "opened" if who[0] == winner else "refused" for who in got}, got
