"""`robustlab eval` on a model robustlab did not write: the user's own class (FILE.py:NAME) with weights saved as
a state dict (.pt with `module.` prefixes, nested under "state_dict"; safetensors), TorchScript and torch.export,
and the user's own arrays (.npz float, .npz uint8 NHWC, .safetensors, .pt). Each gives the robust accuracy
`robustlab.evaluate` gives on the in-memory model. Weights that need code to unpickle are refused, the code unrun."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab import evaluate
from robustlab.cli.main import main
from robustlab.engine.external import load_any_model, load_array_data, read_weights
from robustlab.errors import CheckpointError, InputError

SPECS = ["pgd:eps=0.1,steps=10", "apgd-ce:eps=0.1,steps=10"]
# TorchScript is deprecated in favour of torch.export, and users still hand us TorchScript files
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

USER_CODE = '''
import torch.nn.functional as F
from torch import nn


class DigitsNet(nn.Module):
    """A user's network, defined outside robustlab; it wants normalised inputs."""

    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def build(width=8):
    return DigitsNet(width=width)
'''

MEAN, STD = 0.3, 0.4


@pytest.fixture(scope="module")
def user(tmp_path_factory, digits):
    """The user's code file, a model trained from it (normalised inputs), its weights in every format, the data."""
    folder = tmp_path_factory.mktemp("user")
    code = folder / "user_net.py"
    code.write_text(USER_CODE)
    ns: dict = {}
    exec(compile(USER_CODE, str(code), "exec"), ns)
    torch.manual_seed(0)
    net = ns["DigitsNet"](width=8)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(15):
        for i in range(0, digits.x_train.shape[0], 64):
            loss = F.cross_entropy(net((digits.x_train[i:i + 64] - MEAN) / STD), digits.y_train[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    state = net.state_dict()
    torch.save({"epoch": 15, "state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "w.pt")
    from safetensors.torch import save_file

    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in state.items()}, str(folder / "w.safetensors"))

    class Wrapped(nn.Module):  # what the user exports: normalisation included
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net((x - MEAN) / STD)

    torch.jit.save(torch.jit.trace(Wrapped().eval(), digits.x_test[:2]), str(folder / "scripted.bin"))
    ep = torch.export.export(Wrapped().eval(), (digits.x_test[:4],),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, str(folder / "exported.pt2"))
    x, y = digits.x_test[:120], digits.y_test[:120]
    np.savez(folder / "data.npz", x=x.numpy(), y=y.numpy())
    reference = evaluate(Wrapped().eval(), x, y, SPECS, checks=False)
    return folder, reference, x, y


def _eval(tmp_path, *args):
    out = tmp_path / "out.json"
    assert main(["eval", *args, "--attack", SPECS[0], "--attack", SPECS[1], "--json", str(out), "--quiet",
                 "--threads", "1"]) == 0
    return json.loads(out.read_text())


def _same(result, reference):
    assert result["clean_accuracy"] == reference["clean_accuracy"]
    for name in reference["attacks"]:
        assert result["attacks"][name]["robust_accuracy"] == reference["attacks"][name]["robust_accuracy"], name


@pytest.mark.parametrize("weights", ["w.pt", "w.safetensors"])
def test_user_code_with_weights(user, tmp_path, weights):
    folder, reference, _, _ = user
    r = _eval(tmp_path, "--model", f"{folder / 'user_net.py'}:DigitsNet", "--model-kwargs", '{"width": 8}',
              "--weights", str(folder / weights), "--normalize", f"{MEAN}/{STD}", "--data", str(folder / "data.npz"))
    _same(r, reference)
    assert 0 < r["attacks"]["pgd"]["robust_accuracy"] < r["clean_accuracy"]  # a trained model, a real attack


def test_a_factory_function(user, tmp_path):
    folder, reference, _, _ = user
    r = _eval(tmp_path, "--model", f"{folder / 'user_net.py'}:build", "--weights", str(folder / "w.pt"),
              "--normalize", f"{MEAN}/{STD}", "--data", str(folder / "data.npz"))
    _same(r, reference)


@pytest.mark.parametrize("name", ["scripted.bin", "exported.pt2"])
def test_torchscript_and_export_told_apart_by_content(user, tmp_path, name):
    folder, reference, _, _ = user
    _same(_eval(tmp_path, "--model", str(folder / name), "--data", str(folder / "data.npz")), reference)


@pytest.mark.parametrize("fmt", ["uint8-nhwc.npz", "float.safetensors", "float.pt"])
def test_data_formats(user, tmp_path, fmt):
    folder, _, x, y = user
    path = tmp_path / fmt
    if fmt.startswith("uint8"):
        x8 = (x * 255).round().to(torch.uint8)
        np.savez(path, x=x8.permute(0, 2, 3, 1).numpy(), y=y.numpy())
        expect = x8.float() / 255
    elif fmt.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"x": x.contiguous(), "y": y}, str(path))
        expect = x
    else:
        torch.save({"x": x, "y": y}, path)
        expect = x
    xl, yl = load_array_data(path)
    assert torch.equal(xl, expect) and torch.equal(yl, y) and yl.dtype == torch.int64


def test_bad_data_is_named(tmp_path):
    cases = {
        "range.npz": dict(x=np.full((2, 1, 8, 8), 2.0, np.float32), y=np.zeros(2, np.int64)),
        "shape.npz": dict(x=np.zeros((2, 8, 8), np.float32), y=np.zeros(2, np.int64)),
        "length.npz": dict(x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(3, np.int64)),
        "labels.npz": dict(x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.float32)),
        "nox.npz": dict(images=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int64)),
    }
    messages = {"range.npz": r"\[0, 1\]", "shape.npz": "4 dimensions", "length.npz": "2 images but 3 labels",
                "labels.npz": "integer labels", "nox.npz": "no 'x'"}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(InputError, match=messages[name]):
            load_array_data(tmp_path / name)


def test_a_split_is_refused_for_an_array_file(tmp_path):
    """An array file is one set of images: --split train must not pass unnoticed (it used to be ignored)."""
    from robustlab.engine.tasks import Classification

    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(InputError, match="--split train: .* array file"):
        Classification().eval_data(str(tmp_path / "d.npz"), "train", {})
    (x, y), meta = Classification().eval_data(str(tmp_path / "d.npz"), "test", {})
    assert x.shape == (2, 1, 8, 8) and meta["split"] == "file"


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_MARKER),))


_MARKER = ""


def test_weights_that_would_run_code_are_refused(user, tmp_path):
    global _MARKER
    folder = user[0]
    marker = tmp_path / "code-ran"
    _MARKER = str(marker)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights only"):
        read_weights(evil)
    torch.save({"state_dict": _Payload()}, tmp_path / "evil_zip.pt")
    with pytest.raises(CheckpointError, match="weights only"):
        load_any_model(f"{folder / 'user_net.py'}:DigitsNet", weights=tmp_path / "evil_zip.pt")
    assert not marker.exists()


def test_mismatched_weights_list_the_keys(user, tmp_path):
    folder = user[0]
    torch.save({"conv.weight": torch.zeros(8, 1, 3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing conv\.bias"):
        load_any_model(f"{folder / 'user_net.py'}:DigitsNet", weights=tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_any_model(f"{folder / 'user_net.py'}:DigitsNet", weights=folder / "w.pt", model_kwargs='{"width": 4}')


def test_model_errors_are_named(user, tmp_path):
    folder = user[0]
    with pytest.raises(InputError, match="has no 'Nope'"):
        load_any_model(f"{folder / 'user_net.py'}:Nope")
    with pytest.raises(InputError, match="not JSON"):
        load_any_model(f"{folder / 'user_net.py'}:DigitsNet", model_kwargs="{width: 8}")
    with pytest.raises(InputError, match="MEAN/STD"):
        load_any_model(f"{folder / 'user_net.py'}:DigitsNet", normalize="0.5")
    with pytest.raises(CheckpointError, match="torch.save file"):
        load_any_model(str(folder / "w.pt"))
    with pytest.raises(InputError, match="--weights applies"):
        load_any_model(str(folder / "scripted.bin"), weights=folder / "w.pt")
    ep = torch.export.export(nn.Linear(4, 2), (torch.rand(2, 4),))
    torch.export.save(ep, str(tmp_path / "static.pt2"))
    with pytest.raises(InputError, match="fixed batch size"):
        load_any_model(str(tmp_path / "static.pt2"))
    assert main(["eval", "--model", f"{folder / 'user_net.py'}:DigitsNet", "--quiet"]) == 2  # no --data: a clear error


def test_input_range_255(tmp_path):
    """A model that takes [0, 255] pixels sees x * 255 through the wrapper."""
    (tmp_path / "scaled.py").write_text("import torch\nclass Echo(torch.nn.Module):\n"
                                        "    def forward(self, x):\n        return x.flatten(1)[:, :3]\n")
    model, _ = load_any_model(f"{tmp_path / 'scaled.py'}:Echo", input_range=255)
    assert torch.allclose(model(torch.full((1, 1, 2, 2), 0.5)), torch.full((1, 3), 127.5))


def test_outputs_users_already_read(user, tmp_path):
    """--log in the reference AutoAttack's shape, --robustbench-json, --save-adversarials as floats with flags."""
    folder, _, x, y = user
    log, rb, adv, out = tmp_path / "aa.log", tmp_path / "rb.json", tmp_path / "adv.safetensors", tmp_path / "r.json"
    spec = "autoattack:norm=linf,eps=8/255,apgd_steps=5,fab_steps=5,square_queries=20,n_targets=2"
    assert main(["eval", "--model", str(folder / "exported.pt2"), "--data", str(folder / "data.npz"), "--attack",
                 spec, "--log", str(log), "--robustbench-json", str(rb), "--save-adversarials", str(adv),
                 "--json", str(out), "--quiet", "--threads", "1"]) == 0
    text = log.read_text()
    for line in ("initial accuracy: ", "robust accuracy after APGD-CE: ", "robust accuracy after SQUARE: ",
                 "max Linf perturbation: ", "nan in tensor: 0", "(total time "):
        assert line in text, line
    result = json.loads(out.read_text())
    aa = result["attacks"]["autoattack"]
    assert [s["attack"] for s in aa["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["seconds"] > 0 and aa["adversarial_check"]["max_perturbation"] <= 8 / 255 + 1e-6
    entry = json.loads(rb.read_text())
    assert entry["eps"] == "8/255" and entry["threat_model"] == "Linf"
    assert entry["clean_acc"] == f"{100 * result['clean_accuracy']:.2f}"
    assert entry["autoattack_acc"] == f"{100 * aa['robust_accuracy']:.2f}"
    from safetensors.torch import load_file

    saved = load_file(str(adv))
    x_adv, robust = saved["autoattack.x_adv"], saved["autoattack.robust"].bool()
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape and torch.equal(saved["y"], y)
    assert robust.float().mean().item() == pytest.approx(aa["robust_accuracy"])
    assert (x_adv - x).abs().amax() <= 8 / 255 + 1e-6
    model, _ = load_any_model(str(folder / "exported.pt2"))
    with torch.no_grad():  # the stored points are the ones judged: fooled where not robust
        fooled = model(x_adv).argmax(1) != y
    assert torch.equal(fooled[saved["clean_correct"].bool()], ~robust[saved["clean_correct"].bool()])


def test_output_options_are_checked_first(user, tmp_path):
    folder = user[0]
    base = ["eval", "--model", str(folder / "exported.pt2"), "--data", str(folder / "data.npz"), "--quiet"]
    assert main([*base, "--save-adversarials", str(tmp_path / "adv.png")]) == 2
    assert main([*base, "--robustbench-json", str(tmp_path / "rb.json"), "--attack", "pgd:eps=0.1"]) == 2
    # AutoAttack's fast version is not RobustBench's protocol
    assert main([*base, "--robustbench-json", str(tmp_path / "rb.json"), "--attack",
                 "autoattack:eps=8/255,version=fast"]) == 2


def test_the_fast_version_through_the_cli_says_what_ran(user, tmp_path):
    """`robustlab eval --attack autoattack:version=fast`: the JSON and the log name the version that ran, and the
    results store keeps it apart from the standard protocol (the leaderboard's AutoAttack column)."""
    from robustlab.reports.store import leaderboard

    folder = user[0]
    store, out, log = tmp_path / "store.sqlite", tmp_path / "r.json", tmp_path / "aa.log"
    assert main(["eval", "--model", str(folder / "exported.pt2"), "--data", str(folder / "data.npz"), "--attack",
                 "autoattack:norm=linf,eps=8/255,version=fast,apgd_steps=5", "--json", str(out), "--log", str(log),
                 "--store", str(store), "--quiet", "--threads", "1"]) == 0
    aa = json.loads(out.read_text())["attacks"]["autoattack"]
    assert aa["version"] == "fast" and aa["ran"] == "fast" and aa["escalated_because"] == []
    assert log.read_text().splitlines()[1] == "using fast version including apgd-ce, apgd-t-malt."
    rows = leaderboard(store)
    assert rows[0]["autoattack_accuracy"] is None and rows[0]["attacks"] == ["autoattack-fast"]
