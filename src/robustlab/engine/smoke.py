"""`robustlab train --smoke`: any config end to end in seconds, on a stand-in of its data.

The dataset is replaced by seeded noise written in the dataset's real on-disk format (`data.standins`) and read by
the real loader, at the config's input size and class count. The run keeps the config's architecture, input shape,
method, attacks and schedule code paths; what it shrinks, and why:
- data: `batch` training images (+ 2 held out when the config selects on validation), `batch` test images
  (embedded datasets are cut to that size);
- steps: two epochs of one optimizer step each, with a checkpoint after the first and a resume from it;
- attack iterations capped at `SMOKE_ATTACK_STEPS` (training and evaluation; the method's defaults too where the
  config leaves them), epoch-valued method settings (burn-in, ramps, refresh periods) cut to one epoch so the
  second epoch runs the method's main phase;
- on CPU, channel widths, for the models that declare a `smoke_kwargs` (the layer structure is unchanged); on a
  GPU the model keeps its full width, so the smoke run's peak GPU memory is the model's at the smoke batch;
- on CPU, `compile` is off (it costs a minute per model); a fine-tuning start (`init_from`), an ImageNet
  backbone (`init_backbone`) and a method's input files (WPGD's label metric) are stand-ins written next to the
  data: the same (thinned) architecture's weights, a matrix of the data's class count.
"""
from __future__ import annotations

import dataclasses
import re
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from robustlab.attacks.spec import parse_spec
from robustlab.data.embedded import ImageData, take
from robustlab.data.standins import write_standin
from robustlab.engine.config import DEFAULT_VALIDATION, TrainConfig
from robustlab.registry import ATTACKS, METHODS, MODELS, option_defaults

if TYPE_CHECKING:
    from robustlab.methods.base import Method

SMOKE_BATCH = 4
SMOKE_ATTACK_STEPS = 2
SMOKE_VALIDATION = 2
_STEP_KEY = re.compile(r"(^|_)steps($|_)|^replays$")
_EPOCH_KEY = re.compile(r"_epochs$")


def cap_attack_steps(spec: str, cap: int = SMOKE_ATTACK_STEPS) -> str:
    """The attack spec with its iterations capped (`steps=` set to min(steps, cap) where the attack has steps)."""
    name, opts = parse_spec(spec, ATTACKS)
    if "steps" in ATTACKS.options(name, 1):
        opts["steps"] = min(int(opts.get("steps", cap)), cap)
    return name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


def _cap_method_kwargs(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The config's method settings with iterations and epoch-valued settings capped, the method's defaults
    included (a config that leaves `steps` at the method's 10 still trains the smoke run with 2)."""
    out = dict(kwargs)
    for k, v in {**option_defaults(METHODS.get(method)), **kwargs}.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if _STEP_KEY.search(k) and isinstance(v, int) and v > SMOKE_ATTACK_STEPS:
            out[k] = SMOKE_ATTACK_STEPS
        elif _EPOCH_KEY.search(k) and v > 1:
            out[k] = 1 if isinstance(v, int) else 1.0
    return out


def smoke_config(cfg: TrainConfig, folder: Path, device: str | None = None) -> tuple[TrainConfig, Any]:
    """(the smoke version of `cfg`, its data): the stand-in data is written under folder/data and read by the
    dataset's own loader (embedded data is cut to the smoke's size), start checkpoints and input files beside it."""
    from robustlab.data import load_dataset
    from robustlab.engine.tasks import task_named
    from robustlab.methods import create_method

    device = device or cfg.device
    batch = min(cfg.batch_size, SMOKE_BATCH)
    validation = cfg.validation if cfg.validation is not None else DEFAULT_VALIDATION if cfg.select_best else 0
    holds_out = validation > 0  # the config evaluates (and selects) on a validation split
    n_train = batch + (SMOKE_VALIDATION if holds_out else 0)
    dataset_kwargs = dict(cfg.dataset_kwargs)
    if cfg.dataset == "mnist-det":  # embedded and generated: ask the generator for the stand-in's size
        dataset_kwargs.update(n_train=n_train, n_test=batch)
    dataset_kwargs = write_standin(cfg.dataset, folder / "data", n_train, batch, cfg.seed, dataset_kwargs)
    data = _cut(load_dataset(cfg.dataset, **dataset_kwargs), n_train, batch)
    factory = MODELS.get(cfg.model)
    thin = getattr(factory, "smoke_kwargs", {}) if torch.device(device).type == "cpu" else {}
    model_kwargs = {**cfg.model_kwargs, **thin}
    method_cls = cast("type[Method]", METHODS.get(cfg.method))
    method_kwargs = method_cls.standin_inputs(_cap_method_kwargs(cfg.method, cfg.method_kwargs), data.num_classes,
                                                 folder)
    task = task_named(getattr(factory, "task", "classification")).from_config(cfg)
    eval_attack = cfg.eval_attack or task.default_eval_attack(create_method(cfg.method, **method_kwargs))
    smoke = dataclasses.replace(
        cfg, name=f"{cfg.name}-smoke", dataset_kwargs=dataset_kwargs, model_kwargs=model_kwargs,
        method_kwargs=method_kwargs, epochs=2, batch_size=batch, eval_every=1, eval_samples=batch,
        eval_attack=cap_attack_steps(eval_attack) if eval_attack else eval_attack,
        validation=SMOKE_VALIDATION if holds_out else 0, device=device, out_dir=str(folder / "runs"),
        compile=cfg.compile and torch.device(device).type != "cpu", progress=False, tensorboard=False)
    if cfg.init_from or cfg.init_backbone:
        smoke = _start_checkpoints(smoke, data, folder)
    return smoke, data


def _cut(data: Any, n_train: int, n_test: int) -> Any:
    """Embedded classification data cut to the smoke's size (file stand-ins are written at it)."""
    if isinstance(data, ImageData) and (data.n_train > n_train or data.x_test.shape[0] > n_test):
        first = torch.arange(min(n_train, data.n_train))
        return dataclasses.replace(data, x_train=take(data.x_train, first), y_train=data.y_train[first],
                                   x_test=data.x_test[:n_test], y_test=data.y_test[:n_test])
    return data


def _start_checkpoints(cfg: TrainConfig, data: Any, folder: Path) -> TrainConfig:
    """Stand-ins for the fine-tuning start and the ImageNet backbone: the (thinned) architecture's own weights."""
    from safetensors.torch import save_file

    from robustlab.engine.checkpoint import save_model
    from robustlab.models import create_model

    model = create_model(cfg.model, **{**data.model_kwargs(), **cfg.model_kwargs})
    changes: dict[str, Any] = {}
    if cfg.init_from:
        changes["init_from"] = str(folder / "init_from.safetensors")
        save_model(changes["init_from"], model)
    if cfg.init_backbone:
        changes["init_backbone"] = str(folder / "backbone.safetensors")
        backbone = {k.removeprefix("backbone."): v.contiguous() for k, v in model.state_dict().items()
                    if k.startswith("backbone.")}
        save_file(backbone, changes["init_backbone"])
    return dataclasses.replace(cfg, **changes)


def peak_host_memory_mib() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_smoke(cfg: TrainConfig, folder: Path, device: str | None = None) -> dict[str, Any]:
    """Train the smoke config one epoch, resume it for the second; returns what happened."""
    from robustlab.engine.trainer import Trainer

    t0 = time.perf_counter()
    smoke, data = smoke_config(cfg, folder, device)
    first = Trainer(dataclasses.replace(smoke, epochs=1), data=data)
    first.fit()
    second = Trainer(smoke, data=data)
    result = second.fit(resume=True)
    info: dict[str, Any] = {"config": smoke, "history": result["history"], "run_dir": result["run_dir"],
                            "seconds": time.perf_counter() - t0, "peak_host_mib": peak_host_memory_mib()}
    if second.device.type == "cuda":
        info["peak_gpu_mib"] = torch.cuda.max_memory_allocated(second.device) / 2 ** 20
    return info
