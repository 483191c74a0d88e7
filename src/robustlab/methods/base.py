"""The training-method interface shared by every defense.

A method maps (model, batch, ctx) to a `LossOut`. The Trainer owns the loop: zero_grad, backward,
clipping, optimiser and scheduler steps, logging and checkpoints. A method that needs several
optimiser steps per batch overrides `train_step` (the one documented hook) and returns the LossOut
of its last step; a method with its own trainable modules or persistent tensors lists them in
`state_tensors`/`load_state_tensors` so checkpoints include them. A method with an optimiser of its
own (the adversary critic's) steps it inside `train_step` and scales its lr by `ctx.lr_factor`, so
both optimisers follow the configured schedule; `optimizer_state_tensors` / `load_optimizer_state`
put that optimiser's state into the same checkpoint.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustlab.registry import METHODS


@dataclass
class Batch:
    x: Tensor  # (N, C, H, W): in [0, 1] for classifiers, pixel scale [0, 255] for detectors
    y: Tensor  # (N,) int64 labels, or (N, M, 6) padded detection targets (robustlab.detection.targets)


@dataclass
class LossOut:
    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)  # detached scalars; averaged per epoch
    logits: Tensor | None = None  # logits the loss was computed on (for training accuracy)
    stepped: bool = False  # True when train_step already ran backward + optimiser step itself


@dataclass
class StepContext:
    epoch: int
    step: int
    generator: torch.Generator  # seeded from (seed, epoch, step): resumable and order-independent
    passes: list[int] = field(default_factory=lambda: [0, 0])  # forward, backward image-passes (engine-filled)
    attack_model: nn.Module | None = None  # the unwrapped model (no DDP/compile wrapper) for inner attacks
    progress: float = 0.0  # training progress in epochs (epoch + fraction), for eps ramps
    lr_factor: float = 1.0  # the lr schedule's factor at this step, for a method's own optimisers (a critic's)
    seed: int = 0  # the run's seed, for draws that are per epoch rather than per step

    def attacked(self, model: nn.Module) -> nn.Module:
        return self.attack_model if self.attack_model is not None else model


class Method(ABC):
    """Base class; subclasses set `name`, `norm`/`eps` (the threat model they defend) and implement `loss`."""

    name: ClassVar[str] = ""
    task: ClassVar[str] = "classification"  # or "detection": the data and models it trains
    # False for clean training: its best checkpoint is chosen by clean accuracy (or clean mAP), not robustness
    robustness_goal: ClassVar[bool] = True
    norm: str | None = None
    eps: float | None = None

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, ctx: StepContext) -> LossOut:
        """The training loss on one batch (the model is in train mode; inner attacks switch modes themselves)."""

    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
                   ctx: StepContext, backward_and_step) -> LossOut:
        """Default: one loss, one backward, one optimiser step (done by the Trainer's `backward_and_step`)."""
        out = self.loss(model, batch, ctx)
        backward_and_step(out.loss)
        out.stepped = True
        return out

    def steps_per_batch(self) -> int:
        return 1

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool, type(None)))}


class PersistentDelta:
    """Mixin for Free-AT-style methods: a perturbation buffer that persists across minibatches and epochs
    (zero at the start of training, grown when a larger batch arrives) and is saved in training checkpoints."""

    delta: Tensor | None = None

    def delta_for(self, x: Tensor) -> Tensor:
        """The buffer's rows for this batch (a view: writing to it updates the buffer)."""
        if self.delta is None or self.delta.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x)
        elif self.delta.shape[0] < x.shape[0]:
            self.delta = torch.cat([self.delta, torch.zeros_like(x[self.delta.shape[0]:])])
        return self.delta[: x.shape[0]]

    def state_tensors(self) -> dict[str, Tensor]:
        return {} if self.delta is None else {"delta": self.delta}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.delta = tensors.get("delta")


def optimizer_state_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """An optimiser's per-parameter state as flat tensors (`prefix/<param index>/<key>`) for safetensors;
    hyper-parameters are not saved (the method rebuilds them from its config)."""
    out = {}
    for pid, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}/{pid}/{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    return out


def load_optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = v
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def create_method(name: str, **kwargs: Any) -> Method:
    return METHODS.create(name, **kwargs)
