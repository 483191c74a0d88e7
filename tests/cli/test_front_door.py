"""A new user's own model and data through `robustlab eval` (issue 34): every mistake is one line naming the value,
exit 2, before the work and with nothing written; the user's own bugs show the user's traceback; Ctrl-C says what
was kept; an unwritable results store is found before the work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.cli.main import main

NET = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same weights in every process (shards are merged)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits):
    """The user's model file (1 channel, 8x8), a file beside it that it imports, and data files."""
    root = tmp_path_factory.mktemp("front")
    (root / "user_layers.py").write_text(NET)
    (root / "net.py").write_text("from user_layers import Net  # a module beside this file\n")
    (root / "broken.py").write_text("import torch\n\n\ndef helper():\n    return 1 / 0\n\n\nVALUE = helper()\n")
    (root / "builds_badly.py").write_text("from torch import nn\n\n\nclass Net(nn.Module):\n"
                                          "    def __init__(self):\n        raise RuntimeError('no weights here')\n")
    x, y = digits.x_test[:40], digits.y_test[:40]
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy())
    np.savez(root / "rgb.npz", x=x.repeat(1, 3, 1, 1).numpy(), y=y.numpy())
    return root


def _eval(folder: Path, *extra: str, model: str = "net.py:Net", data: str = "data.npz") -> list[str]:
    return ["eval", "--model", str(folder / model), "--data", str(folder / data), "--quiet", "--threads", "1",
            "--no-store", *extra]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("robustlab eval")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return err


def test_a_module_beside_the_model_file_imports(folder, capsys):
    assert main(_eval(folder, "--attack", "pgd:eps=0.1,steps=2")) == 0
    assert "| pgd |" in capsys.readouterr().out


def test_a_model_file_that_raises_shows_the_users_traceback(folder, capsys):
    assert main(_eval(folder, "--attack", "pgd:eps=0.1", model="broken.py:VALUE")) == 2
    err = _one_line_error(capsys, "importing", "broken.py failed", "ZeroDivisionError")
    assert "in helper" in err and "return 1 / 0" in err  # their frames
    assert "robustlab/engine" not in err and "importlib" not in err  # not ours
    assert main(_eval(folder, "--attack", "pgd:eps=0.1", model="builds_badly.py:Net")) == 2
    _one_line_error(capsys, "building the model failed", "no weights here")


def test_data_of_the_wrong_shape_is_one_line(folder, capsys):
    assert main(_eval(folder, "--attack", "pgd:eps=0.1", data="rgb.npz")) == 2
    err = _one_line_error(capsys, "does not run on one image", "(3, 8, 8)")
    assert "Traceback (most recent call last), the user's code" in err and "site-packages/robustlab" not in err


def test_no_attack_for_data_without_a_documented_threat(folder, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(_eval(folder, "--json", str(out))) == 2
    _one_line_error(capsys, "no documented threat model", "--attack")
    assert not out.exists()


def test_normalize_in_the_wrong_units(folder, capsys):
    assert main(_eval(folder, "--attack", "pgd:eps=0.1", "--normalize", "0.5/0.25", "--input-range", "255")) == 2
    _one_line_error(capsys, "[0, 1] units", "127.5/63.75")
    assert main(_eval(folder, "--attack", "pgd:eps=0.1", "--normalize", "125/60")) == 2
    _one_line_error(capsys, "[0, 255] units", "--input-range 255")


@pytest.mark.parametrize("args,needles", [
    (["--attack", "pgd:eps="], ["'eps' has no value", "pgd:eps="]),
    (["--attack", "pgd:eps=1e6"], ["1e+06", "lies in (0, 1]"]),
    (["--draws", "0"], ["--draws", "0"]),
    (["--attack", "pgd:eps=0.1", "--robustbench-info", "venue=ICML"], ["--robustbench-json"]),
])
def test_small_mistakes_name_the_value(folder, capsys, args, needles):
    assert main(_eval(folder, *args)) == 2
    err = _one_line_error(capsys, *needles)
    assert "write eps=1e+06/255" not in err


def test_a_folder_as_model(folder, capsys):
    assert main(["eval", "--model", str(folder), "--data", str(folder / "data.npz"), "--no-store"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "does not exist" not in err


def test_a_store_under_a_file_is_refused_before_the_work(folder, capsys, tmp_path):
    """--store that cannot be written: one line, exit 2, nothing written; the default store: a warning, and the
    evaluation goes on unrecorded (a path under a regular file cannot be written, even by root)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(folder / "net.py:Net"), "--data", str(folder / "data.npz"), "--quiet",
            "--attack", "pgd:eps=0.1,steps=2", "--json", str(out)]
    assert main([*args, "--store", str(blocker / "r.sqlite")]) == 2
    _one_line_error(capsys, "--store", "cannot be written")
    assert not out.exists()
    env = {**os.environ, "ROBUSTLAB_STORE": str(blocker / "default.sqlite"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "robustlab.cli.main", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "warning: the default results store" in r.stderr and "will not be recorded" in r.stderr
    assert "Traceback" not in r.stderr and out.exists() and "recorded in" not in r.stdout


def test_leaderboard_filters(tmp_path, capsys, digits_mlp, digits):
    from robustlab import __version__, evaluate
    from robustlab.reports.store import model_hash, record

    store = tmp_path / "r.sqlite"
    r = evaluate(digits_mlp, digits.x_test[:20], digits.y_test[:20], ["pgd:eps=0.3,steps=2"], checks=False,
                 keep_records=True)
    record(store, model_digest=model_hash(digits_mlp), model_name="mlp", data="digits:test", result=r,
           specs=["pgd:eps=0.3,steps=2"], version=__version__)
    for threat in ("linf:0.30", "Linf:76.5/255", "linf:0.3"):
        assert main(["leaderboard", "--store", str(store), "--threat", threat, "--data", "digits"]) == 0
        assert "mlp" in capsys.readouterr().out
    assert main(["leaderboard", "--store", str(store), "--threat", "linf:abc"]) == 2
    assert "'abc' is not a positive number" in capsys.readouterr().err
    assert main(["leaderboard", "--store", str(store), "--threat", "linf:8/255", "--format", "json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == []
    assert "no evaluation" in cap.err and "digits:test" in cap.err and "linf:0.3" in cap.err


def test_every_option_has_help():
    from robustlab.cli.main import _all_parsers, build_parser

    missing = [f"{parser.prog} {action.option_strings[0]}" for parser in _all_parsers(build_parser())
               for action in parser._actions
               if action.option_strings and (action.help is None or action.help.startswith("(default:"))
               and action.option_strings[0] not in ("-h", "--help")]
    assert not missing, missing


def test_robustbench_entry_has_every_key(folder, tmp_path):
    rb = tmp_path / "rb.json"
    assert main(_eval(folder, "--attack", "autoattack:norm=linf,eps=0.1,apgd_steps=2,fab_steps=2,square_queries=5",
                      "--robustbench-json", str(rb), "--robustbench-info", "venue=ICML 2020",
                      "--robustbench-info", "additional_data=true")) == 0
    entry = json.loads(rb.read_text())
    assert entry["venue"] == "ICML 2020" and entry["additional_data"] is True and entry["dataset"] is None
    for key in ("link", "authors", "architecture", "reported", "footnote"):
        assert key in entry and entry[key] is None


def test_eval_merge_json_has_the_device(folder, tmp_path):
    args = _eval(folder, "--attack", "pgd:eps=0.1,steps=2", "--batch-size", "20")
    for i in range(2):
        assert main([*args, "--shard", f"{i}/2", "--state", str(tmp_path / f"s{i}")]) == 0
    out = tmp_path / "m.json"
    assert main(["eval-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--json", str(out), "--no-store"]) == 0
    assert json.loads(out.read_text())["device"] == "cpu"


def test_ctrl_c_during_eval_says_what_was_kept(folder, tmp_path):
    """A real SIGINT: exit 130, one line, no traceback; with --state the line is the command that resumes."""
    for state in (None, tmp_path / "state"):
        cmd = [sys.executable, "-m", "robustlab.cli.main", *_eval(
            folder, "--attack", "pgd:eps=0.1,steps=1000000,best_iterate=false", "--batch-size", "10")]
        cmd = [c for c in cmd if c != "--quiet"] + (["--state", str(state)] if state else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTLAB_PROGRESS_SECONDS": "0.5"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stderr is not None
        seen = [proc.stderr.readline() for _ in range(1)]
        while not seen[-1].startswith("evaluate:") and seen[-1] and len(seen) < 50:  # the heartbeat: attacking
            seen.append(proc.stderr.readline())
        assert seen[-1].startswith("evaluate:"), "".join(seen)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.startswith("robustlab eval")]
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert len(lines) == 1, err
        if state:
            assert "the same command resumes" in lines[0] and str(state) in lines[0]
        else:
            assert "nothing was kept" in lines[0] and "--state" in lines[0]


def test_no_attacks_is_said(digits_mlp, digits):
    from robustlab import evaluate

    with pytest.warns(RuntimeWarning, match="no attacks"):
        r = evaluate(digits_mlp, digits.x_test[:10], digits.y_test[:10], [], checks=False)
    assert r["union_accuracy"] is None and r["average_accuracy"] is None


def test_dict_override_points_to_the_dotted_form(capsys):
    assert main(["train", "method_kwargs={eps: 0.2}", "--smoke"]) == 2
    assert "method_kwargs.KEY=VALUE" in capsys.readouterr().err


def test_store_keeps_randomised_shares(tmp_path):
    """Expected accuracies stay shares in the store and in --save-adversarials (not truncated to 0)."""
    from robustlab.reports.exports import save_adversarials

    records = {"label": [0, 1], "clean_pred": [0, 1], "robust": {"a": [0.75, 1.0]}}
    save_adversarials(tmp_path / "a.safetensors", {"a": torch.zeros(2, 1, 2, 2)}, records, ["a"])
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "a.safetensors"))["a.robust"].tolist() == [0.75, 1.0]


def test_a_bug_of_robustlab_inside_the_probe_keeps_its_traceback(folder, monkeypatch):
    """The catch around the user's code is no blanket: an error raised in robustlab's own code there (here its
    normalisation wrapper) is a bug, re-raised as it is, never a one-line user error."""
    from robustlab import utils
    from robustlab.engine import external

    def broken(self, x):  # fails inside robustlab's own code (utils.mix_seed given a string)
        return utils.mix_seed("not an int")

    monkeypatch.setattr(external.Normalized, "forward", broken)
    with pytest.raises(TypeError):
        main(_eval(folder, "--attack", "pgd:eps=0.1", "--normalize", "0.5/0.25"))
