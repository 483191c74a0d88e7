"""Checkpoints: round trip, atomic writes, corrupt/truncated/foreign files refused, never unpickled."""
import pickle

import pytest
import torch

from robustlab.engine.checkpoint import CheckpointError, load_model, save_model
from robustlab.models import create_model


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    m = create_model("lenet5")
    path = save_model(tmp_path / "m.safetensors", m, extra={"epoch": 3})
    m2, extra = load_model(path)
    assert extra == {"epoch": 3}
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(m.eval()(x), m2(x))
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


@pytest.mark.parametrize("name,kw", [("mlp", {}), ("lenet5", {}), ("small-cnn", {}),
                                     ("preact-resnet18", {"width": 8}), ("resnet18", {"width": 8}),
                                     ("wrn", {"depth": 10, "width": 1})])
def test_every_model_round_trips(tmp_path, name, kw):
    torch.manual_seed(0)
    m = create_model(name, **kw).eval()
    m2, _ = load_model(save_model(tmp_path / f"{name}.safetensors", m))
    x = torch.rand(2, m.config["in_channels"], m.config["input_size"], m.config["input_size"])
    assert torch.allclose(m(x), m2(x))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    path = save_model(tmp_path / "m.safetensors", create_model("lenet5"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not (tmp_path / "PWNED").exists()


def test_foreign_safetensors_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a robustlab model checkpoint"):
        load_model(path)


def test_weights_for_another_architecture_refused(tmp_path):
    from safetensors.torch import save_file

    m = create_model("lenet5")
    path = tmp_path / "m.safetensors"
    save_model(path, m)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state.pop(next(iter(state)))
    meta.pop("sha256")  # a file of another architecture, not a damaged one: it has no hash of these tensors
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(path)


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """safetensors files open with their header length (little-endian); 0x80 as its first byte is a pickle's
    first byte too: the reader must look at the whole header, not one byte (a flaky misdetection before)."""
    from robustlab.engine.checkpoint import read_checkpoint, save_model
    from robustlab.models import create_model

    model = create_model("mlp", hidden=8, depth=1)
    for pad in range(512):
        path = save_model(tmp_path / "m.safetensors", model, extra={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    state, config, extra = read_checkpoint(path)
    assert config["name"] == "mlp" and extra["pad"] == "x" * pad
