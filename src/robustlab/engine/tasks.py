"""What differs between the tasks robustlab trains and evaluates, in one place: a `Task` joins what training needs
(`TrainingTask`: how a training batch is fetched and moved to the device, the per-epoch panel and its log row) and
what evaluation needs (`EvaluationTask`: the data `eval` reads, the default attacks, the probe of a model, how a split
is evaluated batch by batch under attacks, the merge of shards, the table and log that report it). The Trainer and
the `eval` command call the task of their data or model and hold no `if task == ...`.

- `classification`: images in [0, 1] held as tensors (augmented on the device), robust accuracy by
  `robustlab.evaluate`, checkpoints chosen by PGD accuracy (clean accuracy without a robustness goal), FGSM beside
  PGD to spot catastrophic overfitting.
- `detection`: pixel-scale images in [0, 255] with padded box targets from a detection source (its augmentation
  belongs to the source), mAP clean and under detection attacks (`detection.evaluate`), with the same threat
  checks, records, state, shards and store as classification.

A new task is a `Task` subclass registered with `@TASKS.register("name")`; data and models name their task with a
`task` attribute.
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar, cast

import torch
from torch import Tensor, nn

from robustlab.attacks.spec import expand_panels, parse_attack_spec, parse_spec
from robustlab.data import select_classes
from robustlab.data.augment import augment
from robustlab.data.embedded import as_float_images, materialise
from robustlab.data.loading import EpochLoader, ImageFiles, IndexLoader, resolve_workers
from robustlab.detection.attacks import detection_attacks
from robustlab.detection.evaluate import detector_panel, detector_result, evaluate_detector
from robustlab.detection.integrity import PLANS, finish_detector_integrity, probe_detector
from robustlab.detection.models import check_detector, class_names_of
from robustlab.detection.report import ap_table, detection_log, write_detection_report
from robustlab.engine.evaluator import check_shard, evaluate, result_from_records
from robustlab.engine.external import Normalized, is_array_file, load_array_data, probe_model
from robustlab.engine.integrity import INTEGRITY_MODES
from robustlab.errors import ConfigError, InputError
from robustlab.methods.base import Method
from robustlab.outputs import atomic_write_text
from robustlab.registry import DATASETS, TASKS
from robustlab.reports.markdown import eval_table, evaluation_log
from robustlab.validation import check_choice

EVALUATION_DEFAULTS: dict[str, Any] = {"precision": "fp32", "compile": False, "keep_adversarials": False,
                                       "keep_records": False, "draws": 20}


_T = TypeVar("_T", bound="TrainingTask")


class TrainingTask(ABC):
    """What the Trainer needs of a task: the training data's loading, batches and device placement, the per-epoch
    evaluation panel and its log row, the recipe `robustlab train --task` starts from."""

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""  # "accuracy" | "map": the selection metric's name
    watches_overfitting: ClassVar[bool] = False  # the FGSM/PGD catastrophic-overfitting rules apply
    recipe: ClassVar[dict[str, Any]] = {}  # the config keys `robustlab train --task NAME` starts from

    @classmethod
    def from_config(cls: type[_T], cfg: Any) -> _T:
        """The task with the settings a training config gives it (the config keys it reads)."""
        return cls()

    def restrict_classes(self, data: Any, classes: list[int] | None, imbalance: dict[int, float], seed: int) -> Any:
        """The data restricted to `classes` with per-class keep fractions (classification only)."""
        raise ConfigError(f"config keys 'classes' and 'imbalance' apply to classification data only, not {self.name}")

    def train_loader(self, data: Any, seed: int, workers: int, device: torch.device) -> EpochLoader | IndexLoader:
        """What reads the training split: DataLoader workers for a file-backed split (per-sample augmentation seeds
        from `seed`), the index batches themselves for data in memory."""
        return IndexLoader()

    @abstractmethod
    def train_batch(self, data: Any, batch: Tensor | tuple[Tensor, Tensor], generator: torch.Generator,
                    device: torch.device, augmentation: str) -> tuple[Tensor, Tensor]:
        """A training batch on `device` from what the train loader gave (indices, or a batch read by workers),
        augmented on the device with the step's generator where the task augments there."""

    def to_device(self, data: Any, device: torch.device) -> Any:
        """The data with its training split held on `device` for the whole run (config data_on_device)."""
        raise ConfigError(f"data_on_device is not available for {self.name} data")

    @abstractmethod
    def test_split(self, data: Any) -> Any:
        """The split per-epoch evaluation reads when no validation split is held out."""

    @abstractmethod
    def default_eval_attack(self, method: Method) -> str:
        """The attack that selects checkpoints when the config sets none ("" = clean metric only)."""

    def eval_panel(self, spec: str) -> list[str]:
        """The attacks of one per-epoch evaluation: the selection attack, and what else the task watches."""
        return [spec] if spec else []

    @abstractmethod
    def epoch_row(self, result: dict[str, Any], panel: list[str]) -> dict[str, Any]:
        """The per-epoch log entries of an `evaluate` result: eval_clean, eval_robust, eval_attack, ..."""


class EvaluationTask(ABC):
    """What evaluation needs of a task: the data `robustlab eval` reads, the default attacks, the one-pass probe of a
    model, the evaluation itself (resumable, shardable), the merge of shards, the table and the report."""

    name: ClassVar[str] = ""
    fallback_dataset: ClassVar[str] = ""  # the dataset `eval` reads when the checkpoint names none
    reads_array_files: ClassVar[bool] = False  # `robustlab eval --data FILE.npz` (x, y arrays) is this task's data
    per_sample_records: ClassVar[bool] = False  # evaluate(keep_records=True) gives per-sample flags (the store's union)
    report_examples: ClassVar[int] = 0  # images with their predictions a report shows

    # the evaluation options beyond the common ones (`EVALUATION_DEFAULTS`) the task offers; the others are refused
    evaluation_options: ClassVar[frozenset[str]] = frozenset()
    def default_attacks(self, data: dict[str, Any]) -> list[str]:
        """The attack specs `robustlab eval` runs on `data` (its {"name", ...}) when no --attack is given: none
        (the clean metric) unless the task knows the data's threat model."""
        return []

    def eval_data(self, spec: str | None, split: str, extra: dict[str, Any],
                  model: nn.Module | None = None) -> tuple[Any, dict]:
        """The split `robustlab eval` reads: the dataset `spec` (NAME[:key=value,...]), an array file (x, y), or,
        without either, the dataset the checkpoint was trained on. Returns (split, {"name", "kwargs", "split"});
        refuses another task's data."""
        cfg = extra.get("config") or {}
        if spec is not None and is_array_file(spec):  # the user's own arrays: x, y in a .npz / .safetensors / .pt file
            if not self.reads_array_files:
                raise InputError(f"--data {spec}: array files hold classification data; a {self.name} model needs "
                                 f"a {self.name} dataset")
            if split != "test":  # a file is one set of images: a split it cannot apply must not pass unnoticed
                raise InputError(f"--split {split}: --data {spec} is an array file, a single set of images with no "
                                 f"splits; drop --split, or pass the file that holds the {split} images")
            x, y = load_array_data(spec)
            if isinstance(model, Normalized) and model.mean.numel() not in (1, x.shape[1]):
                raise InputError(f"--normalize gives {model.mean.numel()} channel means; the images in {spec} have "
                                 f"{x.shape[1]} channels")
            return (x, y), {"name": "file", "path": str(spec), "split": "file"}
        if spec is None:
            name, kwargs = cfg.get("dataset", self.fallback_dataset), dict(cfg.get("dataset_kwargs") or {})
            if not name:
                raise InputError("the checkpoint does not record its dataset; pass --data NAME[:key=value,...]")
        else:
            name, kwargs = parse_spec(spec, DATASETS)
        data = DATASETS.create(name, **kwargs)
        if getattr(data, "task", "classification") != self.name:
            raise InputError(f"dataset {name!r} is a {getattr(data, 'task', 'classification')} dataset, not a "
                             f"{self.name} dataset; a {self.name} model needs {self.name} data")
        if model is not None:
            self.check_fits(model, data, name)
        return self.split_of(data, split), {"name": name, "kwargs": kwargs, "split": split}

    def check_fits(self, model: nn.Module, data: Any, name: str) -> None:
        """Refuse data the model cannot read, before any work (classifiers: `evaluate` checks the shapes)."""
        return None

    @abstractmethod
    def split_of(self, data: Any, split: str) -> Any:
        """The "train" or "test" split of a dataset, in the form `evaluate` reads."""

    def expand_specs(self, specs: list[str]) -> list[str]:
        """Attack specs with the task's named panels expanded."""
        return list(specs)

    def check_evaluation_options(self, **given: Any) -> None:
        """Refuse, before any work, an evaluation option this task does not offer (`evaluation_options`) when it is
        set away from its default (precision, compile, keep_adversarials, keep_records, draws)."""
        for option, value in given.items():
            if option not in self.evaluation_options and value != EVALUATION_DEFAULTS[option]:
                offered = ", ".join(sorted(self.evaluation_options)) or "none of them"
                raise InputError(f"{option}={value!r} does not apply to {self.name} evaluations (they offer: {offered})")

    @abstractmethod
    def evaluate(self, model: nn.Module, split: Any, specs: list[str], n: int | None, *, batch_size: int = 32,
                 checks: bool = True, examples: int = 0, progress: bool | None = False, precision: str = "fp32",
                 compile: bool = False, keep_adversarials: bool = False, keep_records: bool = False,
                 state: str | Path | None = None, shard: tuple[int, int] | None = None,
                 draws: int = 20, integrity: str = "quick") -> dict[str, Any]:
        """The task's metric on the first n items of `split`, clean and under each attack spec. checks: the
        task's checks of the setup and the result (off: no integrity probe either); examples: keep the first
        images with their predictions for a report (detection); state / shard: a resumable, shardable run (batch
        records in an `EvalState` folder); integrity: quick | full | off, the integrity probe. The options of
        `EVALUATION_DEFAULTS` apply where `evaluation_options` offers them (`check_evaluation_options`): precision,
        compile (how the attacks run the model's forward), keep_adversarials / keep_records (the adversarial
        examples / per-sample flags in the result), draws (forward passes judging each image of a randomised
        model)."""

    @abstractmethod
    def merge(self, manifest: dict[str, Any], batches: list[dict[str, Any]], checks: dict[str, Any] | None,
              keep_records: bool = False) -> dict[str, Any]:
        """The result of an evaluation from the records its state folders hold (`merge_evaluations`)."""

    def probe(self, model: nn.Module, split: Any, model_spec: str, data_name: str) -> None:
        """Before any work: one forward pass of the model on one item of the split, so that a model that does not
        take the data fails in one line (classification: `external.probe_model`; detection: the one-stage
        interface, `detection.models.check_detector`)."""
        return None

    @abstractmethod
    def table(self, result: dict[str, Any]) -> str:
        """The printed report of an `evaluate` result."""

    @abstractmethod
    def log(self, result: dict[str, Any]) -> str:
        """The AutoAttack-style log of a result (`robustlab eval --log`, `eval-merge --log`)."""

    def write_report(self, folder: str | Path, result: dict[str, Any], title: str, command: str = "",
                     machine: str = "") -> Path:
        """report.md in `folder`: the title, the table, the command and the machine."""
        path = Path(folder) / "report.md"
        lines = [f"# {title}", ""]
        lines += ["Reproduce:", "", "```", command, "```", ""] if command else []
        lines += [f"Machine: {machine}", ""] if machine else []
        lines += [self.table(result), ""]
        atomic_write_text(path, "\n".join(lines))
        return path


class Task(TrainingTask, EvaluationTask):
    """The task-specific parts of training and evaluation (see the module docstring)."""

    name: ClassVar[str] = ""
    box: ClassVar[tuple[float, float]] = (0.0, 1.0)  # the model's input range


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    box = (0.0, 1.0)
    metric = "accuracy"
    watches_overfitting = True
    per_sample_records = True
    reads_array_files = True
    evaluation_options = frozenset(EVALUATION_DEFAULTS)  # all of them

    def restrict_classes(self, data, classes, imbalance, seed):
        return select_classes(data, classes, imbalance, seed=seed)

    def train_loader(self, data, seed, workers, device):
        if isinstance(data.x_train, ImageFiles):  # images left on disk: decoded by workers, augmented on the device
            return EpochLoader(data.x_train, workers, pin_memory=device.type == "cuda")
        return IndexLoader()

    def train_batch(self, data, batch, generator, device, augmentation):
        if isinstance(batch, tuple):
            x, y = batch
        else:
            idx = batch.to(data.x_train.device)
            x, y = data.x_train[idx], data.y_train[idx]
        x = as_float_images(x.to(device, non_blocking=True))  # uint8 pixels become float on the device
        return augment(x, augmentation, generator), y.to(device, non_blocking=True)

    def to_device(self, data, device):
        if isinstance(data.x_train, ImageFiles):
            raise ConfigError(f"data_on_device needs data held in memory; {data.name!r} streams its training images "
                              f"from disk (set data_on_device: false; DataLoader workers feed the device)")
        return dataclasses.replace(data, x_train=data.x_train.to(device), y_train=data.y_train.to(device))

    def test_split(self, data):
        return data.x_test, data.y_test

    fallback_dataset = "mnist5k"
    # the field's standard l_inf budget per dataset (docs/cli.md): without --attack, eval runs PGD-40 at it; data
    # with none documented (an array file, an image folder) needs --attack
    STANDARD_LINF: ClassVar[dict[str, str]] = {
        "mnist": "0.3", "mnist5k": "0.3", "digits": "0.1", "cifar10": "8/255", "cifar10-c": "8/255",
        "cifar100": "8/255", "svhn": "8/255", "tiny-imagenet": "4/255"}

    def default_attacks(self, data):
        eps = self.STANDARD_LINF.get(data.get("name", ""))
        if eps is None:
            where = f"--data {data['path']}" if data.get("path") else f"dataset {data.get('name')!r}"
            raise InputError(f"{where} has no documented threat model: pass --attack, e.g. --attack "
                             "\"autoattack:norm=linf,eps=8/255\" or --attack \"pgd:norm=linf,eps=8/255,steps=40\"")
        return [f"pgd:norm=linf,eps={eps},steps=40"]

    @classmethod
    def from_config(cls, cfg):
        if getattr(cfg, "ap_mode", "11pt") != "11pt":
            raise ConfigError(f"ap_mode {cfg.ap_mode!r} applies to detectors (mAP); a classifier is scored by accuracy")
        return cls()

    def split_of(self, data, split):
        return (data.x_test, data.y_test) if split == "test" else (as_float_images(materialise(data.x_train)),
                                                                   data.y_train)

    def expand_specs(self, specs):
        return expand_panels(specs)

    def default_eval_attack(self, method):
        norm = method.norm or "linf"
        eps = method.eps if method.eps is not None else 0.3
        return f"pgd:norm={norm},eps={eps},steps=20"

    def eval_panel(self, spec):
        # FGSM beside the PGD evaluation (about 1/20 of its cost): a model that resists the single-step attack
        # but not PGD has overfitted catastrophically (or masks gradients).
        _, opts = parse_attack_spec(spec)
        panel = [spec]
        if "eps" in opts and str(opts.get("norm", "linf")).lower() in ("linf", "l2"):  # FGSM exists for these
            panel.append(f"fgsm:norm={opts.get('norm', 'linf')},eps={opts['eps']}")
        return panel

    def evaluate(self, model, split, specs, n, *, batch_size=500, checks=True, examples=0, progress=False,
                 precision="fp32", compile=False, keep_adversarials=False, keep_records=False, state=None, shard=None,
                 draws=20, integrity="quick"):
        if examples:
            raise InputError("classification evaluation keeps no example images (examples applies to detection)")
        x, y = split
        n = x.shape[0] if n is None else min(n, x.shape[0])
        device = next(model.parameters()).device
        with torch.autocast(device.type, enabled=False):
            return evaluate(model, x[:n].to(device), y[:n].to(device), specs, batch_size=batch_size, checks=checks,
                            progress=progress, precision=precision, compile=compile,
                            keep_adversarials=keep_adversarials, keep_records=keep_records or keep_adversarials,
                            state=state, shard=shard, draws=draws, integrity=integrity if checks else False)

    def probe(self, model, split, model_spec, data_name):
        probe_model(model, split[0], model_spec, data_name)

    def merge(self, manifest, batches, checks, keep_records=False):
        return result_from_records(manifest["attacks"], batches, checks, keep_records, bool(manifest["adversarials"]))

    def log(self, result):
        return evaluation_log(result)

    def epoch_row(self, result, panel):
        accs = [a["robust_accuracy"] for a in result["attacks"].values()]
        row = {"eval_clean": result["clean_accuracy"], "eval_robust": accs[0], "eval_attack": panel[0]}
        if len(accs) > 1:
            row["eval_fgsm"] = accs[1]
        return row

    def table(self, result):
        return eval_table(result)


@TASKS.register("detection")
class Detection(Task):
    name = "detection"
    box = (0.0, 255.0)
    metric = "map"
    report_examples = 16
    # the clean TinySSD-96 recipe of spec cwat.md 1.8 on MNIST-Det `voc` (a --config and KEY=VALUE overrides replace
    # its keys)
    recipe = {
        "name": "det-std", "dataset": "mnist-det", "dataset_kwargs": {"preset": "voc"}, "model": "tinyssd-96",
        "method": "det-std", "epochs": 30, "batch_size": 32, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
        "weight_decay": 5e-4, "schedule": "multistep", "milestones": (0.6667, 0.8333), "warmup_epochs": 3.2,
        "eval_every": 5, "eval_samples": 500, "ap_mode": "11pt",
    }

    def restrict_classes(self, data, classes, imbalance, seed):
        raise ConfigError("config keys 'classes' and 'imbalance' apply to classification data only "
                          "(MNIST-Det sets its class imbalance with dataset_kwargs.alpha)")

    def __init__(self, ap_mode: str = "11pt", workers: int = 0) -> None:
        self.ap_mode = ap_mode  # 11pt (VOC07) | area | coco
        self.workers = workers  # DataLoader workers for file-backed splits (evaluation too)

    @classmethod
    def from_config(cls, cfg):
        # a training config, or the eval command's options (which have no workers option: the machine's default)
        return cls(ap_mode=cfg.ap_mode, workers=resolve_workers(getattr(cfg, "workers", None)))

    def train_loader(self, data, seed, workers, device):
        if not data.train.streams:
            return IndexLoader()
        return EpochLoader(data.train, workers, pin_memory=device.type == "cuda", seed=seed)

    def train_batch(self, data, batch, generator, device, augmentation):
        # pixel-scale images, padded targets; augmentation belongs to the source (per-sample seeds, on the host)
        x, y = batch if isinstance(batch, tuple) else data.train.batch(batch)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def to_device(self, data, device):
        if data.train.streams:
            raise ConfigError(f"data_on_device needs data held in memory; {data.name!r} is read from files "
                              f"(set data_on_device: false; DataLoader workers feed the device)")
        return dataclasses.replace(data, train=data.train.to(device))

    def test_split(self, data):
        return data.test

    def split_of(self, data, split):
        return data.test if split == "test" else data.train

    def check_fits(self, model, data, name):
        if data.num_classes != model.num_classes:
            raise InputError(f"the model detects {model.num_classes} classes but dataset {name!r} has {data.num_classes}")

    def default_eval_attack(self, method):
        return ""  # clean mAP selects detectors unless eval_attack (e.g. "cwa") is set

    def merge(self, manifest, batches, checks, keep_records=False):
        result = detector_result(manifest["attacks"], batches, ap_mode=manifest["ap_mode"],
                                 class_names=manifest["class_names"], keep_examples=manifest["examples"])
        if checks is not None:
            result["integrity"] = finish_detector_integrity(checks, result["attacks"])
        return result

    def probe(self, model, split, model_spec, data_name):
        from robustlab.attacks.base import attack_mode

        x, _ = split.batch(torch.arange(1))
        p = next(model.parameters(), None)
        with attack_mode(model):
            check_detector(model, f"--model {model_spec}", x.to(p.device if p is not None else "cpu"))

    def evaluate(self, model, split, specs, n, *, batch_size=32, checks=True, examples=0, progress=False,
                 precision="fp32", compile=False, keep_adversarials=False, keep_records=False, state=None, shard=None,
                 draws=20, integrity="quick"):
        self.check_evaluation_options(precision=precision, compile=compile, keep_adversarials=keep_adversarials,
                                      keep_records=keep_records, draws=draws)
        integrity = integrity if checks else "off"  # the Trainer's per-epoch evaluations run none
        check_choice(integrity, "integrity", INTEGRITY_MODES)
        # batches of at most 64 images
        attacks = detection_attacks(specs, model) if specs else {}
        batch_size = min(batch_size, 64)
        shard_i, n_shards = check_shard(shard, state)
        n_images = len(split) if n is None else min(int(n), len(split))
        saved = None
        if state is not None:  # the batch is the unit of work: resumable, shardable (engine/eval_state.py)
            from robustlab.engine.checkpoint import tensors_sha256
            from robustlab.engine.eval_state import EvalState
            from robustlab.version import __version__

            saved = EvalState(state, {
                "robustlab": __version__, "task": self.name, "model_sha256": tensors_sha256(dict(model.state_dict())),
                "n_images": n_images, "batch_size": batch_size, "ap_mode": self.ap_mode,
                "attacks": detector_panel(attacks), "class_names": class_names_of(model), "examples": examples,
                "integrity": integrity})
        result = evaluate_detector(model, split, n_images, batch_size=batch_size, ap_mode=self.ap_mode,
                                   attacks=attacks, keep_examples=examples, progress=progress, workers=self.workers,
                                   state=saved, shard=(shard_i, n_shards))
        probe = None
        if integrity != "off" and shard_i == 0:  # batch 0's owner probes the first batch (kept with the state)
            probe = saved.load_checks() if saved is not None else None
            if probe is None:
                x, t = split.batch(torch.arange(min(PLANS[integrity][0], n_images, batch_size)))
                device = next(model.parameters()).device
                probe = probe_detector(model, x.to(device), t.to(device),
                                       [a.eps for a in attacks.values() if isinstance(a.eps, (int, float))],
                                       self.ap_mode, integrity)
                if saved is not None:
                    saved.save_checks(probe)
        if saved is not None:
            saved.mark_done(shard_i, n_shards, math.ceil(n_images / batch_size))
        if n_shards > 1:
            result["state"] = str(saved.folder) if saved is not None else None
            return result
        if probe is not None:
            result["integrity"] = finish_detector_integrity(probe, result["attacks"])
        return result

    def epoch_row(self, result, panel):
        row = {"eval_clean": result["clean"]["map"], "eval_map": result["clean"]["map"]}
        if panel:
            row.update(eval_robust=result["attacks"][panel[0]]["map"], eval_attack=panel[0])
        return row

    def table(self, result):
        return ap_table(result)

    def log(self, result):
        return detection_log(result)

    def write_report(self, folder, result, title, command="", machine=""):
        return write_detection_report(folder, result, title, command, machine)


def merge_evaluations(folders: Sequence[str | Path], keep_records: bool = False) -> dict[str, Any]:
    """The result of an evaluation run in shards (`evaluate(..., state=DIR_I, shard=(I, N))`, `robustlab eval
    --shard I/N --state DIR_I`, torchrun's ranks), equal to the single-process result (per-attack seconds are the
    sum over shards), built by the task that wrote the folders (their manifest names it). Errors name the settings
    that differ between folders and the shards that are missing."""
    from robustlab.engine.eval_state import read_records

    manifest, batches, checks = read_records(folders)
    return task_named(manifest.get("task", "classification"))().merge(manifest, batches, checks, keep_records)


def task_of(thing: Any, cfg: Any = None) -> Task:
    """The task of a dataset or a model (its `task` attribute; classification when it has none), set up from a
    training config when one is given."""
    cls = task_named(getattr(thing, "task", "classification"))
    return cls.from_config(cfg) if cfg is not None else cls()


def task_named(name: str) -> type[Task]:
    """The registered Task class of that name (UnknownNameError listing the tasks otherwise)."""
    return cast("type[Task]", TASKS.get(name))


__all__ = ["Task", "Classification", "Detection", "task_of", "task_named", "merge_evaluations"]
