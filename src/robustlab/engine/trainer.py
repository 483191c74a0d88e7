"""One Trainer for every method: the loop, schedules, evaluation with best-checkpoint selection,
atomic resumable checkpoints, pass counting, AMP/channels_last, logs, and DDP under torchrun.

Determinism: the data order of epoch e, and the generator handed to the method at step s, are
functions of (seed, e, s) only, and the global RNG is re-seeded at every epoch start. A run resumed
from the checkpoint of epoch e therefore replays exactly what an uninterrupted run does (bit-exact
with `deterministic: true`). The learning rate is a pure function of the global step.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.data import ImageData, load_dataset
from robustlab.data.loading import IndexLoader, resolve_workers
from robustlab.engine.checkpoint import save_model, tensors_sha256, verify_sha256
from robustlab.engine.config import TrainConfig, checkpoint_interval, validation_count
from robustlab.engine.distributed import Torchrun
from robustlab.engine.tasks import Task, task_of
from robustlab.errors import CheckpointError, ConfigError, DataError, ResumeError, RunExistsError
from robustlab.methods import create_method
from robustlab.models import create_model
from robustlab.outputs import atomic_write_bytes, atomic_write_text
from robustlab.registry import MODELS
from robustlab.types import Batch, LossOut, StepContext
from robustlab.utils import compile_module, load_optimizer_tensors, mix_seed, optimizer_tensors, progress_bar
from robustlab.validation import check_device

if TYPE_CHECKING:
    from robustlab.detection.models import Detector

log = logging.getLogger("robustlab.train")
STATE_FORMAT = "robustlab-train-state-v1"
# what a run writes into its folder: a folder holding any of them holds a run
RUN_FILES = ("config.json", "train_state.safetensors", "last.safetensors", "best.safetensors", "metrics.jsonl",
             "metrics.csv", "tensorboard")
# settings that may change when a run is resumed (extend it with more epochs, evaluate more or less often, logs);
# anything else shapes the run and is refused
RESUMABLE_KEYS = ("epochs", "eval_every", "progress", "tensorboard", "workers", "checkpoint_every", "keep_last")


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning-rate multiplier at a global step (stepped per iteration)."""
    t = step / max(total, 1)
    warm = cfg.warmup_epochs / cfg.epochs if cfg.epochs else 0.0
    if warm > 0 and t < warm and cfg.schedule != "cyclic":
        return (t + 1 / max(total, 1)) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "cyclic":  # one cycle: 0 -> peak -> 0, linear (Fast-AT: peak at half; MNG-AC: at 0.4)
        # as the official Fast-AT and MNG-AC loops, step i of an epoch uses the schedule at epoch + (i + 1) / n: the
        # first step already has a positive lr and the last one reaches 0
        c = cfg.cyclic_peak
        t = (step + 1) / max(total, 1)
        return t / c if t < c else max(0.0, (1 - t) / (1 - c))
    if cfg.schedule == "exponential":  # times gamma after every epoch (the IJCNN margin baselines: 0.95)
        return cfg.gamma ** math.floor(t * cfg.epochs + 1e-9)
    # integers are epochs, floats fractions of training (config._check_milestones refuses anything else)
    marks = [m / cfg.epochs if isinstance(m, int) else m for m in cfg.milestones]
    return cfg.gamma ** sum(t >= m for m in marks)


class Trainer:
    """Train `cfg.model` with `cfg.method` on `cfg.dataset`; writes checkpoints and logs to run_dir."""

    def __init__(self, cfg: TrainConfig, data: Any = None, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.data: Any  # the task's data: ImageData (classification) or DetData (detection)
        check_device(cfg.device)
        self.ddp = Torchrun(cfg.device)
        dev = cfg.device
        if self.ddp.enabled and dev == "cuda":
            dev = f"cuda:{self.ddp.local_rank}"
        self.device = torch.device(dev)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_dataset(cfg.dataset, **cfg.dataset_kwargs)
        self.task: Task = task_of(self.data, cfg)  # what differs between classification and detection
        if cfg.classes is not None or cfg.imbalance:
            imbalance = {int(k): float(v) for k, v in (cfg.imbalance or {}).items()}
            self.data = self.task.restrict_classes(self.data, cfg.classes, imbalance, cfg.seed)
        # the validation split: per-epoch evaluation and checkpoint selection never see the test images
        self.n_validation = validation_count(cfg, self.data.n_train)
        self.validation: Any = None
        if self.n_validation:
            self.data, self.validation = self.data.hold_out(self.n_validation, cfg.validation_seed)
        if cfg.data_on_device:
            self.data = self.task.to_device(self.data, self.device)
        # file-backed training data is read by DataLoader workers (per-sample seeds), in-memory data indexed in place
        self.loader = self.task.train_loader(self.data, cfg.seed, resolve_workers(cfg.workers), self.device)
        self._in_memory = isinstance(self.loader, IndexLoader)  # batches are index tensors into data on the host
        self.method = create_method(cfg.method, **cfg.method_kwargs)
        if getattr(self.method, "needs_other_pass", False) and not self._in_memory:
            raise ConfigError(f"method {cfg.method!r} with mask_alignment='batch_index' replays the official code's "
                              "second pass over the training data, which needs data held in memory; this dataset "
                              "is streamed from files (use the default mask_alignment)")
        tasks = {"dataset": self.task.name, "model": getattr(MODELS.get(cfg.model), "task", "classification"),
                 "method": self.method.task}
        if len(set(tasks.values())) > 1:
            raise ConfigError("dataset, model and method must be for the same task, got "
                              + ", ".join(f"{k} {getattr(cfg, k)!r} ({v})" for k, v in tasks.items()))
        if cfg.compile and self.method.double_backward:
            raise ConfigError(f"method {cfg.method!r} differentiates through the model's input gradient (double "
                              "backward), which torch.compile does not support; set compile: false")
        self.model = create_model(cfg.model, **{**self.data.model_kwargs(), **cfg.model_kwargs})
        built = getattr(self.model, "config", {})
        for key in ("in_channels", "input_size"):  # a mismatch can broadcast silently (per-channel normalisation)
            want = self.data.model_kwargs().get(key)
            if key in built and want is not None and built[key] != want:
                raise DataError(f"the {cfg.model!r} model is built for {key}={built[key]} but dataset {cfg.dataset!r} "
                                f"has {key}={want} (images of shape {tuple(self._data_shape())}); drop "
                                f"model_kwargs.{key} or use matching data")
        self._initialise(self.model)
        self.model = self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lag
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                             weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.train_model: nn.Module = self.model
        if self.ddp.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.train_model = compile_module(self.train_model)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name
        self.epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] = {**self.selection_rule(), "score": -1.0, "clean": -1.0, "epoch": None}
        self._epoch_progress: dict[str, Any] | None = None  # a state saved within an epoch, to continue from
        self.saved_at: str | None = None  # where the last state this process wrote stands ("epoch 3, step 40")
        self.history: list[dict[str, Any]] = []
        self.events: list[str] = []
        self._fwd_images = 0
        self._train_fwd_images = 0
        self.model.register_forward_pre_hook(self._count_forward)

    def _data_shape(self) -> tuple[int | None, ...]:
        kw = self.data.model_kwargs()
        return (kw.get("in_channels"), kw.get("input_size"), kw.get("input_size"))

    def _initialise(self, model: nn.Module) -> None:
        """Weights from `init_backbone` (ImageNet, SSD300 only) and/or `init_from` (a robustlab checkpoint of the
        same architecture: the fine-tuning start). A resumed run then loads its own state over these."""
        if self.cfg.init_backbone:
            from robustlab.detection.models import load_imagenet_backbone

            load_imagenet_backbone(cast("Detector", model), self.cfg.init_backbone)
        if self.cfg.init_from:
            from robustlab.engine.checkpoint import read_checkpoint

            state, config, _ = read_checkpoint(self.cfg.init_from)
            if config.get("name") != self.cfg.model:
                raise ConfigError(f"init_from {self.cfg.init_from} holds a {config.get('name')!r} model, "
                                  f"not {self.cfg.model!r}")
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"init_from {self.cfg.init_from} does not fit the configured model: {e}") from None

    def _extra(self, row: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint metadata: epoch, config and the training-loop seconds so far (evaluation excluded), the
        multi-perturbation tables' training-time column."""
        seconds = sum(h["seconds"] for h in self.history if h is not row) + row["seconds"]
        return {"epoch": self.epoch, "config": _jsonable(vars(self.cfg)), "train_seconds": seconds}

    # -- accounting ----------------------------------------------------------------------------
    def _count_forward(self, module: nn.Module, inputs: tuple) -> None:
        n = inputs[0].shape[0]
        self._fwd_images += n
        first = next(module.parameters(), None)
        if torch.is_grad_enabled() and first is not None and first.requires_grad:
            self._train_fwd_images += n  # this forward's graph reaches the parameters: one backward follows

    # -- pieces --------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.n_train / self.cfg.batch_size)

    def _autocast(self):
        if self.cfg.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _backward_and_step(self, ctx: StepContext) -> Callable[[Tensor], None]:
        def step(loss: Tensor) -> None:
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(f"non-finite training loss at epoch {ctx.epoch} step {ctx.step}")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            ctx.passes[1] += self._train_fwd_images
            self._train_fwd_images = 0
            if self.cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        return step

    def _train_batch(self, batch: Tensor | tuple[Tensor, Tensor], gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.task.train_batch(self.data, batch, gen, self.device, self.cfg.augment)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _other_pass(self, epoch: int, step: int) -> Tensor:
        """The images at position `step` of a second shuffled, augmented pass over the training data in `epoch`: its
        own permutation and augmentation draws, functions of (seed, epoch, step) as the training pass's are, and
        this rank's share under torchrun (StepContext.other_pass)."""
        cfg = self.cfg
        perm = rng.randperm(self.data.n_train, generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, 4)))
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size][self.ddp.rank::self.ddp.world]
        x, _ = self._train_batch(idx, rng.device_generator(self.device, mix_seed(cfg.seed, epoch, step, 5)))
        return x

    def _set_lr(self) -> float:
        """Sets the lr of this step; returns the schedule's factor (methods with optimisers of their own use it)."""
        total = self.cfg.epochs * self.steps_per_epoch() * self.method.steps_per_batch()
        f = lr_factor(self.cfg, self.global_step, total)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr * f
        return f

    def selection_rule(self) -> dict[str, Any]:
        """How best.safetensors is chosen: the metric, the split it is measured on, and why (for reports)."""
        attack = self.eval_attack()
        robust = self.method.robustness_goal and bool(attack)
        what = {"map": "mAP"}.get(self.task.metric, self.task.metric)
        metric = f"robust {what} under {attack}" if robust else f"clean {what}"
        if self.n_validation:
            split = f"validation ({self.n_validation} training images held out, seed {self.cfg.validation_seed})"
        else:
            split = "none (validation: 0): the last epoch is kept; per-epoch evaluation on the test split is monitoring only"
        why = ("the method trains for robustness" if robust else
               "the method has no robustness goal" if not self.method.robustness_goal else "no eval_attack is set")
        return {"metric": ("robust_" if robust else "clean_") + self.task.metric,
                "metric_description": metric, "split": split, "why": why, "select_best": self.cfg.select_best}

    def eval_attack(self) -> str:
        """The attack that selects checkpoints: the config's, else the task's default for this method."""
        return self.cfg.eval_attack or self.task.default_eval_attack(self.method)

    def evaluate(self) -> dict[str, Any]:
        """The per-epoch evaluation on the validation split (the test split when none is held out)."""
        panel = self.task.eval_panel(self.eval_attack())
        split = self.validation if self.validation is not None else self.task.test_split(self.data)
        result = self.task.evaluate(self.model, split, panel, self.cfg.eval_samples, checks=False)
        return {**self.task.epoch_row(result, panel), "eval_split": self._eval_split()}

    def _eval_split(self) -> str:
        return "validation" if self.validation is not None else "test"

    # -- the loop ------------------------------------------------------------------------------
    def claim_run_dir(self, overwrite: bool = False) -> None:
        """Refuse a run folder that already holds a run (never mix two runs or clobber checkpoints); with
        overwrite=True remove that run's files first (only the files a run writes)."""
        held = [n for n in RUN_FILES if (self.run_dir / n).exists()]
        if not held:
            self.ddp.barrier()  # every rank has looked before rank 0 writes the first file
            return
        if not overwrite:
            raise RunExistsError(f"run folder {self.run_dir} already holds a run ({', '.join(held)}): continue it with "
                                 f"--resume, replace it with --overwrite, or give this run another name "
                                 f"(name=NEW or --out-dir)")
        if self.ddp.main:
            for n in RUN_FILES:
                target = self.run_dir / n
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.ddp.barrier()

    def close(self) -> None:
        """Leave torchrun's process group. The DDP wrapper holds the group too: it goes first, so the group (and its
        gloo worker threads) is destroyed now, not at interpreter exit, where it can abort the process
        ("terminate called without an active exception")."""
        if self.ddp.enabled:
            import gc

            self.train_model = self.model
            gc.collect()
        self.ddp.close()

    def fit(self, resume: bool = False, stop_at_step: int | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Train to cfg.epochs. resume=True continues from run_dir/train_state.safetensors (refused if the settings
        differ from the stored run's, except RESUMABLE_KEYS); otherwise the run folder must not hold a run yet
        (overwrite=True replaces it).

        stop_at_step (testing): raise KeyboardInterrupt after that many global steps, as a kill would.
        """
        cfg = self.cfg
        if resume and overwrite:
            raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
        if resume:
            self.load_state(self.run_dir / "train_state.safetensors")
        else:
            self.claim_run_dir(overwrite)
        if self.ddp.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.json", json.dumps(_jsonable(vars(cfg)), indent=2))
        tb = self._tensorboard() if cfg.tensorboard and self.ddp.main else None
        n_train = self.data.n_train
        spe = self.steps_per_epoch()
        interval = checkpoint_interval(cfg.checkpoint_every)
        try:
            while self.epoch < cfg.epochs:
                epoch = self.epoch
                acc, first = self._epoch_progress, 0  # a state saved within this epoch: its running sums, its step
                self._epoch_progress = None
                if acc is None:  # a fresh epoch (a resumed one continues the global generator the state restored)
                    torch.manual_seed(mix_seed(cfg.seed, epoch, 1))
                    acc = {"sums": {}, "correct": torch.zeros((), device=self.device), "seen": 0, "passes": [0, 0],
                           "has_accuracy": False, "fwd_images": 0, "elapsed": 0.0, "step": 0}
                first = acc["step"]
                perm = rng.randperm(n_train, generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, 2)))
                self.model.train()
                sums: dict[str, Tensor] = acc["sums"]
                correct = acc["correct"]
                seen = acc["seen"]
                passes = acc["passes"]
                has_accuracy = acc["has_accuracy"]
                t0 = time.perf_counter() - acc["elapsed"]
                self._fwd_images = acc["fwd_images"]
                last_save = time.monotonic()
                # this rank's share of each batch: under DDP a rank reads (and decodes) only its own images
                index_batches = [perm[step * cfg.batch_size:(step + 1) * cfg.batch_size][self.ddp.rank::self.ddp.world]
                                 for step in range(spe)]
                with progress_bar(spe, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress if self.ddp.main else False) as bar:
                    bar.update(first)
                    for step, batch in enumerate(self.loader.epoch(index_batches[first:], epoch), start=first):
                        if stop_at_step is not None and self.global_step >= stop_at_step:
                            raise KeyboardInterrupt(f"stopped at global step {self.global_step} (as requested)")
                        gen = rng.device_generator(self.device, mix_seed(cfg.seed, epoch, step, 3))
                        x, y = self._train_batch(batch, gen)
                        factor = self._set_lr()
                        lr = cfg.lr * factor
                        ctx = StepContext(epoch, step, gen, attack_model=self.model,  # attacks skip DDP hooks
                                          progress=epoch + step / spe, lr_factor=factor, seed=cfg.seed,
                                          other_pass=self._other_pass if self._in_memory else None)
                        self._train_fwd_images = 0
                        with self._autocast():
                            out: LossOut = self.method.train_step(self.train_model, Batch(x, y), self.optimizer, ctx,
                                                                   self._backward_and_step(ctx))
                        self.global_step += self.method.steps_per_batch()
                        for k, v in out.logs.items():
                            sums[k] = sums.get(k, torch.zeros((), device=self.device)) + torch.as_tensor(v).detach().float() * x.shape[0]
                        if out.logits is not None:
                            correct += (out.logits.detach().argmax(1) == y).sum()
                            has_accuracy = True
                        seen += x.shape[0]
                        passes[1] += ctx.passes[1]
                        bar.update(1)
                        if self._checkpoint_due(interval, step, spe, last_save):
                            rng_states = None
                            if self.ddp.enabled:
                                # the ranks' running sums become one total, kept by rank 0 (the others go on from
                                # zero), so the state holds the whole epoch so far and the epoch's end still sums
                                # every rank; each rank's global generator goes into the state too
                                correct, seen = self._pool_running_sums(sums, correct, seen, passes)
                                rng_states = self.ddp.all_gather(torch.get_rng_state())
                            if self.ddp.main:  # within the epoch: the state of its first step + 1 batches
                                self.save_state(self.run_dir / "train_state.safetensors", within={
                                    "step": step + 1, "sums": sums, "correct": correct, "seen": seen,
                                    "passes": passes, "has_accuracy": has_accuracy, "fwd_images": self._fwd_images,
                                    "elapsed": time.perf_counter() - t0, "rng": rng_states})
                            last_save = time.monotonic()
                passes[0] = self._fwd_images
                stats = torch.stack([correct.float(), torch.tensor(float(seen), device=self.device)]
                                    + [sums[k] for k in sorted(sums)]
                                    + [torch.tensor(float(p), device=self.device) for p in passes])
                totals = self.ddp.all_reduce_sum(stats).tolist()  # one sync per epoch
                n_seen = totals[1]
                row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "seconds": time.perf_counter() - t0}
                if has_accuracy:
                    row["train_accuracy"] = totals[0] / n_seen
                for i, k in enumerate(sorted(sums)):
                    row[f"train_{k}"] = totals[2 + i] / n_seen
                row["forward_per_image"] = totals[-2] / n_seen
                row["backward_per_image"] = totals[-1] / n_seen
                self.epoch = epoch + 1
                if self.ddp.main and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
                    row.update(self.evaluate())
                    if self.task.watches_overfitting:  # the FGSM/PGD rules are about classifier accuracy
                        self._check_overfitting(row)
                    # select_best: keep the best evaluated weights on the validation split (robust accuracy against
                    # robust overfitting; clean accuracy for a method with no robustness goal), ties to the more
                    # accurate model; else the latest
                    score = row["eval_robust"] if self.best["metric"].startswith("robust") else row["eval_clean"]
                    key = (score, row["eval_clean"])
                    if key > (self.best["score"], self.best["clean"]) or not cfg.select_best:
                        self.best = {**self.best, "score": key[0], "clean": key[1], "epoch": self.epoch}
                        save_model(self.run_dir / "best.safetensors", self.model, extra=self._extra(row))
                self.history.append(row)
                if self.ddp.main:
                    self._log(row, tb)
                    save_model(self.run_dir / "last.safetensors", self.model, extra=self._extra(row))
                    self.save_state(self.run_dir / "train_state.safetensors")
                self.ddp.barrier()
                if cfg.early_stop_co and "catastrophic_overfitting" in row:
                    log.warning("early stop: catastrophic overfitting at epoch %d", self.epoch)
                    break
        finally:
            self.loader.close()  # DataLoader workers end with the run (or its interruption)
        if tb is not None:
            tb.close()
        return {"history": self.history, "best": self.best, "events": self.events, "run_dir": str(self.run_dir)}

    # under torchrun, how often the ranks ask rank 0's clock whether a time-based state is due (a collective: not
    # every step)
    DDP_CLOCK_STEPS = 16

    def _checkpoint_due(self, interval: tuple[str, float] | None, step: int, spe: int, last_save: float) -> bool:
        """A state within the epoch after this step: never after its last step (the epoch's own state follows).
        Every rank must agree: step counts do; a clock does not, so under torchrun rank 0's clock decides, asked
        every DDP_CLOCK_STEPS steps."""
        if interval is None or step + 1 >= spe:
            return False
        kind, every = interval
        if kind == "steps":
            return (step + 1) % int(every) == 0
        if not self.ddp.enabled:
            return time.monotonic() - last_save >= every
        if (step + 1) % self.DDP_CLOCK_STEPS:
            return False
        return bool(self.ddp.broadcast(time.monotonic() - last_save >= every))

    def _pool_running_sums(self, sums: dict[str, Tensor], correct: Tensor, seen: int,
                           passes: list[int]) -> tuple[Tensor, int]:
        """Under torchrun: sum the ranks' running sums of the epoch (one all-reduce); rank 0 keeps the totals, the
        others restart from zero. Updates sums, passes and the forward count in place; returns (correct, seen)."""
        keys = sorted(sums)
        stats = torch.stack([correct.double(), torch.tensor(float(seen), device=self.device, dtype=torch.float64)]
                            + [sums[k].double() for k in keys]
                            + [torch.tensor(float(v), device=self.device, dtype=torch.float64)
                               for v in (passes[1], self._fwd_images)])
        totals = self.ddp.all_reduce_sum(stats)
        if not self.ddp.main:
            totals = torch.zeros_like(totals)
        for i, k in enumerate(keys):
            sums[k] = totals[2 + i].to(sums[k].dtype)
        passes[1], self._fwd_images = int(totals[-2]), int(totals[-1])
        return totals[0].to(correct.dtype), int(totals[1])

    CO_DROP = 0.2  # Wong et al.: PGD accuracy falling by more than this between evaluations
    CO_GAP = 0.3  # FGSM accuracy exceeding PGD accuracy by more than this (single-step robustness only)

    def _check_overfitting(self, row: dict[str, Any]) -> None:
        """Catastrophic overfitting: PGD accuracy collapses between evaluations (Wong et al.'s rule), or the
        model resists FGSM far better than PGD at the same budget (its defining symptom)."""
        prev = [r["eval_robust"] for r in self.history if "eval_robust" in r]
        reasons = []
        if prev and row["eval_robust"] < prev[-1] - self.CO_DROP:
            reasons.append(f"PGD accuracy fell from {prev[-1]:.3f} to {row['eval_robust']:.3f}")
        if "eval_fgsm" in row and row["eval_fgsm"] - row["eval_robust"] > self.CO_GAP:
            reasons.append(f"FGSM accuracy {row['eval_fgsm']:.3f} vs PGD accuracy {row['eval_robust']:.3f}")
        if reasons:
            msg = f"catastrophic overfitting at epoch {row['epoch']}: {'; '.join(reasons)} ({row['eval_attack']})"
            row["catastrophic_overfitting"] = True
            self.events.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _log(self, row: dict[str, Any], tb) -> None:
        # rewritten whole from the history (the resumable state's copy), atomically: a run killed between this
        # write and the checkpoint, then resumed, logs each epoch once
        rows = self.history
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", out.getvalue())
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tb.add_scalar(k, v, row["epoch"])
        log.info("epoch %d: %s", row["epoch"], ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                           if isinstance(v, float)))

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed (pip install tensorboard); TensorBoard logs are off",
                          stacklevel=2)
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- resumable state -----------------------------------------------------------------------
    def _check_resumable(self, saved_cfg: dict[str, Any], path: Path) -> None:
        diffs = config_differences(saved_cfg, self.cfg)
        if diffs:
            raise ResumeError(f"cannot resume {path.parent}: the settings differ from the stored run's "
                              f"({'; '.join(diffs)}); only {', '.join(RESUMABLE_KEYS)} may change on --resume. "
                              f"Start a new run (another name) to change the others")

    def save_state(self, path: Path, within: dict[str, Any] | None = None) -> None:
        """The resumable state, atomically, keeping cfg.keep_last of them. within: a state inside the epoch (the
        step it reached and the epoch's running sums), else the end of epoch self.epoch."""
        from safetensors.torch import save

        tensors: dict[str, Tensor] = {f"model/{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        optim, opt_meta = optimizer_tensors(self.optimizer, "optim")
        tensors.update(optim)
        for k, v in self.method.state_tensors().items():
            tensors[f"method/{k}"] = v.detach().cpu().contiguous()
        tensors["rng/torch"] = torch.get_rng_state()
        progress: dict[str, Any] = {}
        if within is not None and within.get("rng") is not None:  # torchrun: every rank's generator
            for r, state in enumerate(within["rng"]):
                tensors[f"rng/torch/rank{r}"] = state
        if within is not None:
            tensors["epoch/correct"] = within["correct"].detach().cpu().reshape(())
            for k, v in within["sums"].items():
                tensors[f"epoch/sum/{k}"] = v.detach().cpu().reshape(())
            progress = {k: within[k] for k in ("step", "seen", "passes", "has_accuracy", "fwd_images", "elapsed")}
        if self.scaler is not None:
            opt_meta["scaler"] = self.scaler.state_dict()
        meta = {"format": STATE_FORMAT, "epoch": str(self.epoch), "global_step": str(self.global_step),
                "best": json.dumps(self.best), "history": json.dumps(self.history), "events": json.dumps(self.events),
                "optimizer": json.dumps(opt_meta), "config": json.dumps(_jsonable(vars(self.cfg))),
                "within_epoch": json.dumps(progress), "sha256": tensors_sha256(tensors)}
        data = save(tensors, metadata=meta)
        if self.cfg.keep_last > 1 and path.exists():  # the older states move down one place, the oldest goes
            for place in range(self.cfg.keep_last - 1, 1, -1):
                older = path.with_suffix(f".{place - 1}.safetensors")
                if older.exists():
                    os.replace(older, path.with_suffix(f".{place}.safetensors"))
            one = path.with_suffix(".1.safetensors")
            one.unlink(missing_ok=True)
            os.link(path, one)  # a second name: the current state stays in place until the new one replaces it
        atomic_write_bytes(path, data)
        self.saved_at = (f"epoch {self.epoch + 1}, step {within['step']}" if within is not None
                         else f"end of epoch {self.epoch}")

    def load_state(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        if not path.exists():
            raise ResumeError(f"cannot resume: {path} does not exist (train without --resume first)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"training state {path} is corrupt or truncated: {e}") from None
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not a robustlab training state (format {meta.get('format')!r})")
        verify_sha256(tensors, meta, path)
        self._check_resumable(json.loads(meta["config"]), path)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
        opt_meta = json.loads(meta["optimizer"])
        load_optimizer_tensors(self.optimizer, "optim", tensors, opt_meta, self.device)
        self.method.load_state_tensors({k[7:]: v.to(self.device) for k, v in tensors.items() if k.startswith("method/")})
        # a state within an epoch under torchrun holds every rank's generator; at an epoch's end they are reseeded
        torch.set_rng_state(tensors.get(f"rng/torch/rank{self.ddp.rank}", tensors["rng/torch"]))
        if self.scaler is not None and "scaler" in opt_meta:
            self.scaler.load_state_dict(opt_meta["scaler"])
        self.epoch = int(meta["epoch"])
        self.global_step = int(meta["global_step"])
        self.best = json.loads(meta["best"])
        self.history = json.loads(meta["history"])
        self.events = json.loads(meta.get("events", "[]"))
        progress = json.loads(meta.get("within_epoch") or "{}")
        if progress:  # saved within an epoch: fit continues it from this step with these running sums
            self._epoch_progress = {
                **progress, "correct": tensors["epoch/correct"].to(self.device),
                "sums": {k[len("epoch/sum/"):]: v.to(self.device) for k, v in tensors.items()
                         if k.startswith("epoch/sum/")}}
            if not self.ddp.main:  # the sums are the ranks' totals, kept by rank 0 (`_pool_running_sums`)
                p = self._epoch_progress
                p.update(correct=torch.zeros_like(p["correct"]), seen=0, passes=[p["passes"][0], 0], fwd_images=0,
                         sums={k: torch.zeros_like(v) for k, v in p["sums"].items()})


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'key: old -> new' for every setting that differs from a stored run's, except RESUMABLE_KEYS."""
    now = json.loads(json.dumps(_jsonable(vars(cfg))))
    keys = sorted((set(saved) | set(now)) - set(RESUMABLE_KEYS))
    return [f"{k!r}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def train(cfg: TrainConfig, resume: bool = False, data: ImageData | None = None) -> tuple[nn.Module, dict[str, Any]]:
    trainer = Trainer(cfg, data=data)
    result = trainer.fit(resume=resume)
    return trainer.model, result
