"""Training survives SIGKILL (issue 31): `robustlab train` writes states within the epoch (`checkpoint_every`),
and a run killed with SIGKILL at a random moment (a step, a state being written, an epoch's end) and resumed with
`--resume` ends with the uninterrupted run's weights, bit for bit, for data in memory and for images streamed by
two DataLoader workers."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from robustlab.engine.checkpoint import load_model

pytestmark = pytest.mark.xdist_group("train-kill")

DIGITS = ("dataset: digits\nmodel: mlp\nmodel_kwargs: {hidden: 32, depth: 1}\nmethod: pgd-at\n"
          "method_kwargs: {eps: 0.1, steps: 2}\nepochs: 3\nbatch_size: 64\noptimizer: sgd\nlr: 0.05\n"
          "eval_samples: 32\neval_attack: 'fgsm:eps=0.1'\nseed: 3\ndeterministic: true\nprogress: false\n"
          "checkpoint_every: 2\n")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(cfg, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "robustlab.cli.main", "train", "--config", str(cfg), "--out-dir", str(out), *extra]


def _weights(run) -> dict[str, torch.Tensor]:
    return dict(load_model(run / "last.safetensors")[0].state_dict())


def _kill_then_resume(cfg, tmp_path, name: str, seed: int) -> None:
    """The uninterrupted run, then a run SIGKILLed after a random number of state writes (0 to a few ms late, so
    sometimes inside a write), resumed: the same final weights."""
    plain = subprocess.run(_train(cfg, tmp_path / "plain"), env=_env(), capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    state = tmp_path / "killed" / name / "train_state.safetensors"
    writes = random.Random(seed).randint(1, 4)
    proc = subprocess.Popen(_train(cfg, tmp_path / "killed"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen, last = 0, None
    while proc.poll() is None and seen < writes:
        stamp = state.stat().st_mtime_ns if state.exists() else None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
        time.sleep(0.001)
    time.sleep(random.Random(seed).random() * 0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(_train(cfg, tmp_path / "killed", "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "plain" / name), _weights(tmp_path / "killed" / name)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, f"killed after {seen} state writes")


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_in_memory_data(tmp_path, seed):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: digits\n{DIGITS}")
    _kill_then_resume(cfg, tmp_path, "digits", seed)


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
