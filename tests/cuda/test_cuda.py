"""The GPU path, for the first machine with a GPU (marker `cuda`: skipped, with the reason, without one).

- every method trains a few steps at full model size (ResNet-18 on CIFAR-shaped data, SSD300-VGG16 on 300x300
  VOC-format data) with amp bf16, channels_last and torch.compile;
- every shipped GPU config runs `--smoke` on CUDA at its full width (and reports its peak GPU memory);
- attack invariants hold on CUDA; AutoAttack on CUDA equals AutoAttack on the CPU within 1 point.
Run: `python -m pytest -m cuda tests/cuda -q` (docs/benchmarks.md).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from robustlab.data.standins import write_standin
from robustlab.engine.config import TrainConfig, load_config
from robustlab.engine.trainer import Trainer
from robustlab.registry import METHODS

pytestmark = [pytest.mark.cuda, pytest.mark.xdist_group("cuda")]
ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIGS = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if "device: cuda" in p.read_text()]
CLASSIFICATION = [n for n in METHODS.names() if METHODS.get(n).task == "classification"]
DETECTION = [n for n in METHODS.names() if METHODS.get(n).task == "detection"]


@pytest.fixture(scope="module")
def cifar_kwargs(tmp_path_factory):
    return write_standin("cifar10", tmp_path_factory.mktemp("cifar"), 64, 32, 0)


@pytest.fixture(scope="module")
def voc_kwargs(tmp_path_factory):
    return write_standin("voc", tmp_path_factory.mktemp("voc"), 16, 8, 0, {"image_size": 300})


FAST_GPU = dict(epochs=1, validation=0, select_best=False, amp="bf16", channels_last=True, compile=True,
                device="cuda", progress=False, eval_samples=8)


@pytest.mark.parametrize("method", CLASSIFICATION)
def test_every_classification_method_full_size_bf16_channels_last_compiled(method, cifar_kwargs, tmp_path):
    # a double-backward method refuses compile (torch.compile cannot differentiate a gradient): it runs eager here
    settings = {**FAST_GPU, "compile": not METHODS.get(method).double_backward}
    cfg = TrainConfig(name=method, out_dir=str(tmp_path), dataset="cifar10", dataset_kwargs=cifar_kwargs,
                      model="resnet18", method=method, batch_size=32, eval_attack="pgd:norm=linf,eps=8/255,steps=2",
                      **settings)
    result = Trainer(cfg).fit()
    row = result["history"][-1]
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith("train_") and isinstance(v, float)), row


@pytest.mark.parametrize("method", DETECTION)
def test_every_detection_method_ssd300_bf16_channels_last_compiled(method, voc_kwargs, tmp_path):
    cfg = TrainConfig(name=method, out_dir=str(tmp_path), dataset="voc", dataset_kwargs=voc_kwargs,
                      model="ssd300-vgg16", method=method, method_kwargs={"steps": 2} if method in (
                          "cls", "reg", "toat", "owat", "cwat", "mtd") else {}, batch_size=8, lr=1e-3, **FAST_GPU)
    result = Trainer(cfg).fit()
    assert math.isfinite(result["history"][-1]["eval_map"])


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in GPU_CONFIGS])
def test_every_gpu_config_smokes_on_cuda(path, tmp_path, record_property):
    from robustlab.engine.smoke import run_smoke

    torch.cuda.reset_peak_memory_stats()
    info = run_smoke(load_config(path), tmp_path, device="cuda")
    assert info["config"].device == "cuda" and info["peak_gpu_mib"] > 0
    # a property, not a print: it reaches --junitxml under pytest-xdist too
    record_property("peak_gpu_mib", round(info["peak_gpu_mib"]))
    record_property("batch_size", info["config"].batch_size)


@pytest.fixture(scope="module")
def trained_cuda_model(tmp_path_factory):
    """A small CNN trained 2 epochs on mnist5k on the GPU (real labels; a model worth attacking)."""
    from robustlab.data import load_dataset

    out = tmp_path_factory.mktemp("cuda-std")
    cfg = TrainConfig(name="cuda-std", out_dir=str(out), model="small-cnn", method="standard", epochs=2,
                      batch_size=128, lr=0.05, validation=0, select_best=False, device="cuda", progress=False)
    trainer = Trainer(cfg)
    trainer.fit()
    data = load_dataset("mnist5k")
    return trainer.model.eval(), data.x_test[:256].cuda(), data.y_test[:256].cuda()


CUDA_ATTACKS = ["fgsm:norm=linf,eps=0.3", "pgd:norm=linf,eps=0.3,steps=10", "pgd:norm=l2,eps=2.0,steps=10",
                "pgd:norm=l1,eps=10.0,steps=10", "apgd-ce:norm=linf,eps=0.3,steps=10",
                "apgd-ce:norm=linf,eps=0.3,steps=10,loss=pm", "apgd-t:norm=linf,eps=0.3,steps=5,targeting=malt",
                "apgd-t:norm=linf,eps=0.3,steps=5", "apgd-t:norm=l2,eps=2.0,steps=5,targets_at_once=3",
                "fab:norm=linf,eps=0.3,steps=5", "fab:norm=l2,eps=2.0,steps=5,targeted=True,targets_at_once=3",
                "square:norm=linf,eps=0.3,n_queries=50", "cw:eps=2.0,steps=20", "deepfool:norm=l2,eps=2.0,steps=10",
                "ead:eps=10.0,steps=20", "brendel-bethge:norm=linf,eps=0.3,steps=20",
                "brendel-bethge:norm=l2,eps=2.0,steps=20,init=noise", "gaussian-noise:eps=2.0,repeats=10"]


@pytest.mark.parametrize("spec", CUDA_ATTACKS)
def test_attack_invariants_on_cuda(spec, trained_cuda_model):
    from robustlab.attacks import create_attack

    model, x, y = trained_cuda_model
    attack = create_attack(spec, model)
    x_adv = attack(x, y)
    assert x_adv.device == x.device and x_adv.min() >= 0 and x_adv.max() <= 1
    if attack.threat is not None:  # minimal-perturbation attacks (C&W, DeepFool, EAD) have no ball: eps only reports
        assert attack.threat.contains(x_adv, x).all()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        adv = (model(x_adv).argmax(1) == y).float().mean()
    assert adv <= clean


def test_autoattack_cuda_matches_cpu(trained_cuda_model):
    """On the GPU APGD-T and FAB-T run their 9 targets side by side, on the CPU one at a time: same robust set
    up to float rounding."""
    import copy

    from robustlab import evaluate

    model, x, y = trained_cuda_model
    spec = "autoattack:norm=linf,eps=0.1"
    (on_gpu,) = [a["robust_accuracy"] for a in evaluate(model, x, y, [spec], checks=False)["attacks"].values()]
    cpu_model = copy.deepcopy(model).cpu()
    (on_cpu,) = [a["robust_accuracy"] for a in evaluate(cpu_model, x.cpu(), y.cpu(), [spec], checks=False)["attacks"]
                 .values()]
    assert abs(on_gpu - on_cpu) <= 0.01 and on_cpu > 0, (on_gpu, on_cpu)


def test_data_on_device_keeps_the_run_identical(cifar_kwargs, tmp_path):
    base = TrainConfig(name="host", out_dir=str(tmp_path), dataset="cifar10", dataset_kwargs=cifar_kwargs,
                       model="resnet18", model_kwargs={"width": 16}, method="pgd-at", epochs=1, batch_size=32,
                       augment="crop-flip", validation=0, select_best=False, device="cuda", deterministic=True,
                       progress=False)
    host = Trainer(base)
    host.fit()
    dev = Trainer(dataclasses.replace(base, name="dev", data_on_device=True))
    dev.fit()
    assert dev.data.x_train.is_cuda
    for a, b in zip(host.model.state_dict().values(), dev.model.state_dict().values()):
        assert torch.equal(a, b)
