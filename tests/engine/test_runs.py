"""Runs that must not be lost: run folders are never overwritten, resume refuses changed settings before touching
anything, options and output paths are checked before any work, damaged checkpoints are refused, files get the
umask's permissions, and a model never trains on data of the wrong shape."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from robustlab.engine.checkpoint import load_model, save_model
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer
from robustlab.errors import CheckpointError, DataError, OutputError, ResumeError, RunExistsError


def _cfg(tmp_path, **kw):
    base = dict(name="r", dataset="digits", model="mlp", model_kwargs={"hidden": 16, "depth": 1}, epochs=2,
                batch_size=256, optimizer="sgd", lr=0.05, eval_samples=32, eval_attack="fgsm:eps=0.1",
                method="standard", out_dir=str(tmp_path), seed=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "robustlab.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, cwd=cwd)


# -- run folders -------------------------------------------------------------------------------------------

def test_a_folder_that_holds_a_run_is_never_overwritten(tmp_path):
    Trainer(_cfg(tmp_path)).fit()
    before = (tmp_path / "r" / "last.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        Trainer(_cfg(tmp_path, lr=0.1)).fit()
    assert (tmp_path / "r" / "last.safetensors").read_bytes() == before
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2
    # --overwrite replaces it: one run's rows, not two runs mixed
    Trainer(_cfg(tmp_path, lr=0.1, epochs=1)).fit(overwrite=True)
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 0.1


def test_cli_train_twice_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\ndataset: digits\nmodel: mlp\nmodel_kwargs: {hidden: 16, depth: 1}\nepochs: 1\n"
                   "eval_samples: 16\neval_attack: 'fgsm:eps=0.1'\n")
    assert _cli("train", "--config", str(cfg), "--out-dir", str(tmp_path)).returncode == 0
    r = _cli("train", "--config", str(cfg), "--out-dir", str(tmp_path))
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert _cli("train", "--config", str(cfg), "--out-dir", str(tmp_path), "--overwrite").returncode == 0


def test_the_main_job_never_writes_over_an_earlier_run(tmp_path):
    from robustlab.pipelines import claim_run_folder

    (tmp_path / "job").mkdir()
    assert claim_run_folder(tmp_path, "job") == (tmp_path / "job", None)  # empty: fine
    (tmp_path / "job" / "results.json").write_text("{}")
    folder, note = claim_run_folder(tmp_path, "job")
    assert folder == tmp_path / "job-2" and "already holds a run" in note
    (tmp_path / "job-2").mkdir()
    (tmp_path / "job-2" / "x").write_text("")
    assert claim_run_folder(tmp_path, "job")[0] == tmp_path / "job-3"
    folder, note = claim_run_folder(tmp_path, "job", overwrite=True)
    assert folder == tmp_path / "job" and not (tmp_path / "job" / "results.json").exists() and "replaced" in note


# -- resume ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,shown", [({"lr": 0.1}, "'lr': 0.05 -> 0.1"), ({"seed": 3}, "'seed': 0 -> 3"),
                                          ({"optimizer": "adam"}, "'optimizer': 'sgd' -> 'adam'"),
                                          ({"method": "pgd-at", "method_kwargs": {"eps": 0.1, "steps": 1}}, "'method'")])
def test_resume_refuses_changed_settings_before_touching_anything(tmp_path, change, shown):
    t = Trainer(_cfg(tmp_path, epochs=3))
    with pytest.raises(KeyboardInterrupt):
        t.fit(stop_at_step=t.steps_per_epoch() + 1)
    config = (tmp_path / "r" / "config.json").read_bytes()
    state = (tmp_path / "r" / "train_state.safetensors").read_bytes()
    with pytest.raises(ResumeError, match=shown.replace("(", r"\(")) as e:
        Trainer(_cfg(tmp_path, epochs=3, **change)).fit(resume=True)
    assert "epochs" in str(e.value)  # names what may change
    assert (tmp_path / "r" / "config.json").read_bytes() == config
    assert (tmp_path / "r" / "train_state.safetensors").read_bytes() == state


def test_resume_may_extend_the_run(tmp_path):
    Trainer(_cfg(tmp_path, epochs=1)).fit()
    res = Trainer(_cfg(tmp_path, epochs=2, eval_every=2)).fit(resume=True)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["epochs"] == 2


# -- options and output paths are checked before any work ---------------------------------------------------

@pytest.mark.parametrize("args,named", [(["--n-curve", "0"], "--n-curve"), (["--eps", "-0.3"], "--eps"),
                                        (["--eps", "8"], "--eps"), (["--train-steps", "0"], "--train-steps"),
                                        (["--width", "0"], "--width"), (["--n-eval", "5000"], "--n-eval")])
def test_main_job_options_fail_before_training(tmp_path, args, named, capsys):
    from robustlab.cli.main import main

    rc = main(["run", "--out-dir", str(tmp_path / "runs"), *args])
    assert rc == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_unwritable_outputs_fail_before_the_evaluation(tmp_path, mnist_cnn, capsys):
    from robustlab.cli.main import main

    ckpt = save_model(tmp_path / "m.safetensors", mnist_cnn)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for flag, path in (("--json", blocker / "out.json"), ("--report", blocker / "rep")):
        rc = main(["eval", "--model", str(ckpt), "--data", "mnist5k", "--n-samples", "8", "--quiet", flag, str(path)])
        out, err = capsys.readouterr()
        assert rc == 2 and str(path) in err and "clean accuracy" not in out  # refused before evaluating
    rc = main(["eval", "--model", str(ckpt), "--n-samples", "-5"])
    assert rc == 2 and "--n-samples" in capsys.readouterr().err


def test_a_result_that_cannot_be_written_at_the_end_is_saved_elsewhere(tmp_path, mnist_cnn, capsys, monkeypatch):
    from robustlab.cli.main import main
    from robustlab.reports import json as report_json

    ckpt = save_model(tmp_path / "m.safetensors", mnist_cnn)
    target = tmp_path / "out.json"
    real = report_json.write_json

    def flaky(path, obj):  # the disk fills up while the evaluation runs
        if str(path) == str(target):
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(report_json, "write_json", flaky)
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--model", str(ckpt), "--data", "mnist5k", "--n-samples", "8", "--quiet", "--attack", "fgsm:eps=0.1",
               "--json", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left" in err and "saved to" in err
    saved = [p for p in tmp_path.iterdir() if p.name.endswith("out.json") and p != target]
    assert saved and json.loads(saved[0].read_text())["n_samples"] == 8


def test_check_writable():
    from robustlab.outputs import check_writable

    with pytest.raises(OutputError, match="/proc"):
        check_writable("/proc/robustlab/out.json")


# -- silent damage -----------------------------------------------------------------------------------------

def test_rotted_checkpoint_bytes_are_refused(tmp_path, mnist_cnn):
    path = save_model(tmp_path / "m.safetensors", mnist_cnn)
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + 100] ^= 0x40  # one bit of one weight; the header is intact
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(path)


def test_rotted_training_state_is_refused(tmp_path):
    Trainer(_cfg(tmp_path, epochs=1)).fit()
    state = tmp_path / "r" / "train_state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little") + 40] ^= 0x01
    state.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        Trainer(_cfg(tmp_path, epochs=2)).fit(resume=True)


def test_files_get_the_umask_permissions(tmp_path, mnist_cnn):
    old = os.umask(0o022)
    try:
        assert (save_model(tmp_path / "a.safetensors", mnist_cnn).stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (save_model(tmp_path / "b.safetensors", mnist_cnn).stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_a_model_built_for_other_channels_never_trains(tmp_path):
    with pytest.raises(DataError, match="in_channels=3.*in_channels=1"):
        Trainer(_cfg(tmp_path, model_kwargs={"hidden": 16, "depth": 1, "in_channels": 3}))
    from robustlab.models import create_model

    m = create_model("small-cnn", in_channels=3, input_size=28, width=4, hidden=8)
    with pytest.raises(DataError, match=r"\(N, 3, H, W\).*\(2, 1, 28, 28\)"):
        m(torch.rand(2, 1, 28, 28))


def test_ctrl_c_during_training_says_where_the_checkpoint_is(tmp_path):
    import signal
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: long\ndataset: digits\nmodel: mlp\nmodel_kwargs: {hidden: 32, depth: 1}\nepochs: 2000\n"
                   "batch_size: 32\neval_every: 1000\nmethod: pgd-at\nmethod_kwargs: {eps: 0.1, steps: 2}\n"
                   "progress: false\n")
    proc = subprocess.Popen([sys.executable, "-m", "robustlab.cli.main", "train", "--config", str(cfg), "--out-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # a shell without job control starts background jobs with SIGINT ignored, and Python then
                            # keeps ignoring it: give the child the default disposition, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = tmp_path / "long" / "train_state.safetensors"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("robustlab")]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and str(state) in lines[0] and "--resume" in lines[0], err
