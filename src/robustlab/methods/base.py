"""The training-method interface shared by every defense: two kinds of method.

- A `LossMethod` maps (model, batch, ctx) to a `LossOut`; the Trainer owns the step around it (zero_grad,
  backward, clipping, optimiser and scheduler steps). PGD-AT, TRADES, SAT, PART, WPGD, CWAT, ... are loss methods.
- A `StepMethod` needs several optimiser steps per batch, or an optimiser of its own, and implements `train_step`
  (Free-AT's replays, the adversary critic, MNG-AC's meta step, fast CWAT). It returns the LossOut of its last
  step and steps its own optimisers with lr scaled by `ctx.lr_factor`, so every optimiser follows the schedule.

A method with its own trainable modules or persistent tensors lists them in `state_tensors` /
`load_state_tensors` so checkpoints include them; `optimizer_state_tensors` / `load_optimizer_state` put an own
optimiser's state into the same checkpoint."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, cast

import torch
from torch import Tensor, nn

from robustlab.registry import METHODS
from robustlab.types import Batch, LossOut, StepContext
from robustlab.utils import from_json_tensor, json_tensor, load_optimizer_tensors, optimizer_tensors

BackwardAndStep = Callable[[Tensor], None]  # the Trainer's zero_grad + backward + clip + optimiser step


class Method(ABC):
    """What every method has: `name`, `task`, the threat model it defends (`norm`/`eps`), `train_step`, the
    number of optimiser steps per batch, its checkpointed state and a description. Subclass `LossMethod` or
    `StepMethod`, not this."""

    name: ClassVar[str] = ""
    task: ClassVar[str] = "classification"  # or "detection": the data and models it trains
    # False for clean training: its best checkpoint is chosen by clean accuracy (or clean mAP), not robustness
    robustness_goal: ClassVar[bool] = True
    # True where the loss differentiates through the model's input gradient: torch.compile cannot (refused)
    double_backward: ClassVar[bool] = False
    norm: str | None = None
    eps: float | None = None

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
                   ctx: StepContext, backward_and_step: BackwardAndStep) -> LossOut:
        """One batch of training (the model is in train mode; inner attacks switch modes themselves)."""

    def steps_per_batch(self) -> int:
        return 1

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool, type(None)))}

    @classmethod
    def standin_inputs(cls, kwargs: dict[str, Any], num_classes: int, folder: Path) -> dict[str, Any]:
        """The method's options with every input file it reads replaced by a stand-in in that file's format, written
        under `folder` (`robustlab train --smoke`); most methods read no file."""
        return kwargs


class LossMethod(Method):
    """A method defined by its loss on a batch; the Trainer takes one optimiser step on it."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, ctx: StepContext) -> LossOut:
        """The training loss on one batch (the model is in train mode; inner attacks switch modes themselves)."""

    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
                   ctx: StepContext, backward_and_step: BackwardAndStep) -> LossOut:
        out = self.loss(model, batch, ctx)
        backward_and_step(out.loss)
        out.stepped = True
        return out


class StepMethod(Method):
    """A method that runs its own optimiser steps on a batch (`train_step`); it has no single loss."""


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
    """A method's own optimiser in its `state_tensors`: `utils.optimizer_tensors` (the Trainer's serialiser), the
    non-tensor part as JSON in `prefix/meta`."""
    tensors, meta = optimizer_tensors(optimizer, prefix)
    return {**tensors, f"{prefix}/meta": json_tensor(meta)}


def load_optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """The inverse of `optimizer_state_tensors` (a state written before `prefix/meta` existed keeps the optimiser's
    own param groups)."""
    meta = tensors.get(f"{prefix}/meta")
    rest = {k: v for k, v in tensors.items() if k != f"{prefix}/meta"}
    load_optimizer_tensors(optimizer, prefix, rest, cast(dict, from_json_tensor(meta)) if meta is not None else None)


def create_method(name: str, **kwargs: Any) -> Method:
    return METHODS.create(name, **kwargs)
