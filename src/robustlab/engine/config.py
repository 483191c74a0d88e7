"""Training configuration: one frozen dataclass, built from YAML/dicts with validation that names the key.

`load_config(path, overrides=["epochs=3", "method_kwargs.eps=0.1"])`: unknown keys, wrong types and
out-of-range values raise ConfigError naming the key. Values in overrides are parsed as literals.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlab.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"
    dataset: str = "mnist5k"
    dataset_kwargs: dict = field(default_factory=dict)  # e.g. {root: /data/cifar-10-batches-py}
    classes: list | None = None  # keep only these classes (relabelled 0..k-1 in this order)
    imbalance: dict | None = None  # {class: fraction of its training images kept}, e.g. {3: 0.3}
    model: str = "small-cnn"
    model_kwargs: dict = field(default_factory=dict)
    init_from: str | None = None  # start from this robustlab checkpoint's weights (fine-tuning, e.g. from STD)
    init_backbone: str | None = None  # SSD300: torchvision-format ImageNet state dict for the backbone
    method: str = "standard"
    method_kwargs: dict = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)  # adam only (the adversary critic uses beta1 = 0.5)
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # constant | multistep | cosine | cyclic | exponential (gamma per epoch)
    cyclic_peak: float = 0.5  # cyclic: fraction of training at which the lr peaks (MNG-AC: 0.4, epoch 12 of 30)
    milestones: tuple = (0.5, 0.75)  # multistep: all fractions of training in (0, 1), or all integer epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    augment: str = "none"  # none | crop-flip | crop
    eval_every: int = 1
    eval_attack: str | None = None  # attack spec; default: PGD-20 at the method's threat model
    eval_samples: int = 500  # at most this many validation images per evaluation
    # images held out of the training split for the per-epoch evaluation and checkpoint selection: a fraction (< 1)
    # or a count; fixed by validation_seed (not the run seed: every method of a table sees the same split).
    # null (default): 0.1 when select_best is true, else 0. 0: no validation split, so nothing is selected
    # (select_best must be false: the last epoch is kept, as the papers' protocols do) and the per-epoch
    # evaluation, monitoring only, runs on the test split. robustlab never selects on the images it reports.
    validation: float | None = None
    validation_seed: int = 0
    ap_mode: str = "11pt"  # detectors: 11pt (VOC07) | area | coco (AP50 by COCO's rules)
    select_best: bool = True  # keep the checkpoint with the best robust accuracy (robust overfitting)
    early_stop_co: bool = False  # stop on catastrophic overfitting (Fast-AT's PGD check)
    # DataLoader worker processes reading file-backed data (VOC, COCO); null: the machine's cores less one, at most 8.
    # Results do not depend on it (per-sample seeds).
    workers: int | None = None
    data_on_device: bool = False  # in-memory data lives on the GPU for the whole run (augmented there)
    seed: int = 0
    deterministic: bool = False
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    device: str = "cpu"
    out_dir: str = "runs"
    tensorboard: bool = False
    progress: bool | None = None
    # a training state within the epoch, besides the one at its end: every N optimizer steps (an integer) or every so
    # many minutes ("30m", also "90s", "2h"); null: at epoch ends only. --resume continues from the step it holds.
    checkpoint_every: int | str | None = "30m"
    keep_last: int = 1  # how many training states to keep (train_state.safetensors, then .1, .2, ... the older)

    def __post_init__(self) -> None:
        _check(self)


DEFAULT_VALIDATION = 0.1  # share of the training images held out when a checkpoint is selected

_CHOICES = {"optimizer": ("sgd", "adam"), "schedule": ("constant", "multistep", "cosine", "cyclic", "exponential"),
            "augment": ("none", "crop-flip", "crop"), "amp": ("none", "bf16", "fp16"),
            "ap_mode": ("11pt", "area", "coco")}
_POSITIVE = ("epochs", "batch_size", "eval_every", "eval_samples")


def _check(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        t = hints[f.name]
        if not _type_ok(v, t):
            hint = ""
            if _type_name(t) == "dict" and isinstance(v, str) and v.strip().startswith("{"):
                hint = (f"; set its entries one by one in the dotted form, e.g. {f.name}.KEY=VALUE (or write a "
                        "Python dict literal with quoted keys, {'KEY': VALUE})")
            raise ConfigError(f"config key {f.name!r} must be {_type_name(t)}, got {v!r}{hint}")
    for k, choices in _CHOICES.items():
        if getattr(cfg, k) not in choices:
            raise ConfigError(f"config key {k!r} must be one of {', '.join(choices)}, got {getattr(cfg, k)!r}")
    for k in _POSITIVE:
        if getattr(cfg, k) < 1:
            raise ConfigError(f"config key {k!r} must be >= 1, got {getattr(cfg, k)}")
    for k in ("lr", "weight_decay", "momentum", "gamma", "warmup_epochs"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"config key {k!r} must be >= 0, got {getattr(cfg, k)}")
    if len(cfg.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"config key 'betas' must be two numbers in [0, 1), got {cfg.betas!r}")
    if cfg.lr == 0:
        raise ConfigError("config key 'lr' must be > 0")
    if not 0 < cfg.cyclic_peak < 1:
        raise ConfigError(f"config key 'cyclic_peak' must be in (0, 1), got {cfg.cyclic_peak}")
    v = cfg.validation
    if v is not None and (v < 0 or (v >= 1 and v != int(v))):
        raise ConfigError(f"config key 'validation' must be a fraction in [0, 1), a whole number of images or null, "
                          f"got {v}")
    if v == 0 and cfg.select_best:
        raise ConfigError("select_best needs a validation split to select on (robustlab never selects a checkpoint "
                          "on the test images it reports): set validation > 0 (e.g. 0.1) or select_best: false")
    if cfg.workers is not None and cfg.workers < 0:
        raise ConfigError(f"config key 'workers' must be >= 0 or null (the machine's default), got {cfg.workers}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise ConfigError(f"config key 'grad_clip' must be > 0 or null, got {cfg.grad_clip}")
    _check_milestones(cfg.milestones)
    checkpoint_interval(cfg.checkpoint_every)
    if isinstance(cfg.keep_last, bool) or cfg.keep_last < 1:
        raise ConfigError(f"config key 'keep_last' must be an integer >= 1, got {cfg.keep_last!r}")


def checkpoint_interval(value: int | str | None) -> tuple[str, float] | None:
    """checkpoint_every as ("steps", N) or ("seconds", S); None when off. '30m', '90s', '2h' are durations."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"config key 'checkpoint_every' must be a number of steps, a duration or null, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"config key 'checkpoint_every' must be >= 1 step, got {value}")
        return ("steps", float(value))
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh])\s*", str(value))
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"config key 'checkpoint_every' must be a number of steps (e.g. 500), a duration (e.g. "
                          f"\"30m\", \"90s\", \"2h\") or null, got {value!r}")
    return ("seconds", float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)])


def _check_milestones(milestones: tuple) -> None:
    """Milestones mean one thing: all integers (epochs, >= 1) or all fractions of training in (0, 1), strictly
    increasing. A float of 1 or more (1.0, 2.5) could be either and is refused, as are negative or decreasing ones."""
    ms = list(milestones)
    kinds = {"epoch" if isinstance(m, int) and not isinstance(m, bool) else "fraction" if isinstance(m, float) else "bad"
             for m in ms}
    if "bad" in kinds or len(kinds) > 1:
        raise ConfigError(f"config key 'milestones' must be all integers (epochs, e.g. [60, 120]) or all fractions of "
                          f"training in (0, 1) (e.g. [0.5, 0.75]), got {ms!r}")
    if kinds == {"epoch"} and min(ms) < 1:
        raise ConfigError(f"config key 'milestones': epochs must be >= 1, got {ms!r}")
    if kinds == {"fraction"} and not all(0 < m < 1 for m in ms):
        raise ConfigError(f"config key 'milestones': a fraction of training must lie in (0, 1), got {ms!r} (an "
                          "epoch is an integer: write 2, not 2.0)")
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise ConfigError(f"config key 'milestones' must be strictly increasing, got {ms!r}")


def _type_ok(v: Any, t: Any) -> bool:
    origin = typing.get_origin(t)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(v, a) for a in typing.get_args(t))
    if t is type(None):
        return v is None
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is tuple:
        return isinstance(v, (tuple, list))
    return isinstance(v, t)


def _type_name(t: Any) -> str:
    args = typing.get_args(t)
    return " or ".join(_type_name(a) for a in args) if args else getattr(t, "__name__", str(t))


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(names))}")
    d = dict(d)
    if "milestones" in d and isinstance(d["milestones"], list):
        d["milestones"] = tuple(d["milestones"])
    return TrainConfig(**d)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """'key=value' and 'dict_key.sub=value' overrides; values parsed as literals (never evaluated)."""
    from robustlab.validation import parse_assignment

    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for item in overrides:
        key, parsed = parse_assignment(item, "the config overrides", ConfigError)
        if "." in key:
            outer, inner = key.split(".", 1)
            if not outer.endswith("_kwargs"):
                raise ConfigError(f"override {item!r}: only *_kwargs keys take sub-keys")
            d.setdefault(outer, {})
            d[outer] = {**d[outer], inner: parsed}
        else:
            d[key] = parsed
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> TrainConfig:
    """defaults (e.g. a task's recipe) < the YAML file < overrides."""
    import yaml

    d: dict[str, Any] = dict(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        d.update(loaded)
    return config_from_dict(apply_overrides(d, overrides or []))


def validation_count(cfg: TrainConfig, n_train: int) -> int:
    """Number of training images `cfg.validation` holds out of n_train (0: none)."""
    v = cfg.validation
    if v is None:
        v = DEFAULT_VALIDATION if cfg.select_best else 0.0
    n = int(round(v * n_train)) if v < 1 else int(v)
    if v > 0 and not 1 <= n < n_train:
        raise ConfigError(f"config key 'validation' ({v}) holds out {n} of the {n_train} training images; it must "
                          f"leave at least one image on each side")
    return n
