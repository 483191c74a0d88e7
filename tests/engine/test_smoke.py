"""`robustlab train --smoke` over every shipped config: each runs end to end (stand-in data in the dataset's real
file format, two optimizer steps, a checkpoint, a resume, an evaluation) in seconds on a CPU. Parametrised over
the files, so a new config is covered the moment it is added."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustlab import rng
from robustlab.cli.main import main
from robustlab.data.standins import write_standin
from robustlab.engine.config import load_config
from robustlab.engine.smoke import cap_attack_steps, smoke_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_every_config_folder_is_covered():
    assert len(CONFIGS) >= 181 and {p.parent.name for p in CONFIGS} >= {"configs", "critic", "mng-ac", "part", "wpgd"}


@pytest.fixture
def draws(monkeypatch):
    """Every seeded draw of the run, and the device-side generators made for it: a device-side generator must
    always be drawn from with the device named (on a GPU, a host-side draw from it is refused by PyTorch)."""
    record: list[tuple[torch.Generator, object]] = []
    device_side: list[torch.Generator] = []
    check, make = rng.check, rng.device_generator

    def recording_check(generator, device=None):
        record.append((generator, device))
        check(generator, device)

    def recording_make(device, seed):
        device_side.append(make(device, seed))
        return device_side[-1]

    monkeypatch.setattr(rng, "check", recording_check)
    monkeypatch.setattr(rng, "device_generator", recording_make)
    return record, device_side


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_smoke(path, capsys, draws):
    assert main(["train", "--config", str(path), "--smoke", "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 epochs of 1 step with a resume between" in out
    record, device_side = draws
    assert device_side, "the Trainer makes its step generators with rng.device_generator"
    host_draws = [g.device for g, device in record if device is None and any(g is d for d in device_side)]
    assert host_draws == [], "a device-side generator drew a host tensor (fails on the first GPU run)"


def test_smoke_caps_steps_and_keeps_the_rest(tmp_path):
    cfg = load_config(ROOT / "configs" / "part" / "cifar10-part.yaml")
    smoke, data = smoke_config(cfg, tmp_path, device="cpu")
    assert smoke.method == cfg.method and smoke.model == cfg.model and smoke.schedule == cfg.schedule
    assert smoke.method_kwargs["steps"] == 2 and cfg.method_kwargs["steps"] > 2
    assert smoke.method_kwargs["burn_in_epochs"] == 1  # the second epoch runs PART's reweighting phase
    assert "steps=2" in smoke.eval_attack and smoke.epochs == 2 and smoke.compile is False
    assert Path(smoke.dataset_kwargs["root"], "data_batch_1").is_file()  # CIFAR pickles, read by the real loader
    assert data.n_train == smoke.batch_size + smoke.validation and data.x_train.dtype == torch.uint8
    assert cap_attack_steps("pgd:norm=l2,eps=1.5,steps=20") == "pgd:norm=l2,eps=1.5,steps=2"
    assert cap_attack_steps("cwa") == "cwa:steps=2"  # the default (10) capped too
    assert cap_attack_steps("fgsm:eps=0.3") == "fgsm:eps=0.3"  # no iterations to cap
    # a config that leaves the iterations at the method's defaults (MSD's 20, the per-norm 10 / 10 / 20) is capped too
    msd = load_config(ROOT / "configs" / "mng-ac" / "cifar10-msd.yaml")
    assert msd.method_kwargs == {} and smoke_config(msd, tmp_path / "msd", device="cpu")[0].method_kwargs["msd_steps"] == 2
    avg, _ = smoke_config(load_config(ROOT / "configs" / "mng-ac" / "cifar10-adv-avg.yaml"), tmp_path / "avg", device="cpu")
    assert [avg.method_kwargs[f"steps_{n}"] for n in ("linf", "l2", "l1")] == [2, 2, 2]


@pytest.mark.parametrize("dataset,kwargs,shape,k", [
    ("mnist", {}, (1, 28, 28), 10), ("cifar10", {}, (3, 32, 32), 10), ("cifar100", {}, (3, 32, 32), 100),
    ("svhn", {}, (3, 32, 32), 10), ("tiny-imagenet", {}, (3, 64, 64), 200),
    ("image-folder", {"size": 16}, (3, 16, 16), 10), ("cifar10-c", {}, (3, 32, 32), 10)])
def test_standins_load_through_the_real_loaders(tmp_path, dataset, kwargs, shape, k):
    from robustlab.data import load_dataset

    data = load_dataset(dataset, **write_standin(dataset, tmp_path, 7, 5, 0, kwargs))
    assert data.x_test.shape == (5, *shape) and data.num_classes == k
    assert data.n_train == (0 if dataset == "cifar10-c" else 7)


@pytest.mark.parametrize("dataset,k", [("voc", 20), ("coco", 80)])
def test_detection_standins_load_through_the_real_loaders(tmp_path, dataset, k):
    from robustlab.detection.data import load_detection_data
    from robustlab.detection.targets import check_targets

    data = load_detection_data(dataset, **write_standin(dataset, tmp_path, 6, 3, 0, {"image_size": 300}))
    assert (len(data.train), len(data.test), data.num_classes) == (6, 3, k)
    x, t = data.train.batch(torch.arange(6), seeds=list(range(6)))
    assert x.shape == (6, 3, 300, 300)
    check_targets(t, k)


def test_every_gpu_config_states_its_expected_peak_gpu_memory():
    gpu = [p for p in CONFIGS if "\ndevice: cuda" in "\n" + p.read_text()]
    assert gpu and [p.name for p in gpu if "# peak GPU memory" not in p.read_text()] == []
