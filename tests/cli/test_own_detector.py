"""Your own detector in (issue 29, item 6): `robustlab eval --model FILE.py:NAME --weights W` on a one-stage
detector robustlab never shipped (its own priors, layers and class names), implementing the interface of
docs/detection.md, gives the in-process `evaluate_detector` result; a file that does not implement it is one line
naming what is missing."""
from __future__ import annotations

import json

import pytest
import torch

from robustlab.cli.main import main
from robustlab.engine.evaluator import without_seconds

DETECTOR = '''
import torch
from torch import nn


class GridDetector(nn.Module):
    """A 6x6 grid of square anchors over a strided conv: a user's one-stage detector, not robustlab's SSD."""

    task = "detection"

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        self.class_names = [f"digit {i}" for i in range(num_classes)]
        g = (torch.arange(6) + 0.5) / 6
        cy, cx = torch.meshgrid(g, g, indexing="ij")
        side = torch.full((36,), 0.25)
        self.register_buffer("priors", torch.stack([cx.flatten(), cy.flatten(), side, side], 1))
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(6))
        self.loc = nn.Conv2d(8, 4, 1)
        self.conf = nn.Conv2d(8, num_classes + 1, 1)

    def forward(self, x):
        h = self.body(x / 255)
        b = x.shape[0]
        return (self.loc(h).permute(0, 2, 3, 1).reshape(b, -1, 4),
                self.conf(h).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes + 1))


class NoPriors(nn.Module):
    task = "detection"
    num_classes = 10

    def forward(self, x):
        return x
'''
DATA = "mnist-det:preset=voc,n_train=8,n_test=16"


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("own-detector")
    (folder / "grid.py").write_text(DETECTOR)
    ns: dict = {}
    exec(compile(DETECTOR, "grid.py", "exec"), ns)
    torch.manual_seed(0)
    model = ns["GridDetector"]()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "w.safetensors"))
    return folder, model.eval()


def test_a_users_detector_through_the_command_line(own, tmp_path, capsys):
    from robustlab.detection.attacks import detection_attacks
    from robustlab.detection.data import mnist_det
    from robustlab.detection.evaluate import evaluate_detector
    from robustlab.reports.json import write_json

    folder, model = own
    out = tmp_path / "r.json"
    assert main(["eval", "--model", f"{folder / 'grid.py'}:GridDetector", "--weights", str(folder / "w.safetensors"),
                 "--data", DATA, "--attack", "cwa:steps=2", "--integrity", "off", "--json", str(out), "--quiet",
                 "--threads", "1", "--no-store"]) == 0
    assert "digit 0" in capsys.readouterr().out  # its own class names in the AP table
    cli = json.loads(out.read_text())
    data = mnist_det(preset="voc", n_train=8, n_test=16)
    ref = evaluate_detector(model, data.test, 16, attacks=detection_attacks(["cwa:steps=2"], model))
    for key in ("model", "data", "attack_specs", "device"):
        cli.pop(key)
    write_json(tmp_path / "ref.json", ref)  # the same JSON writer (NaN AP of an absent class -> null)
    assert without_seconds(cli) == without_seconds(json.loads((tmp_path / "ref.json").read_text()))
    assert cli["attacks"]["cwa:steps=2"]["perturbation"]["max_abs"] <= 8 + 1e-4


def test_a_file_that_does_not_implement_the_interface_is_one_line(own, capsys):
    folder, _ = own
    assert main(["eval", "--model", f"{folder / 'grid.py'}:NoPriors", "--data", DATA, "--no-store", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "priors, a (P, 4) tensor" in err and "docs/detection.md" in err
