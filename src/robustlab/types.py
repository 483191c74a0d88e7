"""The records that flow between the parts of robustlab, in one place: a training batch, a method's loss, a
training step's context, and an attack's result. Plain dataclasses with no behaviour beyond a helper or two."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from robustlab.threat import LpBall


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
    # (epoch, step) -> the training images at position `step` of a second shuffled, augmented pass of `epoch` (its
    # own permutation and draws): what PART's official code pairs a batch with (mask_alignment="batch_index");
    # None where the data is streamed
    other_pass: Callable[[int, int], Tensor] | None = None

    def attacked(self, model: nn.Module) -> nn.Module:
        return self.attack_model if self.attack_model is not None else model


@dataclass
class AttackOut:
    """x_adv (N, C, H, W) in [0, 1]; success: model fooled (untargeted) or target reached (targeted).

    norms: per-sample perturbation norm in the attack's norm (minimal-perturbation attacks fill it,
    inf where the attack failed). forward/backward: image-passes spent (a batch of B counts B).
    threat: the threat model used for this batch when it depends on the batch (Pixel-AG's per-element budget
    map); the evaluator checks x_adv against it instead of the attack's envelope. stats: attack-specific
    numbers for reports (DAG's fooled fraction, MDA's choices). accuracy: for attacks run with eot > 1 (randomised
    models), per sample the share of the attack's EoT passes that classify x_adv correctly (what it was chosen by).
    """

    x_adv: Tensor
    success: Tensor | None
    norms: Tensor | None = None
    forward: int = 0
    backward: int = 0
    threat: LpBall | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    accuracy: Tensor | None = None


__all__ = ["AttackOut", "Batch", "LossOut", "StepContext"]
