"""Every bad input found so far gets a clear error before any work starts: the error class, the exit code and a
message that names the offending value. One table for the Python API, one for the command line (run in-process);
a new case is one line."""
from __future__ import annotations

import pytest
import torch

import robustlab.methods  # noqa: F401  (registers the methods)
from robustlab import errors as E
from robustlab import evaluate
from robustlab.attacks import create_attack
from robustlab.engine.checkpoint import load_model, save_model
from robustlab.engine.config import TrainConfig, load_config
from robustlab.methods import create_method
from robustlab.models import create_model
from robustlab.registry import DATASETS
from tests.conftest import TinyCNN


def _m():
    torch.manual_seed(0)
    return TinyCNN().eval()


def _x(n=4, dtype=torch.float32):
    return torch.rand(n, 1, 8, 8, dtype=dtype)


def _y(n=4, k=10):
    return torch.randint(0, k, (n,))


class TupleOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x):
        return self.net(x), x


def _dict_loader():
    return [{"image": _x(), "label": _y()}]


def _trainer(**kw):
    from robustlab.engine.trainer import Trainer

    return Trainer(TrainConfig(**{"dataset": "digits", "model": "mlp", "epochs": 1, **kw}))


# (id, what to run, error class, text the message must contain)
API = [
    ("nan-images", lambda: create_attack("pgd", _m())(torch.full((2, 1, 8, 8), float("nan")), _y(2)), E.InputError, "NaN"),
    ("images-above-1", lambda: create_attack("pgd", _m())(_x() * 255, _y()), E.InputError, "[0, 1]"),
    ("integer-images", lambda: create_attack("pgd", _m())((_x() * 255).long(), _y()), E.InputTypeError, "int64"),
    ("float64-images", lambda: create_attack("pgd", _m())(_x(dtype=torch.float64), _y()), E.InputTypeError, "float64"),
    ("rank-3-images", lambda: create_attack("pgd", _m())(torch.rand(4, 8, 8), _y()), E.InputError, "(N, C, H, W)"),
    ("label-out-of-range", lambda: create_attack("pgd", _m())(_x(), torch.tensor([0, 1, 2, 12])), E.InputError,
     "label 12"),
    ("label-out-of-range-evaluate", lambda: evaluate(_m(), _x(), torch.tensor([0, 1, 2, 12]), ["fgsm:eps=0.1"]),
     E.InputError, "label 12"),
    ("negative-label", lambda: create_attack("pgd", _m())(_x(), torch.tensor([0, 1, 2, -1])), E.InputError, "-1"),
    ("float-labels", lambda: create_attack("pgd", _m())(_x(), torch.zeros(4)), E.InputTypeError, "float32"),
    ("labels-wrong-length", lambda: create_attack("pgd", _m())(_x(), _y(3)), E.InputError, "3 labels"),
    ("negative-eps", lambda: create_attack("pgd", _m(), eps=-0.3), E.InputError, "-0.3"),
    ("linf-eps-pixel-units", lambda: create_attack("pgd:eps=8", _m()), E.InputError, "8/255"),
    ("steps-zero", lambda: create_attack("pgd", _m(), steps=0), E.InputError, "steps"),
    ("attack-option-typo", lambda: create_attack("pgd:step=3", _m()), E.OptionError, "'step'"),
    ("attack-option-typo-lists-valid", lambda: create_attack("pgd:step=3", _m()), E.OptionError, "step_size"),
    ("unknown-attack", lambda: create_attack("pgdd", _m()), E.UnknownNameError, "'pgdd'"),
    ("duplicate-spec-key", lambda: create_attack("pgd:eps=0.3,eps=0.01", _m()), E.AttackSpecError, "'eps'"),
    ("unknown-norm", lambda: create_attack("pgd:norm=l3", _m()), E.InputError, "'l3'"),
    ("unknown-loss", lambda: create_attack("pgd:loss=hinge", _m()), E.InputError, "'hinge'"),
    ("slide-q-on-linf", lambda: create_attack("pgd:norm=linf,q=0.5", _m()), E.OptionError, "q=0.5"),
    ("fgsm-l1", lambda: create_attack("fgsm:norm=l1", _m()), E.InputError, "'l1'"),
    ("brendel-bethge-l1", lambda: create_attack("brendel-bethge:norm=l1", _m()), E.InputError, "'l1'"),
    ("brendel-bethge-unknown-init", lambda: create_attack("brendel-bethge:init=zeros", _m()), E.InputError, "batch, noise"),
    ("targeted-with-true-label", lambda: create_attack("pgd", _m())(_x(), _y(), target=torch.zeros(4).long() * 0
                                                                       + 0) if False else
     create_attack("pgd", _m()).run(_x(), torch.zeros(4).long(), target=torch.zeros(4).long()),
     E.InputError, "target equals"),
    ("untargeted-attack-given-target", lambda: create_attack("square", _m()).run(_x(), _y(), target=_y()),
     E.InputError, "square"),
    ("model-returns-tuple", lambda: evaluate(TupleOut().eval(), _x(), _y(), ["fgsm:eps=0.1"]), E.InputTypeError,
     "tuple"),
    ("model-returns-tuple-attack", lambda: create_attack("pgd", TupleOut().eval())(_x(), _y()), E.InputTypeError,
     "tuple"),
    ("attacks-as-string", lambda: evaluate(_m(), _x(), _y(), "fgsm:eps=0.1"), E.InputTypeError, "fgsm:eps=0.1"),
    ("attacks-wrong-type", lambda: evaluate(_m(), _x(), _y(), [3]), E.InputTypeError, "int"),
    ("dataloader-of-dicts", lambda: evaluate(_m(), _dict_loader(), attacks=["fgsm:eps=0.1"]), E.InputTypeError,
     "image"),
    ("n-samples-negative", lambda: evaluate(_m(), _x(), _y(), ["fgsm:eps=0.1"], n_samples=-5), E.InputError, "-5"),
    ("batch-size-zero", lambda: evaluate(_m(), _x(), _y(), ["fgsm:eps=0.1"], batch_size=0), E.InputError,
     "batch_size"),
    ("evaluate-no-labels", lambda: evaluate(_m(), _x(), None), E.InputError, "labels"),
    ("data-shape-does-not-fit-model",
     lambda: evaluate(create_model("small-cnn", width=4, hidden=8), _x(), _y(), ["fgsm:eps=0.1"]), E.InputError,
     "(1, 28, 28)"),
    ("attack-bound-to-other-model", lambda: evaluate(_m(), _x(), _y(), [create_attack("fgsm", _m())]), E.InputError,
     "different model"),
    ("unknown-model", lambda: create_model("resnet-1000"), E.UnknownNameError, "'resnet-1000'"),
    ("model-option-typo", lambda: create_model("small-cnn", widht=4), E.OptionError, "'widht'"),
    ("wrn-bad-depth", lambda: create_model("wrn", depth=27), E.InputError, "27"),
    ("unknown-method", lambda: create_method("pgd-att"), E.UnknownNameError, "'pgd-att'"),
    ("method-option-typo", lambda: create_method("pgd-at", epz=0.3), E.OptionError, "'epz'"),
    ("msd-ignored-steps", lambda: create_method("msd", steps_linf=5), E.OptionError, "'steps_linf'"),
    ("norm-outside-norms", lambda: create_method("sat", norms=("linf",), eps_l2=1.0), E.OptionError, "eps_l2=1.0"),
    ("unknown-dataset", lambda: DATASETS.create("mnist6k"), E.UnknownNameError, "'mnist6k'"),
    ("dataset-missing-root", lambda: DATASETS.create("cifar10", root="/nonexistent/cifar"), E.DataError,
     "/nonexistent/cifar"),
    ("config-unknown-key", lambda: TrainConfig(**{"epochz": 3}) if False else load_config(None, ["epochz=3"]),
     E.ConfigError, "'epochz'"),
    ("config-bad-type", lambda: load_config(None, ["epochs=three"]), E.ConfigError, "'epochs'"),
    ("config-negative-lr", lambda: load_config(None, ["lr=-0.1"]), E.ConfigError, "'lr'"),
    ("config-select-without-validation", lambda: load_config(None, ["validation=0"]), E.ConfigError, "validation"),
    ("device-cuda-without-cuda", lambda: _trainer(device="cuda"), E.DeviceError, "cpu"),
    ("device-nonsense", lambda: _trainer(device="gpu7"), E.DeviceError, "'gpu7'"),
    ("model-channels-do-not-fit-data", lambda: _trainer(model_kwargs={"in_channels": 3}), E.DataError,
     "in_channels=3"),
    ("missing-checkpoint", lambda: load_model("/nonexistent/model.safetensors"), E.CheckpointError,
     "/nonexistent/model.safetensors"),
]


@pytest.mark.parametrize("case,run,kind,text", API, ids=[c[0] for c in API])
def test_python_api_bad_input(case, run, kind, text):
    with pytest.raises(kind) as e:
        run()
    assert text in str(e.value), f"{case}: {e.value}"
    assert isinstance(e.value, E.RobustlabError)  # the CLI turns exactly these into one line + exit 2


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_tiny_cnn):
    root = tmp_path_factory.mktemp("bad-inputs")
    from robustlab.models import create_model as cm

    mlp = cm("mlp", input_size=8, hidden=16, depth=1)
    ckpt = save_model(root / "digits.safetensors", mlp, extra={"config": {"dataset": "digits"}})
    pt = root / "state.pt"
    torch.save(mlp.state_dict(), pt)
    (root / "a-file").write_text("")
    (root / "bad.yaml").write_text("epochz: 3\n")
    (root / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    import numpy as np

    from robustlab.reports.store import store_problem

    np.savez(root / "data.npz", x=np.zeros((4, 1, 8, 8), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    assert store_problem(root / "r.sqlite") is None  # an empty store
    return {"ckpt": str(ckpt), "pt": str(pt), "file": str(root / "a-file"), "yaml": str(root / "bad.yaml"),
            "garbage": str(root / "garbage.safetensors"), "root": root, "npz": str(root / "data.npz"),
            "store": str(root / "r.sqlite")}


# (id, argv with {placeholders}, text the one-line error must contain)
CLI = [
    ("eval-missing-model", ["eval", "--model", "/nonexistent/m.safetensors"], "/nonexistent/m.safetensors"),
    ("eval-torch-pt-file", ["eval", "--model", "{pt}"], "torch.save"),
    ("eval-garbage-file", ["eval", "--model", "{garbage}"], "garbage.safetensors"),
    ("eval-unknown-attack", ["eval", "--model", "{ckpt}", "--attack", "pgdd"], "'pgdd'"),
    ("eval-attack-typo", ["eval", "--model", "{ckpt}", "--attack", "pgd:step=3"], "'step'"),
    ("eval-eps-pixel-units", ["eval", "--model", "{ckpt}", "--attack", "pgd:eps=8"], "8/255"),
    ("eval-negative-eps", ["eval", "--model", "{ckpt}", "--attack", "pgd:eps=-0.3"], "-0.3"),
    ("eval-duplicate-key", ["eval", "--model", "{ckpt}", "--attack", "pgd:eps=0.3,eps=0.1"], "'eps'"),
    ("eval-n-samples-negative", ["eval", "--model", "{ckpt}", "--n-samples", "-5"], "-5"),
    ("eval-batch-size-zero", ["eval", "--model", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    ("eval-device-cuda", ["eval", "--model", "{ckpt}", "--device", "cuda"], "available"),
    ("eval-unwritable-json", ["eval", "--model", "{ckpt}", "--json", "{file}/out.json"], "out.json"),
    ("eval-unwritable-report", ["eval", "--model", "{ckpt}", "--report", "{file}/rep"], "rep"),
    ("eval-data-does-not-fit", ["eval", "--model", "{ckpt}", "--data", "mnist5k", "--n-samples", "4"], "(1, 28, 28)"),
    ("eval-unknown-dataset", ["eval", "--model", "{ckpt}", "--data", "mnist6k"], "'mnist6k'"),
    ("eval-dataset-option-typo", ["eval", "--model", "{ckpt}", "--data", "digits:sead=3"], "'sead'"),
    ("eval-detection-data-for-classifier", ["eval", "--model", "{ckpt}", "--data", "mnist-det:n_train=4,n_test=4"],
     "detection dataset"),
    ("eval-threads-zero", ["eval", "--model", "{ckpt}", "--threads", "0"], "--threads"),
    ("eval-ap-mode-for-classifier", ["eval", "--model", "{ckpt}", "--ap-mode", "coco"], "ap_mode 'coco'"),
    # issue 34: found before the work, one line, the value named
    ("eval-unwritable-store", ["eval", "--model", "{ckpt}", "--store", "{file}/r.sqlite"], "{file}/r.sqlite"),
    ("eval-model-is-a-folder", ["eval", "--model", "{root}"], "is a folder"),
    ("eval-option-without-value", ["eval", "--model", "{ckpt}", "--attack", "pgd:eps="], "'pgd:eps='"),
    ("eval-eps-no-budget", ["eval", "--model", "{ckpt}", "--attack", "pgd:eps=1e6"], "eps 1e+06"),
    ("eval-normalize-units", ["eval", "--model", "{ckpt}", "--normalize", "0.5/0.25", "--input-range", "255"],
     "127.5/63.75"),
    ("eval-draws-zero", ["eval", "--model", "{ckpt}", "--draws", "0"], "--draws"),
    ("eval-robustbench-info-alone", ["eval", "--model", "{ckpt}", "--robustbench-info", "venue=x"],
     "--robustbench-json"),
    ("eval-robustbench-info-unknown-key", ["eval", "--model", "{ckpt}", "--robustbench-json", "rb.json",
                                          "--robustbench-info", "veneu=x"], "'veneu=x'"),
    ("eval-array-file-without-attack", ["eval", "--model", "{ckpt}", "--data", "{npz}"], "--attack"),
    ("leaderboard-threat-not-a-budget", ["leaderboard", "--store", "{store}", "--threat", "linf:abc"], "'abc'"),
    ("leaderboard-threat-unknown-norm", ["leaderboard", "--store", "{store}", "--threat", "lnf:0.3"], "'lnf'"),
    ("train-dict-override", ["train", "method_kwargs={{eps: 0.2}}"], "method_kwargs.KEY=VALUE"),
    ("train-config-missing", ["train", "--config", "/nonexistent/c.yaml"], "/nonexistent/c.yaml"),
    ("train-config-unknown-key", ["train", "--config", "{yaml}"], "'epochz'"),
    ("train-override-bad", ["train", "epochs=-1"], "'epochs'"),
    ("train-override-unknown", ["train", "epochz=3"], "'epochz'"),
    ("train-device-cuda", ["train", "device=cuda", "epochs=1"], "available"),
    ("train-resume-without-run", ["train", "--resume", "--out-dir", "{root}/none"], "does not exist"),
    ("train-unknown-method", ["train", "method=pgd-att"], "'pgd-att'"),
    ("train-method-option-typo", ["train", "method=pgd-at", "method_kwargs.epz=0.3"], "'epz'"),
    ("run-train-steps-zero", ["run", "--out-dir", "{root}/runs", "--train-steps", "0"], "--train-steps"),
    ("run-width-zero", ["run", "--out-dir", "{root}/runs", "--width", "0"], "--width"),
    ("run-n-curve-zero", ["run", "--out-dir", "{root}/runs", "--n-curve", "0"], "--n-curve"),
    ("run-negative-eps", ["run", "--out-dir", "{root}/runs", "--eps", "-0.3"], "-0.3"),
    ("run-unwritable-out-dir", ["run", "--out-dir", "{file}/runs"], "runs"),
    ("compare-model-twice", ["compare", "--model", "a={ckpt}", "--model", "a={ckpt}", "--attack", "fgsm"], "'a'"),
    ("corruptions-eval-missing-root", ["corruptions", "eval", "--model", "{ckpt}", "--root", "/nonexistent/c"],
     "/nonexistent/c"),
]


@pytest.mark.parametrize("case,argv,text", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input_is_one_line_and_exit_2(case, argv, text, files, capsys, monkeypatch, tmp_path):
    from robustlab.cli.main import main

    monkeypatch.chdir(tmp_path)  # nothing lands in the working tree
    argv = [a.format(**files) for a in argv]
    rc = main(argv + ["--quiet"] if argv[0] == "eval" else argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert text.format(**files) in err, (case, err)


def test_verbose_before_or_after_the_subcommand_shows_the_traceback(capsys):
    from robustlab.cli.main import main

    for argv in (["-v", "eval", "--model", "/nonexistent/m.safetensors"],
                 ["eval", "--model", "/nonexistent/m.safetensors", "--verbose"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "CheckpointError" in err and err.strip().endswith("does not exist")


def test_a_bug_is_not_a_user_error(monkeypatch):
    """An unexpected exception inside a command is a bug: it propagates with its traceback (exit 1 from the
    interpreter), it is never turned into a one-line 'user error'."""
    from robustlab.cli import main as cli

    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "cmd_list", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["list"])


def test_a_bug_exits_1_with_a_traceback_from_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys, robustlab.cli.main as m\n"
            "def broken(args): raise KeyError('bug')\n"
            "m.cmd_list = broken\n"
            "sys.exit(m.main(['list']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'bug'" in r.stderr


def test_an_error_inside_a_factory_keeps_its_traceback():
    """Registry.create checks options against the signature first; a TypeError raised by the factory's own code is
    not re-labelled 'bad options' and keeps the frame it came from."""
    from robustlab.registry import Registry

    reg = Registry("thing")

    @reg.register("broken")
    def broken(a: int = 1):
        return len(a)  # a bug: TypeError inside the factory

    with pytest.raises(TypeError) as e:
        reg.create("broken", a=3)
    assert not isinstance(e.value, E.RobustlabError) and "len()" in str(e.value)
    assert any(frame.name == "broken" for frame in e.traceback)
    with pytest.raises(E.OptionError, match="no option 'b'; valid options: a"):
        reg.create("broken", b=3)


def test_the_table_is_large_enough():
    assert len(API) + len(CLI) >= 60
