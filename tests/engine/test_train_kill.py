"""Training survives SIGKILL (issue 31): `robustlab train` writes states within the epoch (`checkpoint_every`),
and a run killed with SIGKILL at a random moment (a step, a state being written, an epoch's end) and resumed with
`--resume` ends with the uninterrupted run's weights, bit for bit, for data in memory, for images streamed by
two DataLoader workers, and under torchrun at two processes (gloo)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robustlab.engine.checkpoint import load_model
from tests.conftest import process_running

pytestmark = pytest.mark.xdist_group("train-kill")

DIGITS = ("dataset: digits\nmodel: mlp\nmodel_kwargs: {hidden: 32, depth: 1}\nmethod: pgd-at\n"
          "method_kwargs: {eps: 0.1, steps: 2}\nepochs: 3\nbatch_size: 64\noptimizer: sgd\nlr: 0.05\n"
          "eval_samples: 32\neval_attack: 'fgsm:eps=0.1'\nseed: 3\ndeterministic: true\nprogress: false\n"
          "checkpoint_every: 2\n")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(cfg, out, *extra: str, ranks: int = 1) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m"] \
        if ranks > 1 else [sys.executable, "-m"]
    return [*launch, "robustlab.cli.main", "train", "--config", str(cfg), "--out-dir", str(out), *extra]


def _weights(run) -> dict[str, torch.Tensor]:
    return dict(load_model(run / "last.safetensors")[0].state_dict())


def _descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun's ranks run in sessions of their own, out of the launcher's group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it at once, as a preempted machine loses them."""
    tree = [pid, *_descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for p in tree[1:]:  # none may outlive the kill and write on (a zombie is dead)
        while process_running(p):
            assert time.monotonic() < deadline, f"process {p} survived the kill"
            time.sleep(0.01)


def _plain_run(cfg, out, ranks: int = 1) -> Path:
    """The uninterrupted run of `cfg` into `out`."""
    plain = subprocess.run(_train(cfg, out, ranks=ranks), env=_env(), capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    return out


def _kill_then_resume(cfg, tmp_path, name: str, seed: int, ranks: int = 1, plain: Path | None = None) -> None:
    """The uninterrupted run (or `plain`, one made before), then a run SIGKILLed after a random number of state
    writes (0 to a few ms late, so sometimes inside a write), resumed: the same final weights. ranks > 1: under
    torchrun, the launcher and every rank killed together (their process group)."""
    plain = plain or _plain_run(cfg, tmp_path / "plain", ranks)
    state = tmp_path / "killed" / name / "train_state.safetensors"
    writes = random.Random(seed).randint(1, 4)
    proc = subprocess.Popen(_train(cfg, tmp_path / "killed", ranks=ranks), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen, last = 0, None
    while proc.poll() is None and seen < writes:
        stamp = state.stat().st_mtime_ns if state.exists() else None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
        time.sleep(0.001)
    time.sleep(random.Random(seed).random() * 0.01)
    _kill_tree(proc.pid)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(_train(cfg, tmp_path / "killed", "--resume", ranks=ranks), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(plain / name), _weights(tmp_path / "killed" / name)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, f"killed after {seen} state writes")
    # the epochs' training statistics too (the running sums in the states; under torchrun pooled at the same steps)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (run / name / "metrics.jsonl").read_text().splitlines()]
            for run in (plain, tmp_path / "killed")]
    assert rows[0] == rows[1] and len(rows[0]) >= 2


@pytest.fixture(scope="module")
def digits_plain(tmp_path_factory):
    """The digits config and its uninterrupted run, which every kill of it is compared with."""
    tmp = tmp_path_factory.mktemp("digits")
    cfg = tmp / "c.yaml"
    cfg.write_text(f"name: digits\n{DIGITS}")
    return cfg, _plain_run(cfg, tmp / "plain")


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_in_memory_data(tmp_path, digits_plain, seed):
    cfg, plain = digits_plain
    _kill_then_resume(cfg, tmp_path, "digits", seed, plain=plain)


def test_kill_9_with_two_dataloader_workers(tmp_path):
    from robustlab.data.standins import write_standin

    kwargs = write_standin("tiny-imagenet", tmp_path / "data", 48, 8, 0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: tiny\ndataset: tiny-imagenet\n"
                   f"dataset_kwargs: {{root: '{kwargs['root']}'}}\n"
                   "model: small-cnn\nmodel_kwargs: {width: 4, hidden: 16}\nmethod: pgd-at\n"
                   "method_kwargs: {eps: 0.03, steps: 2}\nepochs: 2\nbatch_size: 8\naugment: crop-flip\n"
                   "validation: 8\neval_samples: 8\nworkers: 2\ndeterministic: true\nprogress: false\n"
                   "checkpoint_every: 1\nlr: 0.05\n")
    _kill_then_resume(cfg, tmp_path, "tiny", 2)


def test_kill_9_under_torchrun(tmp_path):
    """Two gloo ranks, states every 2 steps: the ranks' running sums pooled into rank 0's state, every rank's
    generator kept; killed launcher and ranks together, resumed under torchrun: the uninterrupted weights."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: digits\n{DIGITS}")
    _kill_then_resume(cfg, tmp_path, "digits", 5, ranks=2)
